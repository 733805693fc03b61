"""Gaussian-blended tiling of a dense prediction (SPEC.md §1.3), shared by the U-Net and the tiled VAE.

Tile origins step by (tile − overlap) and the last tile is snapped to end exactly at the border. Each tile's
prediction is weighted by a separable gaussian, w(x) ∝ exp(−(x − m)² / (2 · 0.01 · T²)) with m = (T − 1)/2 on both
axes (OSEDiff uses T/2 for y, a quirk we do not copy), and the tiles are averaged: Σ w·pred / Σ w. Tiling only
happens when the area exceeds one tile (h·w > tile²), as in OSEDiff; otherwise one window covers everything.
A tile is min(tile, h) × min(tile, w), clipped per axis: OSEDiff uses a square min(tile, h, w), which only adds tiles
on long thin images without changing the blend's meaning.
When a tile does not fit in memory, ``retry_smaller_tiles`` halves the tile size and tries again.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

GAUSSIAN_VAR = 0.01

logger = logging.getLogger(__name__)


def _is_int(value: object) -> bool:
    """Python or numpy integers; not bools, not floats (a float tile size is a wiring mistake)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def validate_tiling(tile_latent: int, overlap_latent: int) -> None:
    """Tile a positive multiple of 8, overlap in [0, tile); both integers."""
    if not _is_int(tile_latent) or not _is_int(overlap_latent):
        raise ValueError(
            f"`tile_size` and `tile_overlap` must be integers; got {tile_latent!r} and {overlap_latent!r}."
        )
    if tile_latent <= 0 or tile_latent % 8:
        lower = max(8, tile_latent // 8 * 8)
        raise ValueError(
            f"`tile_size` must be a positive multiple of 8; got {tile_latent}. Use {lower} or {lower + 8}."
        )
    if not 0 <= overlap_latent < tile_latent:
        raise ValueError(
            f"`tile_overlap` ({overlap_latent}) must be at least 0 and smaller than `tile_size` ({tile_latent}); "
            f"use e.g. {tile_latent // 3 // 8 * 8}."
        )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins along one axis: steps of (tile − overlap), the last one flush with the end; tile clipped to length."""
    if length < 1 or tile < 1 or not 0 <= overlap < tile:
        raise ValueError(
            f"tile_starts needs length >= 1 and 0 <= overlap < tile; got length {length}, tile {tile}, "
            f"overlap {overlap}."
        )
    tile = min(tile, length)
    if tile == length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileWindow:
    """A tile in the coordinates of the tiled tensor's last two dims, end-exclusive."""

    y0: int
    y1: int
    x0: int
    x1: int

    def slice(self, x: torch.Tensor) -> torch.Tensor:
        """The window's view of x (..., H, W) -> (..., y1 - y0, x1 - x0)."""
        return x[..., self.y0 : self.y1, self.x0 : self.x1]


def tile_windows(h: int, w: int, tile: int, overlap: int) -> list[TileWindow]:
    """Every window covering an (h, w) grid; a single window when h·w <= tile²."""
    if h * w <= tile * tile:
        return [TileWindow(0, h, 0, w)]
    th, tw = min(tile, h), min(tile, w)
    return [
        TileWindow(y, y + th, x, x + tw)
        for y in tile_starts(h, tile, overlap)
        for x in tile_starts(w, tile, overlap)
    ]


def _axis_weights(n: int, var: float) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float64)
    m = (n - 1) / 2
    return torch.exp(-((x - m) ** 2) / (2 * var * n * n))  # (n,)


def gaussian_weights(h: int, w: int, *, var: float = GAUSSIAN_VAR) -> torch.Tensor:
    """Separable gaussian blending weights (h, w) float32, peak 1 at the centre (var in units of the tile side²)."""
    return torch.outer(_axis_weights(h, var), _axis_weights(w, var)).float()  # (h, w)


def _predict_checked(predict: Callable[[TileWindow], torch.Tensor], win: TileWindow, b: int, c: int) -> torch.Tensor:
    pred = predict(win)  # (B, C, th, tw)
    expected = (b, c, win.y1 - win.y0, win.x1 - win.x0)
    if tuple(pred.shape) != expected:
        raise ValueError(f"the tile predictor returned shape {tuple(pred.shape)} for {win}; expected {expected}.")
    return pred


def blend_tiles(
    predict: Callable[[TileWindow], torch.Tensor],
    shape: tuple[int, int, int, int],
    *,
    tile_latent: int,
    overlap_latent: int,
    device: torch.device | str,
    dtype: torch.dtype,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Σ w·predict(window) / Σ w over the tiles of a (B, C, h, w) prediction; ``callback(done, total)`` per tile.

    ``predict(window)`` returns the (B, C, th, tw) prediction for that window. The sums are kept in float32 (the
    gaussian falls to ~1e-11 in a tile's corner, below half precision) and the ratio is returned in ``dtype``.
    ``callback`` runs after every tile and may raise to cancel; the exception propagates.
    """
    validate_tiling(tile_latent, overlap_latent)
    b, c, h, w = shape
    windows = tile_windows(h, w, tile_latent, overlap_latent)
    if len(windows) == 1:  # Σ w·p / Σ w of a lone tile is p itself
        out = _predict_checked(predict, windows[0], b, c).to(device=device, dtype=dtype)  # (B, C, h, w)
        if callback is not None:
            callback(1, 1)
        return out
    acc = torch.zeros(b, c, h, w, device=device, dtype=torch.float32)  # (B, C, h, w)
    norm = torch.zeros(1, 1, h, w, device=device, dtype=torch.float32)  # (1, 1, h, w)
    weights: dict[tuple[int, int], torch.Tensor] = {}
    for done, win in enumerate(windows, start=1):
        pred = _predict_checked(predict, win, b, c).to(device=device, dtype=torch.float32)  # (B, C, th, tw)
        size = tuple(pred.shape[-2:])
        if size not in weights:
            weights[size] = gaussian_weights(*size).to(device)  # (th, tw)
        win.slice(acc).add_(weights[size] * pred)
        win.slice(norm).add_(weights[size])
        if callback is not None:
            callback(done, len(windows))
    return acc.div_(norm).to(dtype)  # (B, C, h, w)


def _is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def retry_smaller_tiles(
    run: Callable[[int, int], torch.Tensor], tile_latent: int, overlap_latent: int, *, min_tile: int = 16,
    on_retry: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``run(tile, overlap)``; on out-of-memory, halve the tile (and overlap, rounded to ×8) and try again.

    ``on_retry`` frees what it can (e.g. the device cache) before the next try. Gives up below ``min_tile``.
    """
    while True:
        try:
            return run(tile_latent, overlap_latent)
        except (RuntimeError, MemoryError) as err:
            smaller = max(min_tile, tile_latent // 2 // 8 * 8)
            if not _is_out_of_memory(err) or smaller >= tile_latent:
                raise
            overlap_latent = min(overlap_latent // 2 // 8 * 8, smaller - 8)
            logger.warning("out of memory with %d-px latent tiles; retrying with %d (overlap %d)",
                           tile_latent, smaller, overlap_latent)
            tile_latent = smaller
            if on_retry is not None:
                on_retry()
