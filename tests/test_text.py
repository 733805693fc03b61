"""Text conditioning: tokenisation to 77, empty prompts, embeddings added per token."""

import pytest
import torch

from osd_core.text import add_embedding, encode_prompt
from osd_core.tiny import tiny_components


@pytest.fixture(scope="module")
def comps():
    return tiny_components(seed=0)


def test_prompt_shape_and_empty_prompt(comps):
    cond = encode_prompt(comps.text_encoder, comps.tokenizer, "a photo of a cat")
    empty = encode_prompt(comps.text_encoder, comps.tokenizer, "")
    assert cond.shape == empty.shape == (1, 77, 32) and cond.dtype == torch.float32
    assert not torch.allclose(cond, empty)


def test_long_prompts_are_truncated(comps):
    long = encode_prompt(comps.text_encoder, comps.tokenizer, "cat " * 200)
    assert long.shape == (1, 77, 32)


def test_non_string_prompt(comps):
    with pytest.raises(TypeError, match="prompt"):
        encode_prompt(comps.text_encoder, comps.tokenizer, 3)


def test_embedding_is_added_to_every_token():
    cond = torch.randn(1, 77, 8)
    d = torch.randn(2, 8)
    out = add_embedding(cond, d)
    assert out.shape == (2, 77, 8)
    torch.testing.assert_close(out[1, 40], cond[0, 40] + d[1])


def test_embedding_width_and_batch_mismatch():
    with pytest.raises(ValueError, match="width"):
        add_embedding(torch.randn(1, 77, 8), torch.randn(1, 9))
    with pytest.raises(ValueError, match="batch"):
        add_embedding(torch.randn(3, 77, 8), torch.randn(2, 8))
