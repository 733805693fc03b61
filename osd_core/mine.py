"""MINE, the Manifold Inversion Noise Estimator of IDaS-SR (SPEC.md §5.2, §5.7).

Paper: "Adaptive Inversion and Degradation-aware Sampling for Real-ISR" (IDaS-SR), §3.2 and supp. F.1–F.2.
A DiT-S/2 backbone reads the LQ latent z_L with N_q learnable query tokens prepended and returns

    ε_inv = unpatchify(Linear(LN(spatial tokens)))         (B, 4, h, w)   inversion noise, F.1
    g     = mean of the N_q output query tokens            (B, D)         global vector, F.1
    τ     = τ_min + (τ_max − τ_min) · sigmoid(MLP_τ(g))    (B,)           Eq. 15
    d     = MLP_d(g)                                       (B, cond_dim)  Eq. 17 (added to every text token)

Reconstruction choices (SPEC marks them [RECON]; the paper is silent):

* the 2-D sin-cos position table is computed on the fly for the actual (h/p, w/p) grid, so MINE runs at any size;
  the first half of the channels encodes the column, the second half the row, as in DiT's fixed table; odd h or w
  is replicate-padded to a multiple of the patch and the output cropped back;
* N_q = 8 query tokens (init N(0, 0.02)) carry no position embedding;
* ``block_style="plain"`` (default, (a)): pre-LN blocks with affine LayerNorm. ``"adaln"`` ((b), closer to the
  paper's parameter count): DiT's adaLN-Zero blocks conditioned on one learned constant vector c₀ ∈ R^D;
* one final norm serves both the spatial head and the pooled query tokens;
* the spatial head and the last layer of MLP_d start at zero and MLP_τ starts at τ_init = 120, so a fresh MINE
  gives ε_inv = 0, τ = τ_init and d = 0 exactly (the first steps are "z_L at timestep τ_init", stable);
* τ is computed in float32 whatever the weights' dtype (a timestep near 250 has a resolution of 0.125 in fp16).

Parameters at the defaults: "plain" 22,902,161 (21,293,568 of them in the 12 blocks, SPEC's ≈21.3M; the d head adds
1.44M), "adaln" 33,823,505 (the paper's extra trainable parameters over OSEDiff are 33.46M, Tab. 2).

Large images (§5.7): :meth:`MINE.estimate_global` computes τ and d once on the latent area-resized to at most
``global_max_latent`` px per side; :meth:`MINE.inversion_noise` computes ε_inv for one latent tile. On a tile the
query tokens still attend to (and are attended by) that tile's tokens only, so each tile's ε_inv sees a tile-local
global context rather than the whole image's: an approximation that keeps the cost bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_dict import DictConfig
from .tiling import TileWindow

BLOCK_STYLES = ("plain", "adaln")
LN_EPS = 1e-6


@dataclass(frozen=True)
class MINEConfig(DictConfig):
    """Hyperparameters of MINE; defaults are DiT-S/2 plus the SPEC §5.2 reconstruction choices."""

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    in_channels: int = 4
    num_queries: int = 8
    tau_min: float = 20.0
    tau_max: float = 250.0
    tau_init: float = 120.0
    cond_dim: int = 1024
    block_style: str = "plain"
    global_max_latent: int = 64

    def __post_init__(self) -> None:
        for name in ("patch_size", "hidden_size", "depth", "num_heads", "in_channels", "num_queries", "cond_dim",
                     "global_max_latent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if self.hidden_size % 4:
            raise ValueError(
                f"`hidden_size` must be a multiple of 4 (the 2-D sin-cos table splits it into sin/cos per axis); "
                f"got {self.hidden_size}. Use {self.hidden_size // 4 * 4 or 4}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_heads` ({self.num_heads})."
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"`mlp_ratio` must be positive; got {self.mlp_ratio!r}.")
        if not 0 <= self.tau_min < self.tau_init < self.tau_max <= 999:
            raise ValueError(
                "timestep bounds must satisfy 0 <= tau_min < tau_init < tau_max <= 999; got "
                f"tau_min={self.tau_min}, tau_init={self.tau_init}, tau_max={self.tau_max}."
            )
        if self.block_style not in BLOCK_STYLES:
            raise ValueError(f"`block_style` must be one of {BLOCK_STYLES}; got {self.block_style!r}.")
        if self.global_max_latent < self.patch_size:
            raise ValueError(
                f"`global_max_latent` ({self.global_max_latent}) must be at least `patch_size` ({self.patch_size})."
            )


@dataclass(frozen=True)
class MINEOutput:
    """What MINE predicts for a batch of latents."""

    eps_inv: torch.Tensor  # (B, 4, h, w) inversion noise, the latent's dtype
    tau: torch.Tensor  # (B,) float32 timestep in [tau_min, tau_max]
    d: torch.Tensor  # (B, cond_dim) degradation embedding, the latent's dtype
    g: torch.Tensor  # (B, hidden) pooled query tokens


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(dim/2)), k < dim/2; positions (N,) -> (N, dim) float64."""
    omega = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D position table for a row-major (grid_h, grid_w) token grid -> (grid_h·grid_w, dim) float64.

    The first dim/2 channels encode the column index, the last dim/2 the row index (DiT's channel order).
    """
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # (N,)
    cols = torch.arange(grid_w).repeat(grid_h)  # (N,)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (N, dim)


def global_grid_size(h: int, w: int, max_latent: int) -> tuple[int, int]:
    """(h, w) scaled down, aspect kept, so that neither side exceeds ``max_latent``; never scaled up."""
    scale = min(1.0, max_latent / max(h, w))
    return min(max_latent, max(1, round(h * scale))), min(max_latent, max(1, round(w * scale)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x · (1 + scale) + shift, with (B, D) shift/scale broadcast over the tokens of x (B, N, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with a biased qkv projection, via scaled_dot_product_attention."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads)  # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, D/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))  # (B, N, D)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, N, D)


class PlainBlock(nn.Module):
    """Pre-LN transformer block with affine LayerNorms (block style (a)); ``c`` is unused."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, N, D)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class AdaLNBlock(nn.Module):
    """DiT's adaLN-Zero block (block style (b)): shift/scale/gate from the conditioning vector c (B, D)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=LN_EPS, elementwise_affine=False)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, eps=LN_EPS, elementwise_affine=False)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=1)  # 6 × (B, D)
        x = x + gate_a[:, None, :] * self.attn(modulate(self.norm1(x), shift_a, scale_a))  # (B, N, D)
        return x + gate_m[:, None, :] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)


class FinalNorm(nn.Module):
    """The last LayerNorm: affine (plain style) or adaLN-modulated by c (adaln style, DiT's final layer)."""

    def __init__(self, hidden: int, adaptive: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS, elementwise_affine=not adaptive)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)) if adaptive else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.modulation is None:
            return self.norm(x)  # (B, N, D)
        shift, scale = self.modulation(c).chunk(2, dim=1)  # 2 × (B, D)
        return modulate(self.norm(x), shift, scale)  # (B, N, D)


