"""CODSR's TMG positive-area token loss and the cross-attention capture (SPEC §4.5)."""

from __future__ import annotations

import pytest
import torch

from osd_core.models import load_tokenizer
from osd_core.tiny import tiny_components
from training.losses.comat import capture_cross_attention, noun_token_indices, positive_area_loss


def _attention_in(region: torch.Tensor, tokens: int = 5) -> torch.Tensor:
    """(1, L, h, w) maps: every token's attention spread uniformly over ``region`` (h, w) bool."""
    maps = region.float().expand(tokens, *region.shape).clone()
    return (maps / maps.sum(dim=(1, 2), keepdim=True))[None]


def test_loss_is_0_inside_and_1_outside_the_mask():
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    masks, groups = [left[None].float()], [[[1, 2]]]  # one noun of two sub-tokens
    assert positive_area_loss(_attention_in(left), masks, groups).item() == 0.0
    assert positive_area_loss(_attention_in(~left), masks, groups).item() == 1.0
    half = _attention_in(torch.ones(8, 8, dtype=torch.bool))  # half of the mass inside: (1 − 0.5)² = 0.25
    assert positive_area_loss(half, masks, groups).item() == pytest.approx(0.25)


def test_masks_at_image_resolution_are_area_resized():
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    image_mask = left.repeat_interleave(8, 0).repeat_interleave(8, 1)[None].float()  # (1, 64, 64)
    assert positive_area_loss(_attention_in(left), [image_mask], [[[3]]]).item() == 0.0


def test_averaging_over_sub_tokens_nouns_and_samples():
    top = torch.zeros(4, 4, dtype=torch.bool)
    top[:2] = True
    attention = torch.cat([_attention_in(top), _attention_in(~top)])  # sample 0 inside, sample 1 outside
    masks = [torch.stack([top, top]).float(), top[None].float()]
    groups = [[[1], [2, 3]], [[1]]]
    assert positive_area_loss(attention, masks, groups).item() == pytest.approx(0.5)  # mean of 0 and 1
    # a sample without masks contributes nothing; a batch without any gives 0
    assert positive_area_loss(attention, [masks[0], None], [groups[0], []]).item() == 0.0
    zero = positive_area_loss(attention, [None, torch.zeros(0, 4, 4)], [[], []])
    assert zero.item() == 0.0 and zero.shape == ()


def test_noun_token_indices():
    tokenizer = load_tokenizer()
    groups = noun_token_indices(tokenizer, "a dog, traffic light, grass", ["dog", "traffic light", "cat"])
    assert groups == [[2], [4, 5], []]


def test_capture_reproduces_the_unet_and_gives_softmax_maps():
    unet = tiny_components(0).unet
    g = torch.Generator().manual_seed(0)
    z, c, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([100, 200])
    with torch.no_grad():
        reference = unet(z, t, encoder_hidden_states=c).sample
        with capture_cross_attention(unet) as captured:
            out = unet(z, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    cross_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert len(captured.maps) == len(cross_layers)
    attention = captured.averaged((8, 8))
    assert attention.shape == (2, 77, 8, 8)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2, 8, 8))  # softmax over the 77 tokens
    assert not any(type(p).__name__ == "CrossAttentionCapture" for p in unet.attn_processors.values())


def test_loss_backpropagates_into_the_cross_attention():
    unet = tiny_components(0).unet
    unet.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with capture_cross_attention(unet) as captured:
        unet(z, torch.tensor([50]), encoder_hidden_states=c)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1
    loss = positive_area_loss(captured.averaged((8, 8)), [mask], [[[1, 2]]])
    loss.backward()
    to_k = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert 0 < loss.item() < 1 and to_k.grad is not None and to_k.grad.abs().sum() > 0
