"""PiSA-SR's λ_pix / λ_sem control (SPEC.md §7.2) on a tiny U-Net with live semantic adapters."""

import pytest
import torch

from osd_core.adapters import apply_bundle
from osd_core.bundle import Bundle
from osd_core.lora import inject_lora, load_lora_state_dict, lora_state_dict, merge_lora, unet_lora_targets
from osd_core.onestep import one_step_denoise
from osd_core.parameterisation import Parameterisation
from osd_core.pisa import semantic_guidance, semantic_layers
from osd_core.tiling import TileWindow, retry_smaller_tiles
from osd_core.tiny import tiny_bundle, tiny_components


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
    return comps.unet.requires_grad_(False)


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
    unet.requires_grad_(False)  # _eps toggles through peft directly, which marks the adapters trainable
    with torch.no_grad():
        got = semantic_guidance(unet, lambda_pix, lambda_sem)(z, t, c)
    torch.testing.assert_close(got, lambda_pix * eps_pix + lambda_sem * (eps_ps - eps_pix), atol=1e-5, rtol=1e-5)
    assert all(layer._disable_adapters is False for layer in unet.modules() if hasattr(layer, "_disable_adapters"))
    assert not any(p.requires_grad for p in unet.parameters())  # peft's re-enable would make the adapters trainable


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


def _hook(win: TileWindow):
    """A CODSR-style conv_in modulation that depends on the tile window."""
    shift = torch.linspace(-0.5, 0.5, 32).view(1, 32, 1, 1) * (1 + win.y0 + win.x0)
    return lambda out: out * 1.1 + shift


def test_conv_in_hook_composes_with_the_two_passes(unet):
    z, t, c = _inputs()
    handle = unet.conv_in.register_forward_hook(lambda _m, _i, out: _hook(TileWindow(0, 16, 0, 16))(out))
    try:
        eps_pix, eps_ps = _eps(unet, False), _eps(unet, True)
    finally:
        handle.remove()
    with torch.no_grad():
        z0 = one_step_denoise(unet, tiny_components().schedule, Parameterisation.PLAIN_RESIDUAL, z, c, t,
                              tile_latent=16, overlap_latent=0, conv_in_hook=_hook,
                              unet_call=semantic_guidance(unet, 0.8, 1.2))
    torch.testing.assert_close(z0, z - (0.8 * eps_pix + 1.2 * (eps_ps - eps_pix)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eps_pix, _eps(unet, False))  # the hook changed the U-Net's output, and is gone


def test_out_of_memory_in_the_pixel_pass_retries_with_the_adapters_back_on(unet):
    z, t, c = _inputs()
    schedule = tiny_components().schedule
    failed = []

    def fail_once(module, _inputs):
        if not failed and all(layer._disable_adapters for layer in semantic_layers(unet)):
            failed.append(True)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def run(tile, overlap):
        return one_step_denoise(unet, schedule, Parameterisation.PLAIN_RESIDUAL, z, c, t, tile_latent=tile,
                                overlap_latent=overlap, unet_call=semantic_guidance(unet, 1.0, 0.6))

    handle = unet.register_forward_pre_hook(fail_once)
    try:
        with torch.no_grad():
            z0 = retry_smaller_tiles(run, 16, 8, min_tile=8)
    finally:
        handle.remove()
    assert failed and not any(layer._disable_adapters for layer in semantic_layers(unet))
    with torch.no_grad():
        torch.testing.assert_close(z0, run(8, 0), atol=0, rtol=0)


def test_tiny_pisa_bundle_keeps_only_its_semantic_adapters_live():
    meta, tensors = tiny_bundle(method="pisa-sr", seed=0)
    comps = tiny_components(seed=0)
    apply_bundle(comps, Bundle(meta=meta, tensors=tensors, path="demo-pisa-sr.safetensors"))
    adapters = {name for layer in semantic_layers(comps.unet) for name in layer.lora_A}
    assert adapters == {"default_encoder_sem", "default_decoder_sem", "default_others_sem"}
    assert set(meta.lora["unet"]["adapters"]) == {"default_encoder_pix", "default_decoder_pix", "default_others_pix"}
    z, t, c = _inputs()
    with torch.no_grad():
        one_pass = semantic_guidance(comps.unet, 1.0, 1.0)(z, t, c)
        pixel_only = semantic_guidance(comps.unet, 1.0, 0.0)(z, t, c)
    assert not torch.allclose(one_pass, pixel_only, atol=1e-4)


@pytest.mark.parametrize("lambdas,passes", [((1.0, 1.0), 1), ((1.0, 0.6), 2), ((0.8, 1.0), 2)])
def test_one_unet_pass_only_at_the_default_lambdas(unet, lambdas, passes):
    calls = []
    handle = unet.register_forward_pre_hook(lambda _module, _inputs: calls.append(1))
    try:
        with torch.no_grad():
            semantic_guidance(unet, *lambdas)(*_inputs())
    finally:
        handle.remove()
    assert len(calls) == passes
