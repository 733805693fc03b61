"""Applying adapter bundles to SD components (inject, strict load, conv_in, merge), and making demo bundles."""

import pytest
import torch

from osd_core.adapters import apply_bundle, collect_bundle_tensors, inject_bundle_lora
from osd_core.bundle import Bundle, BundleMeta, load_bundle, save_bundle
from osd_core.lora import load_lora_state_dict
from osd_core.tiny import TINY_METHODS, tiny_bundle, tiny_components


@pytest.fixture(scope="module")
def made():
    return tiny_bundle(seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, made):
    path = tmp_path_factory.mktemp("bundles") / "osediff.safetensors"
    save_bundle(path, *made)
    return path


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g),
            torch.rand(1, 3, 32, 32, generator=g) * 2 - 1)


def _outputs(components):
    z, c, x = _inputs()
    with torch.no_grad():
        eps = components.unet(z, torch.tensor([999.0]), encoder_hidden_states=c).sample  # (1, 4, 8, 8)
        mean = components.vae.encode(x).latent_dist.mean  # (1, 4, 4, 4)
        image = components.vae.decode(z).sample  # (1, 3, 64, 64)
    return eps, mean, image


def _delta(a, b, scale, shape):
    """W' - W = scale · B A (CHECKPOINTS.md §1): A (r, in[, k, k]), B (out, r[, 1, 1]) flattened, product reshaped."""
    return (b.flatten(1) @ a.flatten(1)).reshape(shape) * scale


def test_apply_merges_exactly_the_documented_deltas(saved, made):
    meta, tensors = made
    plain = tiny_components(seed=0)
    applied = tiny_components(seed=0)
    apply_bundle(applied, load_bundle(saved))
    for component, host_of in (("unet", lambda c: c.unet), ("vae_encoder", lambda c: c.vae)):
        prefix = {"unet": "unet_lora", "vae_encoder": "vae_encoder_lora"}[component]
        spec = meta.lora[component]
        before, after = host_of(plain).state_dict(), host_of(applied).state_dict()
        assert set(after) == set(before)  # plain diffusers modules again: no lora_* or base_layer keys
        for adapter, targets in spec["adapters"].items():
            for name in targets:
                a = tensors[f"{prefix}.{name}.lora_A.{adapter}.weight"]
                b = tensors[f"{prefix}.{name}.lora_B.{adapter}.weight"]
                base = tensors["unet_conv_in.weight"] if component == "unet" and name == "conv_in" \
                    else before[f"{name}.weight"]
                expected = base + _delta(a, b, spec["alpha"] / spec["rank"], base.shape)
                torch.testing.assert_close(after[f"{name}.weight"], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(applied.unet.conv_in.bias, tensors["unet_conv_in.bias"])
    untouched = {k: v for k, v in plain.unet.state_dict().items() if "time_emb" in k or "norm" in k}
    assert all(torch.equal(applied.unet.state_dict()[k], v) for k, v in untouched.items())


def test_apply_equals_the_unmerged_peft_model(saved):
    bundle = load_bundle(saved)
    plain = tiny_components(seed=0)
    unmerged = tiny_components(seed=0)
    inject_bundle_lora(unmerged, bundle.meta.lora)
    unmerged.unet.conv_in.get_base_layer().load_state_dict(bundle.component("unet_conv_in"))
    load_lora_state_dict(unmerged.unet, bundle.component("unet_lora"))
    load_lora_state_dict(unmerged.vae, bundle.component("vae_encoder_lora"))
    applied = tiny_components(seed=0)
    apply_bundle(applied, bundle)
    reference, result, base = _outputs(unmerged), _outputs(applied), _outputs(plain)
    for want, got in zip(reference, result, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(result[0], base[0], atol=1e-3)  # the bundle changes the U-Net ...
    assert not torch.allclose(result[1], base[1], atol=1e-3)  # ... and the VAE encoder ...
    assert torch.equal(result[2], base[2])  # ... but never the decoder


def test_apply_is_deterministic_and_keeps_the_dtype(saved):
    first, second = tiny_components(seed=0), tiny_components(seed=0)
    apply_bundle(first, load_bundle(saved))
    apply_bundle(second, load_bundle(saved))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(first), _outputs(second), strict=True))
    half = tiny_components(seed=0, dtype=torch.bfloat16)
    apply_bundle(half, load_bundle(saved))
    assert {p.dtype for m in half.modules() for p in m.parameters()} == {torch.bfloat16}
    z, c, _ = _inputs()
    with torch.no_grad():
        eps = half.unet(z.bfloat16(), torch.tensor([999.0]), encoder_hidden_states=c.bfloat16()).sample
    torch.testing.assert_close(eps.float(), _outputs(first)[0], atol=0.05, rtol=0.05)


