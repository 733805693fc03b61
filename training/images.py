"""Image files for training and validation: listing, robust loading, and the crop/flip/resize geometry.

Images are float tensors (3, H, W) in [0, 1] here; ``training.data`` maps them to [-1, 1] for the models. A file that
cannot be decoded raises ``UnreadableImage`` (naming the file), which the datasets turn into a warning and a skip.

TMG masks (CODSR §4.5, training only) live beside the images in ``masks_dir``, one folder per image, named after the
image's stem, holding one binary PNG per object: ``<masks_dir>/<stem>/<order>_<noun>.png``, e.g.
``masks/0001/00_dog.png``, ``masks/0001/01_red_car.png``. The text after the first underscore is the noun phrase
(further underscores read as spaces: "red car"); files are taken in name order; a pixel > 127 is inside the mask.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)


class UnreadableImage(OSError):
    """An image file that could not be decoded."""


def list_images(folder: str | Path, extensions: tuple[str, ...], what: str) -> list[Path]:
    """Every file under ``folder`` (recursively) whose suffix is in ``extensions``, sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {str(folder)!r} is not a folder; set it to a folder of images.")
    wanted = {e.lower() for e in extensions}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not files:
        raise FileNotFoundError(f"{what} {str(folder)!r} holds no images with suffixes {sorted(wanted)}.")
    return files


def load_rgb(path: Path) -> torch.Tensor:
    """The image at ``path`` (EXIF orientation applied) as (3, H, W) float32 in [0, 1]."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{path}: {err}") from err
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)


def load_mask(path: Path) -> torch.Tensor:
    """A binary mask PNG as (H, W) float32 in {0, 1} (pixel > 127 is inside)."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(ImageOps.exif_transpose(image).convert("L"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as err:
        raise UnreadableImage(f"{path}: {err}") from err
    return torch.from_numpy((pixels > 127).astype(np.float32))  # (H, W)


def mask_noun(path: Path) -> str:
    """The noun phrase of a mask file: ``00_red_car.png`` -> "red car"."""
    _, _, noun = path.stem.partition("_")
    return (noun or path.stem).replace("_", " ").strip()


def list_masks(masks_dir: Path, stem: str, limit: int) -> list[Path]:
    """The (at most ``limit``) mask files of the image ``stem``, in name order; [] when it has none."""
    folder = masks_dir / stem
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if len(files) > limit:
        logger.warning("%s holds %d masks; only the first %d (data.max_masks) are used", folder, len(files), limit)
    return files[:limit]


def resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """(C, H, W) -> (C, h, w); bicubic results are clamped back to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    align = {} if mode in ("area", "nearest") else {"align_corners": False}
    out = F.interpolate(image[None], size=size, mode=mode, **align)[0]  # (C, h, w)
    return out.clamp(0.0, 1.0)


def cover_size(height: int, width: int, side: int) -> tuple[int, int]:
    """The smallest (h, w) with the aspect of (height, width) and both sides >= ``side`` (unchanged when already)."""
    if min(height, width) >= side:
        return height, width
    factor = side / min(height, width)
    return max(side, round(height * factor)), max(side, round(width * factor))


def crop(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """A (C, size, size) window of (C, H, W) at (top, left)."""
    return image[..., top:top + size, left:left + size]


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central (C, size, size) window; the image is enlarged first (bicubic) if a side is shorter."""
    image = resize(image, cover_size(*image.shape[-2:], size))
    h, w = image.shape[-2:]
    return crop(image, (h - size) // 2, (w - size) // 2, size)


def draw_offset(generator: torch.Generator, extent: int, size: int) -> int:
    """A uniform crop origin in [0, extent - size]."""
    return int(torch.randint(extent - size + 1, (), generator=generator).item())
