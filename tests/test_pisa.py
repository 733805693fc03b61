"""PiSA-SR's λ_pix / λ_sem control (SPEC.md §7.2) on a tiny U-Net with live semantic adapters."""

import pytest
import torch

from osd_core.lora import inject_lora, load_lora_state_dict, lora_state_dict, merge_lora, unet_lora_targets
from osd_core.onestep import one_step_denoise
from osd_core.parameterisation import Parameterisation
from osd_core.pisa import semantic_guidance
from osd_core.tiny import tiny_components


@pytest.fixture(scope="module")
def unet():
    comps = tiny_components(seed=0)
    g = torch.Generator().manual_seed(0)
    for suffix, merge in (("pix", True), ("sem", False)):
        for adapter, targets in unet_lora_targets(comps.unet).items():
            inject_lora(comps.unet, targets, rank=4, adapter_name=f"{adapter}_{suffix}")
        state = {k: torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in k else v
                 for k, v in lora_state_dict(comps.unet).items()}
        load_lora_state_dict(comps.unet, state)
        if merge:
            merge_lora(comps.unet)
    return comps.unet


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([1.0]), torch.randn(1, 77, 32, generator=g)


def _eps(unet, semantic: bool):
    z, t, c = _inputs()
    for module in unet.modules():
        if hasattr(module, "enable_adapters") and hasattr(module, "lora_A"):
            module.enable_adapters(semantic)
    try:
        with torch.no_grad():
            return unet(z, t, encoder_hidden_states=c).sample
    finally:
        for module in unet.modules():
            if hasattr(module, "enable_adapters") and hasattr(module, "lora_A"):
                module.enable_adapters(True)


@pytest.mark.parametrize("lambda_pix,lambda_sem", [(1.0, 0.6), (0.5, 1.5), (1.0, 0.0)])
def test_two_pass_blend_is_the_pisa_formula(unet, lambda_pix, lambda_sem):
    eps_pix, eps_ps = _eps(unet, False), _eps(unet, True)
    assert not torch.allclose(eps_pix, eps_ps)
    z, t, c = _inputs()
    with torch.no_grad():
        got = semantic_guidance(unet, lambda_pix, lambda_sem)(z, t, c)
    torch.testing.assert_close(got, lambda_pix * eps_pix + lambda_sem * (eps_ps - eps_pix), atol=1e-5, rtol=1e-5)
    assert all(layer._disable_adapters is False for layer in unet.modules() if hasattr(layer, "_disable_adapters"))


def test_default_lambdas_are_one_pass_with_both_sets(unet):
    z, t, c = _inputs()
    with torch.no_grad():
        got = semantic_guidance(unet, 1.0, 1.0)(z, t, c)
    torch.testing.assert_close(got, _eps(unet, True))


def test_denoise_with_the_control_uses_plain_residual(unet):
    z, t, c = _inputs()
    with torch.no_grad():
        z0 = one_step_denoise(unet, tiny_components().schedule, Parameterisation.PLAIN_RESIDUAL, z, c, t,
                              unet_call=semantic_guidance(unet, 1.0, 0.6))
        expected = z - semantic_guidance(unet, 1.0, 0.6)(z, t, c)
    torch.testing.assert_close(z0, expected, atol=1e-5, rtol=1e-5)


def test_lambdas_without_semantic_adapters_are_refused():
    plain = tiny_components().unet
    with pytest.raises(ValueError, match="need a PiSA-SR bundle"):
        semantic_guidance(plain, 1.0, 0.6)
    z, t, c = _inputs()
    with torch.no_grad():  # the default λ are a plain pass for any model
        torch.testing.assert_close(semantic_guidance(plain, 1.0, 1.0)(z, t, c),
                                   plain(z, t, encoder_hidden_states=c).sample)
