"""Each method's x̂₀ parameterisation (SPEC §0.6) and the inference defaults its bundles carry.

OSEDiff, TADSR, CODSR and PiSA-SR: their official test scripts (SPEC §1.3, §3.2, §4.6, §7.2). IDaS-SR and RCOD have no
release: the papers' control values (s = 0.6, the neutral level) with OSEDiff's latent tiles and AdaIN colour fix.
"""

from __future__ import annotations

OSEDIFF_TILING = {"tile_size": 96, "tile_overlap": 32, "color_fix": "adain"}

METHOD_DEFAULTS: dict[str, tuple[str, dict]] = {
    "osediff": ("S", {"timestep": 999, **OSEDIFF_TILING}),
    "tadsr": ("R", {"timestep": 500, **OSEDIFF_TILING}),
    # CODSR's released tiles are 150/50 latent px; ours must be multiples of 8, so the nearest are used.
    "codsr": ("N", {"timestep": 100, "tile_size": 152, "tile_overlap": 48, "color_fix": "adain"}),
    # PiSA-SR's test script: t = 1, empty prompt (no RAM at test time), λ_pix = λ_sem = 1.
    "pisa-sr": ("P", {"timestep": 1, **OSEDIFF_TILING, "prompt": "", "lambda_pix": 1.0, "lambda_sem": 1.0}),
    "idas": ("S", {"s": 0.6, **OSEDIFF_TILING}),
    "rcod": ("S", {"level": "neutral", **OSEDIFF_TILING}),
}