def test_missing_lora_tensor_is_named(tmp_path, made):
    meta, tensors = made
    key = next(k for k in tensors if k.startswith("unet_lora.") and ".lora_B." in k)
    save_bundle(tmp_path / "b.safetensors", meta, {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(ValueError, match=r"b.safetensors.*unet_lora.*1 missing \(first: \['" + key[len("unet_lora."):]):
        apply_bundle(tiny_components(seed=0), load_bundle(tmp_path / "b.safetensors"))


def test_conv_in_of_another_architecture_is_refused(made):
    meta, tensors = made
    wrong = {**tensors, "unet_conv_in.weight": torch.zeros(64, 4, 3, 3), "unet_conv_in.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"unet_conv_in.*\(64, 4, 3, 3\).*\(32, 4, 3, 3\)"):
        apply_bundle(tiny_components(seed=0), Bundle(meta=meta, tensors=wrong, path="wrong.safetensors"))


def test_lora_for_other_modules_is_refused(made):
    meta, tensors = made
    lora = {**meta.lora, "unet": {**meta.lora["unet"], "adapters": {"default_encoder": ["down_blocks.7.conv"]}}}
    other = BundleMeta(**{**vars(meta), "lora": lora})
    with pytest.raises(ValueError, match="does not have"):
        apply_bundle(tiny_components(seed=0), Bundle(meta=other, tensors=tensors, path="other.safetensors"))


# ---- making bundles ----------------------------------------------------------------------------------------------

def test_collected_tensors_round_trip_through_a_bundle(tmp_path):
    trained = tiny_components(seed=0)
    meta, _ = tiny_bundle(trained, seed=0)
    inject_bundle_lora(trained, meta.lora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stands for training: every LoRA B and the conv_in move away from their start
        for name, param in [*trained.unet.named_parameters(), *trained.vae.named_parameters()]:
            if ".lora_B." in name or name.startswith("conv_in.base_layer."):
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    lora_only = BundleMeta(**{**vars(meta), "modules": ("unet_lora", "vae_encoder_lora", "unet_conv_in"),
                              "hyperparameters": {}})
    tensors = collect_bundle_tensors(trained, lora_only)
    assert "unet_conv_in.weight" in tensors and "unet_lora.conv_in.lora_B.default_encoder.weight" in tensors
    save_bundle(tmp_path / "t.safetensors", lora_only, tensors)
    fresh = tiny_components(seed=0)
    apply_bundle(fresh, load_bundle(tmp_path / "t.safetensors"))
    for want, got in zip(_outputs(trained), _outputs(fresh), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tiny_bundle_leaves_given_components_alone_and_is_seeded():
    components = tiny_components(seed=1)
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    meta, tensors = tiny_bundle(components, seed=2)
    assert components.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in components.unet.state_dict().items())
    assert meta.base_family == components.family
    again = tiny_bundle(components, seed=2)[1]
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    other = tiny_bundle(components, seed=3)[1]
    assert not torch.equal(tensors["unet_lora.conv_in.lora_B.default_encoder.weight"],
                           other["unet_lora.conv_in.lora_B.default_encoder.weight"])


@pytest.mark.parametrize("method", sorted(TINY_METHODS))
def test_tiny_bundles_declare_their_method_modules(method):
    meta, tensors = tiny_bundle(method=method, rank=2, seed=0)
    parameterisation, defaults, module_configs = TINY_METHODS[method]
    assert meta.method == method and meta.parameterisation == parameterisation and meta.defaults == defaults
    dual = {"unet_sem_lora"} if method == "pisa-sr" else set()  # PiSA-SR's live semantic LoRA
    assert set(meta.modules) == {"unet_lora", "vae_encoder_lora", "unet_conv_in", *module_configs} | dual
    assert set(meta.hyperparameters) == set(module_configs)
    assert meta.lora["unet"]["rank"] == meta.lora["vae_encoder"]["rank"] == 2
    assert {k.split(".", 1)[0] for k in tensors} == set(meta.modules)
    assert all(v.any() for k, v in tensors.items() if ".lora_B." in k)
