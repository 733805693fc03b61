"""Capture the cross-attention maps of a diffusers U-Net during one forward pass (for CODSR's TMG loss, SPEC §4.5).

Inside ``capture_cross_attention(unet)`` every cross-attention layer (``attn2`` of each transformer block) runs
through ``CrossAttentionCapture``, which computes the attention explicitly,

    A = softmax(Q Kᵀ / √d)   (B·heads, N, L)   N = h_l·w_l image tokens of that layer, L = 77 text tokens

records A averaged over the heads, (B, N, L), with its graph (the loss back-propagates into the U-Net's LoRA), and
returns the usual attention output. Self-attention keeps its processor; on exit every processor is restored.
``CrossAttentionMaps.averaged((h, w))`` reshapes each layer's map to its token grid, resizes it bilinearly to the
latent size (h, w) and averages over all layers: (B, L, h, w), CODSR's "averaged attention map across all layers".

The explicit softmax costs memory (SDPA never forms A); use it on the one forward that needs the maps. Under
reentrant gradient checkpointing the captured maps carry no graph: run that forward without checkpointing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


class CrossAttentionCapture:
    """Attention processor for a cross-attention layer that stores the head-averaged softmax map in ``store``."""

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None \
                or attn.residual_connection:
            raise ValueError("CrossAttentionCapture supports SD-style transformer cross-attention only (token input, "
                             "no spatial/group norm, no residual inside the attention).")
        batch, tokens, _ = hidden_states.shape  # (B, N, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, L, D)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·heads, N, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B·heads, L, d)
        value = attn.head_to_batch_dim(attn.to_v(context))  # (B·heads, L, d)
        probs = attn.get_attention_scores(query, key, mask)  # (B·heads, N, L), softmax over L
        self.store.append(probs.view(batch, -1, tokens, probs.shape[-1]).mean(dim=1))  # (B, N, L)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, N, heads·d)
        out = attn.to_out[1](attn.to_out[0](out))  # (B, N, C)
        return out / attn.rescale_output_factor


def _grid(tokens: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (h_l, w_l) token grid of a layer with ``tokens`` positions over a latent of ``size`` (stride-2 convs with
    padding 1 give ⌈h / 2⌉ per level)."""
    h, w, factor = size[0], size[1], 1
    while h >= 1 and w >= 1:
        if h * w == tokens:
            return h, w
        factor *= 2
        h, w = -(-size[0] // factor), -(-size[1] // factor)
    raise ValueError(f"an attention map with {tokens} positions does not fit the latent size {size}; pass the size "
                     "of the latent the U-Net was run on.")


class CrossAttentionMaps:
    """The maps captured during one forward: ``maps[l]`` (B, N_l, L) for every cross-attention layer l."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def averaged(self, size: tuple[int, int]) -> torch.Tensor:
        """Mean over layers of each map resized bilinearly to ``size`` (h, w): (B, L, h, w) float32."""
        if not self.maps:
            raise ValueError("no cross-attention maps were captured; run the U-Net inside capture_cross_attention.")
        total = None
        for attention in self.maps:
            h_l, w_l = _grid(attention.shape[1], size)
            grid = attention.float().transpose(1, 2).reshape(attention.shape[0], -1, h_l, w_l)  # (B, L, h_l, w_l)
            resized = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)  # (B, L, h, w)
            total = resized if total is None else total + resized
        return total / len(self.maps)  # (B, L, h, w)


@contextmanager
def capture_cross_attention(unet: torch.nn.Module):
    """Yield a ``CrossAttentionMaps`` filled by every U-Net forward inside the block; processors restored on exit."""
    model = getattr(unet, "module", unet)  # DDP-wrapped or not
    original = model.attn_processors  # name -> processor
    captured = CrossAttentionMaps()
    capture = CrossAttentionCapture(captured.maps)
    cross = [name for name in original if name.endswith("attn2.processor")]
    if not cross:
        raise ValueError("this U-Net has no cross-attention layers (`attn2`); TMG needs a text-conditioned U-Net.")
    model.set_attn_processor({name: capture if name in cross else proc for name, proc in original.items()})
    try:
        yield captured
    finally:
        model.set_attn_processor(original)
