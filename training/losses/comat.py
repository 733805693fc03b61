"""CODSR's text-matching guidance (TMG) loss: CoMat's positive-area token loss (SPEC §4.5).

Papers: CODSR (§3.4, "positive area loss from CoMat"); Jiang et al., "CoMat: Aligning Text-to-Image Diffusion Model
with Image-to-Text Concept Matching", arXiv:2404.03653 (attribute-concentration token loss).

For a training sample with nouns n¹..n^N (RAM tags without adjectives) and their binary masks Mⁱ (Grounded-SAM2 on
x_L), A_k the cross-attention map of prompt token k averaged over heads and over all U-Net cross-attention layers at
the latent resolution (``attention_capture``):

    ℓ_k   = (1 − Σ_{u∈M} A_k(u) / Σ_u A_k(u))²
    L_pos = mean over the samples that have masks of ( mean over nouns of ( mean over the noun's sub-tokens k of ℓ_k ))

Token indices come from tokenising the prompt (77 tokens, as the U-Net saw it) and finding the noun's sub-token
sequence in it (``noun_token_indices``). Reconstruction choices ([RECON]): a noun that occurs twice uses its first
occurrence and one that was truncated away is skipped; masks given at image resolution are area-resized to the latent
grid, so Σ_{u∈M} becomes Σ_u M̃(u) A_k(u) with M̃ the fraction of latent pixel u inside the mask (exact for masks
already at latent resolution); samples without masks contribute nothing, and a batch without any gives 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .attention_capture import CrossAttentionMaps, capture_cross_attention

__all__ = ["CrossAttentionMaps", "capture_cross_attention", "noun_token_indices", "positive_area_loss"]


def _find(sequence: list[int], part: list[int]) -> int:
    for start in range(len(sequence) - len(part) + 1):
        if sequence[start:start + len(part)] == part:
            return start
    return -1


def noun_token_indices(tokenizer, prompt: str, nouns: Sequence[str]) -> list[list[int]]:
    """Per noun, the positions of its sub-tokens in the padded 77-token prompt ([] if it is not there)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    groups = []
    for noun in nouns:
        part = tokenizer(noun, add_special_tokens=False).input_ids
        start = _find(ids, part) if part else -1
        groups.append(list(range(start, start + len(part))) if start >= 0 else [])
    return groups


def _sample_loss(attention: torch.Tensor, masks: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """Mean over nouns of mean_k (1 − inside / total)²; attention (L, h, w), masks (N, H, W). None: no usable noun."""
    if masks.shape[0] != len(groups):
        raise ValueError(f"got {masks.shape[0]} masks but {len(groups)} token groups; give one mask per noun.")
    size = tuple(attention.shape[-2:])
    soft = F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0]  # (N, h, w) in [0, 1]
    per_noun = []
    for mask, tokens in zip(soft, groups, strict=True):
        if not tokens:
            continue
        maps = attention[list(tokens)]  # (K, h, w)
        inside = (maps * mask).sum(dim=(1, 2))  # (K,)
        ratio = inside / maps.sum(dim=(1, 2))  # (K,)
        per_noun.append((1 - ratio).square().mean())
    return torch.stack(per_noun).mean() if per_noun else None


def positive_area_loss(attention: torch.Tensor, masks: Sequence[torch.Tensor | None],
                       token_groups: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """L_pos (scalar) from averaged attention (B, L, h, w), per-sample masks (N_b, H, W) (or None / empty) and
    per-sample token groups (N_b lists of token positions). 0 when no sample has a mask."""
    if len(masks) != attention.shape[0] or len(token_groups) != attention.shape[0]:
        raise ValueError(f"`masks` and `token_groups` need one entry per sample ({attention.shape[0]}); got "
                         f"{len(masks)} and {len(token_groups)}.")
    losses = []
    for b, (sample_masks, groups) in enumerate(zip(masks, token_groups, strict=True)):
        if sample_masks is None or sample_masks.numel() == 0:
            continue
        loss = _sample_loss(attention[b], sample_masks.to(attention.device), groups)
        if loss is not None:
            losses.append(loss)
    return torch.stack(losses).mean() if losses else attention.new_zeros(())
