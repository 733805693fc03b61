"""Discriminators and adversarial losses (SPEC §5.5, §4.4): shapes, spectral norm, seeding, hinge and BCE values."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses.gan import (
    DiscriminatorConfig,
    PatchDiscriminator,
    bce_d_loss,
    bce_g_loss,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    hinge_g_loss,
)


def test_latent_patchgan_gives_6x6_on_64_latents():
    d = PatchDiscriminator(DiscriminatorConfig.latent_patchgan(), torch.Generator().manual_seed(0))
    logits = d(torch.randn(2, 4, 64, 64))
    assert len(logits) == 1 and logits[0].shape == (2, 1, 6, 6)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(hasattr(c, "parametrizations") for c in convs)  # spectral norm on every conv


SMALL = DiscriminatorConfig(channels=(8, 16, 16, 32))


@pytest.mark.parametrize("config, smallest", [(DiscriminatorConfig.latent_patchgan(), 24),
                                              (DiscriminatorConfig.pixel_multilevel(), 32)])
def test_inputs_below_the_minimum_size_get_a_clear_error(config, smallest):
    """k4/p1 convs: n -> floor(n/2) at stride 2, n - 1 at stride 1; the head needs 2. At the minimum every logit map
    is 1 x 1 or larger; one pixel less and the error names the minimum."""
    assert config.min_input_size() == smallest
    d = PatchDiscriminator(config, torch.Generator().manual_seed(0))
    assert all(min(level.shape[-2:]) >= 1 for level in d(torch.randn(1, config.in_channels, smallest, smallest)))
    with pytest.raises(ValueError, match=f"at least {smallest} × {smallest}"):
        d(torch.randn(1, config.in_channels, smallest - 1, 40))


def test_spectral_norm_bounds_each_weight():
    d = PatchDiscriminator(SMALL, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(30):  # each training-mode forward runs one more power iteration
            d(torch.zeros(1, 4, 32, 32))
    d.eval()
    for conv in [*d.blocks, *d.heads.values()]:
        sigma_max = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
        assert sigma_max.item() == pytest.approx(1.0, rel=0.02)


def test_pixel_discriminator_has_three_levels():
    d = PatchDiscriminator(DiscriminatorConfig.pixel_multilevel(), torch.Generator().manual_seed(0))
    shapes = [tuple(logits.shape) for logits in d(torch.randn(2, 3, 64, 64))]
    assert shapes == [(2, 1, 15, 15), (2, 1, 7, 7), (2, 1, 3, 3)]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        d(torch.randn(2, 4, 64, 64))


def test_seeded_initialisation_is_deterministic():
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(9))
    a = PatchDiscriminator(SMALL, torch.Generator().manual_seed(3)).eval()
    b = PatchDiscriminator(SMALL, torch.Generator().manual_seed(3)).eval()
    c = PatchDiscriminator(SMALL, torch.Generator().manual_seed(4)).eval()
    assert torch.equal(a(x)[0], b(x)[0]) and not torch.equal(a(x)[0], c(x)[0])


def test_hinge_values():
    ones = [torch.ones(2, 1, 6, 6)]
    assert hinge_d_loss([2 * o for o in ones], [-2 * o for o in ones]).item() == 0.0  # confident and right
    assert hinge_d_loss([0 * o for o in ones], [0 * o for o in ones]).item() == 2.0
    assert hinge_d_loss([-1 * o for o in ones], [3 * o for o in ones]).item() == 6.0  # 2 + 4
    assert hinge_g_loss([0.5 * o for o in ones]).item() == -0.5
    config = DiscriminatorConfig.latent_patchgan()
    assert discriminator_loss(config, ones, ones).item() == 2.0 and generator_loss(config, ones).item() == -1.0


def test_bce_values_with_smoothed_real_target():
    zero = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)]  # two levels: the losses add up
    assert bce_d_loss(zero, zero).item() == pytest.approx(4 * math.log(2))
    big = [torch.full((1, 1, 3, 3), 50.0)]
    # real logits of +50 against target 0.8: BCE = 50 − 0.8·50 + log(1 + e^-50) = 10
    assert bce_d_loss(big, [-b for b in big]).item() == pytest.approx(10.0, abs=1e-4)
    assert bce_g_loss(big).item() == pytest.approx(10.0, abs=1e-4)  # G also aims at 0.8
    config = DiscriminatorConfig.pixel_multilevel()
    assert discriminator_loss(config, zero, zero).item() == pytest.approx(4 * math.log(2))
    assert generator_loss(config, zero).item() == pytest.approx(2 * math.log(2))


def test_config_checks():
    with pytest.raises(ValueError, match="head_levels"):
        DiscriminatorConfig(head_levels=(5,))
    with pytest.raises(ValueError, match="loss"):
        DiscriminatorConfig(loss="wgan")
    with pytest.raises(ValueError, match="strides"):
        DiscriminatorConfig(strides=(2, 2))


def test_config_round_trip():
    from training.schema import build, to_dict

    for config in (DiscriminatorConfig.latent_patchgan(), DiscriminatorConfig.pixel_multilevel()):
        assert build(DiscriminatorConfig, to_dict(config), "discriminator") == config
