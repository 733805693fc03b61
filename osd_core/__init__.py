"""osd_core: the engine of comfyui-onestep-sr.

One-step diffusion real-world super-resolution on Stable Diffusion 2.1-base class models (OSEDiff, IDaS-SR, TADSR,
RCOD, CODSR). Pure PyTorch + diffusers/transformers/peft: this package never imports ComfyUI and never touches the
network. Each module holds one concept; the ComfyUI nodes in ``nodes/`` are thin adapters over it.

Modules import their siblings relatively, because the package is also imported as a subpackage of the ComfyUI pack.
"""

__version__ = "0.1.0"
