"""A stand-in for torchvision, which has no CPU build on some machines.

The vendored ComfyUI imports torchvision at module level in its Stable Cascade code (``comfy/ldm/cascade``) but
only calls it when such a model is loaded, which the one-step SR pack never does. ``osd_comfy.runtime`` puts this
folder on ``sys.path`` only when no real torchvision is installed. Any real use fails loudly here.
"""


def __getattr__(name):
    raise ImportError(
        f"torchvision.{name} is not available: this is the stand-in used when torchvision is not installed. "
        "Install torchvision to use ComfyUI features that need it."
    )