class MINE(nn.Module):
    """DiT-S/2 estimator of (ε_inv, τ, d) from an LQ latent (B, in_channels, h, w), any h and w."""

    def __init__(self, config: MINEConfig = MINEConfig()) -> None:
        super().__init__()
        self.config = config
        hidden, p = config.hidden_size, config.patch_size
        block = AdaLNBlock if config.block_style == "adaln" else PlainBlock
        self.patch_embed = nn.Conv2d(config.in_channels, hidden, kernel_size=p, stride=p)
        self.queries = nn.Parameter(torch.empty(config.num_queries, hidden))
        self.c0 = nn.Parameter(torch.empty(hidden)) if config.block_style == "adaln" else None
        self.blocks = nn.ModuleList(block(hidden, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = FinalNorm(hidden, adaptive=config.block_style == "adaln")
        self.spatial_head = nn.Linear(hidden, p * p * config.in_channels)
        self.tau_head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.d_head = nn.Sequential(nn.Linear(hidden, config.cond_dim), nn.SiLU(),
                                    nn.Linear(config.cond_dim, config.cond_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT-style init; zero heads give ε_inv = 0, d = 0 and τ = τ_init; adaLN modulations start at zero."""
        cfg = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(cfg.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.queries, std=0.02)
        if self.c0 is not None:
            # Unit scale, like DiT's timestep embedding, so the zero-initialised modulations get O(1) gradients.
            nn.init.normal_(self.c0, std=1.0)
        for module in self.modules():
            if isinstance(module, (AdaLNBlock, FinalNorm)) and module.modulation is not None:
                nn.init.zeros_(module.modulation[-1].weight)
                nn.init.zeros_(module.modulation[-1].bias)
        nn.init.zeros_(self.spatial_head.weight)
        nn.init.zeros_(self.spatial_head.bias)
        nn.init.zeros_(self.tau_head[-1].weight)
        fraction = (cfg.tau_init - cfg.tau_min) / (cfg.tau_max - cfg.tau_min)
        nn.init.constant_(self.tau_head[-1].bias, math.log(fraction / (1 - fraction)))
        nn.init.zeros_(self.d_head[-1].weight)
        nn.init.zeros_(self.d_head[-1].bias)

    def _check(self, latent: torch.Tensor) -> None:
        channels = self.config.in_channels
        if latent.ndim != 4 or latent.shape[1] != channels:
            raise ValueError(
                f"`latent` must be a (B, {channels}, h, w) tensor; got shape {tuple(latent.shape)}. "
                "Pass the VAE latent, not the image."
            )

    def _backbone(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed spatial tokens (B, gh·gw, D) and pooled query tokens g (B, D); latent already padded."""
        b, _, h, w = latent.shape
        p, n_q = self.config.patch_size, self.config.num_queries
        x = self.patch_embed(latent.to(self.patch_embed.weight.dtype))  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, gh·gw, D)
        pos = sincos_2d(x.shape[-1], h // p, w // p).to(device=x.device, dtype=x.dtype)  # (gh·gw, D)
        x = torch.cat([self.queries.expand(b, -1, -1), x + pos], dim=1)  # (B, N_q + gh·gw, D)
        c = None if self.c0 is None else self.c0.expand(b, -1)  # (B, D) or None
        for block in self.blocks:
            x = block(x, c)  # (B, N_q + gh·gw, D)
        x = self.final_norm(x, c)  # (B, N_q + gh·gw, D)
        return x[:, n_q:], x[:, :n_q].mean(dim=1)  # (B, gh·gw, D), (B, D)

    def _pad(self, latent: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        pad_h, pad_w = -latent.shape[-2] % p, -latent.shape[-1] % p
        if pad_h or pad_w:
            latent = F.pad(latent, (0, pad_w, 0, pad_h), mode="replicate")  # (B, C, h + pad_h, w + pad_w)
        return latent

    def _unpatchify(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        b, p, c = tokens.shape[0], self.config.patch_size, self.config.in_channels
        x = self.spatial_head(tokens).reshape(b, grid_h, grid_w, p, p, c)  # (B, gh, gw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, grid_h * p, grid_w * p)  # (B, C, gh·p, gw·p)

    def _tau(self, g: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        logit = self.tau_head(g).squeeze(1).float()  # (B,) float32: see the module docstring
        return cfg.tau_min + (cfg.tau_max - cfg.tau_min) * torch.sigmoid(logit)  # (B,)

    def _run(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ε_inv (B, C, h, w) in the latent's dtype and g (B, D); pads odd sizes and crops back."""
        h, w = latent.shape[-2:]
        padded = self._pad(latent)  # (B, C, h', w') with h', w' multiples of p
        p = self.config.patch_size
        spatial, g = self._backbone(padded)  # (B, gh·gw, D), (B, D)
        eps_inv = self._unpatchify(spatial, padded.shape[-2] // p, padded.shape[-1] // p)  # (B, C, h', w')
        return eps_inv[..., :h, :w].to(latent.dtype), g  # (B, C, h, w), (B, D)

    def forward(self, latent: torch.Tensor) -> MINEOutput:
        """latent (B, in_channels, h, w) -> MINEOutput; ε_inv has the latent's shape and dtype."""
        self._check(latent)
        eps_inv, g = self._run(latent)  # (B, C, h, w), (B, D)
        d = self.d_head(g).to(latent.dtype)  # (B, cond_dim)
        return MINEOutput(eps_inv=eps_inv, tau=self._tau(g), d=d, g=g)

    def estimate_global(
        self, latent: torch.Tensor, *, max_latent: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """τ (B,) float32 and d (B, cond_dim) from the latent area-resized to at most ``max_latent`` px a side.

        ``max_latent`` defaults to ``config.global_max_latent`` (64). Smaller latents are used as they are.
        """
        self._check(latent)
        max_latent = self.config.global_max_latent if max_latent is None else max_latent
        if max_latent < self.config.patch_size:
            raise ValueError(f"`max_latent` must be at least {self.config.patch_size}; got {max_latent}.")
        size = global_grid_size(latent.shape[-2], latent.shape[-1], max_latent)
        if size != tuple(latent.shape[-2:]):
            latent = F.interpolate(latent, size=size, mode="area")  # (B, C, ≤max, ≤max)
        _, g = self._backbone(self._pad(latent))  # (B, D)
        return self._tau(g), self.d_head(g).to(latent.dtype)  # (B,), (B, cond_dim)

    def inversion_noise(
        self, latent: torch.Tensor, *, window: TileWindow | tuple[int, int, int, int] | None = None
    ) -> torch.Tensor:
        """ε_inv (B, C, th, tw) for one latent tile: ``latent`` itself, or its ``window`` (y0, y1, x0, x1).

        Only the spatial branch is used; τ and d come from :meth:`estimate_global` and are reused for every tile.
        The query tokens attend to this tile's tokens only, so the tile's ε_inv sees a tile-local global context.
        """
        self._check(latent)
        if window is not None:
            window = window if isinstance(window, TileWindow) else TileWindow(*window)
            h, w = latent.shape[-2:]
            if not (0 <= window.y0 < window.y1 <= h and 0 <= window.x0 < window.x1 <= w):
                raise ValueError(
                    f"`window` must satisfy 0 <= y0 < y1 <= {h} and 0 <= x0 < x1 <= {w} for a latent of shape "
                    f"{tuple(latent.shape)}; got {window}."
                )
            latent = window.slice(latent)  # (B, C, th, tw)
        eps_inv, _ = self._run(latent)  # (B, C, th, tw)
        return eps_inv
