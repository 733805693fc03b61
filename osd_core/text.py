"""Text conditioning for the U-Net's cross-attention (SPEC.md §0.4).

c = CLIPText(tokenize(prompt))[0]: the tokenizer pads to 77 tokens (SD 2.x pads with "!", id 0) and truncates longer
prompts; the last hidden state (1, 77, 1024) for SD 2.x is the conditioning. An empty prompt is valid (it is what the
papers' prompt-free variants use). IDaS-SR's degradation embedding d (B, D) is added to every token (Eq. 17):
c' = c + d[:, None, :].
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def encode_prompt(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """Encode one prompt to (1, L, D) float32 on the CPU, running the encoder in its own dtype and device."""
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a string; got {type(prompt).__name__}.")
    max_length = tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    n_tokens = len(tokenizer(prompt).input_ids)
    if n_tokens > max_length:
        logger.warning("prompt has %d tokens; only the first %d are used", n_tokens, max_length)
    param = next(text_encoder.parameters())
    hidden = text_encoder(ids.to(param.device))[0]  # (1, L, D)
    return hidden.float().cpu()


def add_embedding(cond: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """c' = c + d broadcast over the tokens: cond (1 or B, L, D), d (B, D) -> (B, L, D)."""
    if d.ndim != 2 or d.shape[-1] != cond.shape[-1]:
        raise ValueError(
            f"the embedding has shape {tuple(d.shape)} but the conditioning width is {cond.shape[-1]}; "
            "connect an embedding made for this model."
        )
    if cond.shape[0] not in (1, d.shape[0]):
        raise ValueError(
            f"the conditioning has batch {cond.shape[0]} but the embedding has batch {d.shape[0]}; "
            "use a batch-1 prompt or the same batch."
        )
    return cond + d[:, None, :].to(cond.dtype)  # (B, L, D)
