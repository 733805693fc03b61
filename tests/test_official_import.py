"""Importing the official OSEDiff / TADSR / CODSR / PiSA-SR .pkl layouts (CHECKPOINTS.md §1–5, recipes of §8).

Synthetic checkpoints are built from the tiny models exactly as the official savers lay them out, with random
non-zero LoRA B matrices; the reference is the official loading rule replayed here (peft injection from the saved
lists with peft's default alpha, tensor copy, every adapter active, conv_in replaced for OSEDiff/TADSR only; for
PiSA-SR the pixel merge, then the semantic adapters on top, and the λ blend of the two merged U-Nets; for TADSR's
time_vae/ folder the VAE built from the folder's weights).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import save_file
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from osd_core.adapters import apply_bundle
from osd_core.bundle import Bundle, load_bundle, save_bundle
from osd_core.lora import unet_lora_targets, vae_encoder_lora_targets
from osd_core.method_modules import load_method_modules
from osd_core.official_import import convert_official, detect_layout, import_official, read_official
from osd_core.official_time_vae import encoder_base_tensors, read_time_vae
from osd_core.pisa import semantic_guidance, semantic_layers
from osd_core.tae import TAEConfig, TimeAwareEncoder
from osd_core.tiny import save_tiny_diffusers, tiny_components

RANK = 4
G = torch.Generator().manual_seed(0)


def _inject(model, adapters: dict[str, list[str]], rank: int) -> None:
    for name, targets in adapters.items():
        inject_adapter_in_model(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets), model,
                                adapter_name=name)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(module.lora_A.keys()))


def _randomise_lora(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=G) * 0.05)


def _official_lists(comps):
    unet = unet_lora_targets(comps.unet)
    vae = vae_encoder_lora_targets(comps.vae)
    return unet, vae + vae[:5]  # the official VAE list repeats modules (one entry per matching pattern)


def make_official(layout: str, *, legacy_conv_in: bool = False, half: bool = False):
    """(checkpoint dict, reference components loaded the official way)."""
    comps = tiny_components(seed=0)
    unet_lists, vae_list = _official_lists(comps)
    groups = {g: unet_lists[f"default_{g}"] for g in ("encoder", "decoder", "others")}
    unet_adapters = {f"default_{g}": v for g, v in groups.items()}
    if layout == "codsr":  # the alignment family on cross-attention only
        unet_adapters.update({f"default_{g}_alignment": [m for m in v if ".attn2." in m] for g, v in groups.items()})
    _inject(comps.unet, {k: v for k, v in unet_adapters.items() if v}, RANK)
    _inject(comps.vae, {"default_encoder": list(dict.fromkeys(vae_list))}, RANK)
    _randomise_lora(comps.unet)
    _randomise_lora(comps.vae)
    with torch.no_grad():
        comps.unet.conv_in.get_base_layer().weight.add_(0.1)  # detectable trained conv_in
    unet_state = {k: v.clone() for k, v in comps.unet.state_dict().items()
                  if "lora" in k or ("conv_in" in k and layout != "codsr")}
    if legacy_conv_in:
        unet_state = {k.replace("conv_in.base_layer.", "conv_in."): v for k, v in unet_state.items()}
    ckpt = {"rank_unet": RANK, "rank_vae": RANK, "vae_lora_encoder_modules": vae_list,
            "state_dict_unet": unet_state,
            "state_dict_vae": {k: v.clone() for k, v in comps.vae.state_dict().items() if "lora" in k}}
    if layout == "codsr":
        with torch.no_grad():  # CODSR's loader keeps SD's conv_in
            comps.unet.conv_in.get_base_layer().weight.sub_(0.1)
        for g in ("encoder", "decoder", "others"):
            ckpt[f"unet_lora_{g}_modules_default"] = groups[g]
            ckpt[f"unet_lora_{g}_modules_sam"] = unet_adapters[f"default_{g}_alignment"]
        ckpt["state_dict_sft"] = {f"SFT_{b}_conv{i}.{p}": torch.randn(shape, generator=G) * 0.05
                                  for b in ("scale", "shift") for i, (cin, cout) in enumerate([(192, 16), (16, 32)])
                                  for p, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,)))}
    else:
        for g in ("encoder", "decoder", "others"):
            ckpt[f"unet_lora_{g}_modules"] = groups[g]
    if layout == "tadsr":
        ckpt["state_dict_vae_time"] = {"encoder.time_embedding.linear_1.weight": torch.randn(64, 32, generator=G),
                                       "encoder.time_embedding.linear_1.bias": torch.randn(64, generator=G),
                                       "encoder.time_embedding.linear_2.weight": torch.randn(64, 64, generator=G),
                                       "encoder.time_embedding.linear_2.bias": torch.randn(64, generator=G)}
        for path, resnet in comps.vae.encoder.named_modules():
            if isinstance(resnet, ResnetBlock2D):
                width = resnet.norm2.num_channels
                ckpt["state_dict_vae_time"][f"encoder.{path}.time_emb_proj.weight"] = \
                    torch.randn(2 * width, 64, generator=G) * 0.05
                ckpt["state_dict_vae_time"][f"encoder.{path}.time_emb_proj.bias"] = torch.zeros(2 * width)
    if half:
        ckpt["state_dict_unet"] = {k: v.half() for k, v in ckpt["state_dict_unet"].items()}
    return ckpt, comps


def _imported(ckpt, layout):
    meta, tensors = convert_official(ckpt, method=layout, base_family=tiny_components().family)
    comps = tiny_components(seed=0)
    bundle = Bundle(meta=meta, tensors=tensors, path=f"{layout}.safetensors")
    apply_bundle(comps, bundle)
    return meta, comps, load_method_modules(comps, bundle)


def _unet(comps):
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return comps.unet(z, torch.tensor([500.0]), encoder_hidden_states=c).sample


def _vae(comps):
    return _encode_mean(comps.vae)


def _encode_mean(vae):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


@pytest.mark.parametrize("layout", ["osediff", "tadsr", "codsr"])
def test_import_reproduces_the_official_loading(layout):
    ckpt, reference = make_official(layout)
    meta, comps, modules = _imported(ckpt, layout)
    torch.testing.assert_close(_unet(comps), _unet(reference), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_vae(comps), _vae(reference), atol=1e-5, rtol=1e-5)
    assert meta.lora["unet"]["alpha"] / meta.lora["unet"]["rank"] == 2.0  # peft's default alpha 8 at r = 4
    assert len(meta.lora["vae_encoder"]["adapters"]["default_encoder"]) == len(vae_encoder_lora_targets(comps.vae))
    assert meta.parameterisation == {"osediff": "S", "tadsr": "R", "codsr": "N"}[layout]
    assert meta.defaults["timestep"] == {"osediff": 999, "tadsr": 500, "codsr": 100}[layout]
    assert ("unet_conv_in" in meta.modules) == (layout != "codsr")
    if layout == "codsr":
        assert {"default_encoder_alignment", "default_decoder_alignment"} <= set(meta.lora["unet"]["adapters"])
        gamma, _ = modules["lqfm"](torch.rand(1, 3, 32, 32) * 2 - 1)
        assert gamma.shape == (1, 32, 4, 4) and gamma.abs().sum() > 0
    if layout == "tadsr":  # our key mapping agrees with the TAE's own map of the official names
        official = TimeAwareEncoder.from_vae(comps.vae, TAEConfig.from_dict(meta.hyperparameters["tae"]))
        official.load_official_time_state_dict(ckpt["state_dict_vae_time"])
        x, t = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([100.0])
        with torch.no_grad():
            torch.testing.assert_close(modules["tae"](x, t), official(x, t))
            assert not torch.allclose(modules["tae"](x, t), modules["tae"](x, torch.tensor([500.0])))


def test_legacy_conv_in_naming_and_fp16_tensors():
    ckpt, reference = make_official("osediff", legacy_conv_in=True, half=True)
    _, comps, _ = _imported(ckpt, "osediff")
    torch.testing.assert_close(_unet(comps), _unet(reference), atol=5e-3, rtol=5e-3)


class _Payload:
    """Stands for arbitrary code in a pickle."""


def test_file_round_trip_and_refusals(tmp_path):
    ckpt, _ = make_official("osediff")
    torch.save(ckpt, tmp_path / "osediff.pkl")
    meta, _ = import_official(tmp_path / "osediff.pkl")
    assert meta.extra["source"] == "osediff.pkl" and len(meta.extra["source_sha256"]) == 64
    with pytest.raises(ValueError, match="--method tadsr was given, but the file has the osediff layout"):
        import_official(tmp_path / "osediff.pkl", method="tadsr")
    torch.save({"x": _Payload()}, tmp_path / "evil.pkl")
    with pytest.raises(ValueError, match="refused.*weights-only"):
        read_official(tmp_path / "evil.pkl")
    with pytest.raises(ValueError, match="unknown checkpoint layout; top-level keys found: \\['x'\\]"):
        detect_layout({"x": 1})


def test_missing_lora_tensors_are_listed():
    ckpt, _ = make_official("osediff")
    key = next(k for k in ckpt["state_dict_unet"] if ".lora_B." in k)
    del ckpt["state_dict_unet"][key]
    with pytest.raises(ValueError, match="lacks 1 LoRA tensors"):
        convert_official(ckpt)


def test_command_line_import_writes_a_loadable_bundle(tmp_path, capsys):
    from osd_comfy.cli import main
    from osd_core.bundle import load_bundle

    ckpt, _ = make_official("codsr")
    torch.save(ckpt, tmp_path / "codsr.pkl")
    assert main(["import", str(tmp_path / "codsr.pkl"), "--method", "codsr", "--out", str(tmp_path / "c.safetensors")]) == 0
    bundle = load_bundle(tmp_path / "c.safetensors")
    assert bundle.meta.method == "codsr" and "lqfm" in bundle.meta.modules
    assert "rank 4 (scale 2)" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "codsr.pkl"), "--method", "osediff", "--out", str(tmp_path / "o.st")]) == 1


def test_pkl_is_converted_once_next_to_it_and_reused(tmp_path):
    from osd_core.official_import import cached_bundle

    ckpt, _ = make_official("osediff")
    pkl = tmp_path / "osediff.pkl"
    torch.save(ckpt, pkl)
    original = pkl.read_bytes()
    path, note = cached_bundle(pkl)
    assert path.name == "osediff.onestep-sr.safetensors" and note.startswith("converted osediff.pkl (osediff")
    assert cached_bundle(pkl)[1].startswith("reused") and pkl.read_bytes() == original
    ckpt["rank_unet"] = RANK  # same content, new file bytes: a changed release is converted again
    ckpt["note"] = "v2"
    torch.save(ckpt, pkl)
    assert cached_bundle(pkl)[1].startswith("converted")


def test_load_model_node_converts_an_official_pkl(comfy, models_dir):
    from osd_comfy.demo import DEMO_BASE

    ckpt, _ = make_official("osediff")
    pkl = models_dir / "onestep_sr" / "official-osediff.pkl"
    cached = pkl.with_name("official-osediff.onestep-sr.safetensors")
    torch.save(ckpt, pkl)
    loader = comfy.node_classes()["OneStepSRLoadModel"]()
    try:
        # the official weights are for SD 2.1 ("sd2"); the tiny demo base refuses them, after the conversion
        with pytest.raises(ValueError, match="made for base family 'sd2'"):
            loader.load(DEMO_BASE, "official-osediff.pkl", "fp32")
        assert cached.is_file()
        _, summary = loader.load(DEMO_BASE, "none", "fp32")
        assert "plain SD" in summary
    finally:  # keep the session's model list as the other tests expect it
        pkl.unlink()
        cached.unlink(missing_ok=True)


def _tag_as_cuda(path) -> None:
    """Rewrite a torch.save zip so its tensors claim to live on cuda:0, as the released files do."""
    import zipfile

    with zipfile.ZipFile(path) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    data = next(name for name in entries if name.endswith("data.pkl"))
    entries[data] = entries[data].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, payload in entries.items():
            target.writestr(name, payload)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cuda_saved_file_loads_on_a_cpu_only_machine(tmp_path):
    ckpt, _ = make_official("osediff")
    path = tmp_path / "osediff.pkl"
    torch.save(ckpt, path)
    _tag_as_cuda(path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(str(path), weights_only=True)  # what the official loader (no map_location) would do here
    meta, tensors = import_official(path)
    assert meta.method == "osediff" and all(t.device.type == "cpu" for t in tensors.values())


# ---- PiSA-SR (CHECKPOINTS.md §5): pixel LoRA merged, semantic LoRA live ------------------------------------------

PISA_GROUPS = ("encoder", "decoder", "others")


def make_official_pisa(rank_pix: int = 4, rank_sem: int = 2, seed: int = 0) -> dict:
    """A pisa_sr.pkl dict in the official layout: six adapters default_{group}_{pix,sem} on one tiny U-Net over the
    same lists, random non-zero A and B, every U-Net entry containing "lora" (CHECKPOINTS.md §8)."""
    g = torch.Generator().manual_seed(seed)
    unet = tiny_components(seed=0).unet
    lists = unet_lora_targets(unet)
    for family, rank in (("pix", rank_pix), ("sem", rank_sem)):
        for group in PISA_GROUPS:
            inject_adapter_in_model(LoraConfig(r=rank, init_lora_weights="gaussian",
                                               target_modules=lists[f"default_{group}"]),
                                    unet, adapter_name=f"default_{group}_{family}")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    ckpt = {f"unet_lora_{group}_modules_{family}": list(lists[f"default_{group}"])
            for family in ("pix", "sem") for group in PISA_GROUPS}
    ckpt.update(lora_rank_unet_pix=rank_pix, lora_rank_unet_sem=rank_sem,
                state_dict_unet={k: v.clone() for k, v in unet.state_dict().items() if "lora" in k})
    return ckpt


def _merge_by_hand(unet, ckpt: dict, family: str) -> None:
    """W += (8/r)·reshape(B_flat @ A_flat) for every module of the family's three adapters (CHECKPOINTS.md §1)."""
    rank = ckpt[f"lora_rank_unet_{family}"]
    state = ckpt["state_dict_unet"]
    with torch.no_grad():
        for group in PISA_GROUPS:
            adapter = f"default_{group}_{family}"
            for module in ckpt[f"unet_lora_{group}_modules_{family}"]:
                a, b = state[f"{module}.lora_A.{adapter}.weight"], state[f"{module}.lora_B.{adapter}.weight"]
                weight = unet.get_submodule(module).weight
                weight.add_((b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * (8.0 / rank))


def official_pisa_unets(ckpt: dict):
    """PiSA-SR's loader replayed: (W0 + Δpix, W0 + Δpix + Δsem), both fully merged; the second is "--default"."""
    pix = tiny_components(seed=0).unet
    _merge_by_hand(pix, ckpt, "pix")
    default = copy.deepcopy(pix)
    _merge_by_hand(default, ckpt, "sem")
    return pix, default


def _pisa_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([1.0]), torch.randn(1, 77, 32, generator=g)


def _imported_pisa(ckpt, dtype=torch.float32):
    meta, tensors = convert_official(ckpt, method="pisa-sr", base_family=tiny_components().family)
    comps = tiny_components(seed=0, dtype=dtype)
    apply_bundle(comps, Bundle(meta=meta, tensors=tensors, path="pisa_sr.safetensors"))
    return meta, comps


@pytest.fixture(scope="module")
def pisa():
    ckpt = make_official_pisa(rank_pix=4, rank_sem=2)
    return ckpt, official_pisa_unets(ckpt), _imported_pisa(ckpt)


@pytest.mark.parametrize("lambda_pix,lambda_sem", [(1.0, 1.0), (1.0, 0.6), (0.8, 1.2)])
def test_pisa_import_reproduces_the_official_lambda_blend(pisa, lambda_pix, lambda_sem):
    _, (pix, default), (_, comps) = pisa
    z, t, c = _pisa_inputs()
    with torch.no_grad():
        eps_pix = pix(z, t, encoder_hidden_states=c).sample
        eps_ps = default(z, t, encoder_hidden_states=c).sample
        got = semantic_guidance(comps.unet, lambda_pix, lambda_sem)(z, t, c)
    assert not torch.allclose(eps_pix, eps_ps, atol=1e-3)  # the semantic LoRA does something
    torch.testing.assert_close(got, lambda_pix * eps_pix + lambda_sem * (eps_ps - eps_pix), atol=1e-5, rtol=1e-5)


def test_pisa_by_hand_merge_is_the_peft_forward():
    """Guards the reference: the six live peft adapters compute W0 + Δpix + Δsem, the by-hand "--default" merge."""
    ckpt = make_official_pisa(rank_pix=4, rank_sem=2)
    unet = tiny_components(seed=0).unet
    for family in ("pix", "sem"):
        _inject(unet, {f"default_{g}_{family}": ckpt[f"unet_lora_{g}_modules_{family}"] for g in PISA_GROUPS},
                ckpt[f"lora_rank_unet_{family}"])
    unet.load_state_dict(ckpt["state_dict_unet"], strict=False)
    z, t, c = _pisa_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(z, t, encoder_hidden_states=c).sample,
                                   official_pisa_unets(ckpt)[1](z, t, encoder_hidden_states=c).sample,
                                   atol=1e-5, rtol=1e-5)


def test_pisa_bundle_layout_and_metadata(pisa):
    ckpt, _, (meta, comps) = pisa
    assert detect_layout(ckpt) == "pisa-sr"
    assert meta.method == "pisa-sr" and meta.parameterisation == "P"
    assert meta.modules == ("unet_lora", "unet_sem_lora")  # no VAE LoRA, no conv_in
    assert (meta.lora_scale("unet"), meta.lora_scale("unet_sem")) == (2.0, 4.0)  # 8/4 and 8/2
    assert set(meta.lora["unet_sem"]["adapters"]) == {f"default_{g}_sem" for g in PISA_GROUPS}
    assert meta.defaults == {"timestep": 1, "tile_size": 96, "tile_overlap": 32, "color_fix": "adain", "prompt": "",
                             "lambda_pix": 1.0, "lambda_sem": 1.0}
    live = {name for layer in semantic_layers(comps.unet) for name in layer.lora_A}
    assert live == {f"default_{g}_sem" for g in PISA_GROUPS}  # only the semantic adapters stay peft layers
    assert not any(p.requires_grad for p in comps.unet.parameters())
    plain = tiny_components(seed=0)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(comps.vae.encode(x).latent_dist.mean, plain.vae.encode(x).latent_dist.mean)
    assert torch.equal(comps.unet.conv_in.get_base_layer().bias, plain.unet.conv_in.bias)


def test_pisa_bundle_file_round_trip_and_half_precision(tmp_path, pisa):
    ckpt, (_, default), (meta, _) = pisa
    torch.save(ckpt, tmp_path / "pisa_sr.pkl")
    meta, tensors = import_official(tmp_path / "pisa_sr.pkl")  # layout detected from the keys
    save_bundle(tmp_path / "p.safetensors", meta, tensors)
    bundle = load_bundle(tmp_path / "p.safetensors")
    assert "LoRA unet_sem: rank 2, alpha 8.0 (scale 4, kept live for lambda_sem)" in bundle.summary()
    half = tiny_components(seed=0, dtype=torch.bfloat16)
    apply_bundle(half, bundle)
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}
    z, t, c = _pisa_inputs()
    with torch.no_grad():
        got = semantic_guidance(half.unet, 1.0, 0.6)(z.bfloat16(), t, c.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    with torch.no_grad():
        torch.testing.assert_close(half.unet(z.bfloat16(), t, encoder_hidden_states=c.bfloat16()).sample.float(),
                                   default(z, t, encoder_hidden_states=c).sample, atol=0.05, rtol=0.05)


def test_pisa_missing_keys_are_listed(caplog):
    ckpt = make_official_pisa()
    del ckpt["lora_rank_unet_sem"]
    with pytest.raises(ValueError, match=r"looks like pisa-sr but lacks \['lora_rank_unet_sem'\]"):
        convert_official(ckpt)
    with pytest.raises(ValueError, match=r"--method pisa-sr was given, but the file lacks .*\['lora_rank_unet_sem'\]"):
        convert_official(ckpt, method="pisa-sr")
    ckpt = make_official_pisa()
    key = next(k for k in ckpt["state_dict_unet"] if ".lora_B.default_decoder_sem." in k)
    del ckpt["state_dict_unet"][key]
    with pytest.raises(ValueError, match=r"lacks 1 LoRA tensors .*" + key.replace(".", r"\.")):
        convert_official(ckpt)


def test_pisa_unexpected_keys_are_reported_and_left_out(caplog):
    ckpt = make_official_pisa()
    ckpt["optimizer"] = {"step": 3}
    ckpt["state_dict_unet"]["conv_in.base_layer.weight"] = torch.zeros(32, 4, 3, 3)
    ckpt["state_dict_unet"]["mid_block.resnets.0.conv1.lora_A.default_others_extra.weight"] = torch.zeros(4, 64, 3, 3)
    with caplog.at_level(logging.WARNING, logger="osd_core.official_import"):
        meta, tensors = convert_official(ckpt)
    assert "['optimizer']" in caplog.text and "conv_in.base_layer.weight" in caplog.text
    assert "default_others_extra" in caplog.text
    assert not any("extra" in k or "base_layer" in k for k in tensors) and "unet_conv_in" not in meta.modules


def test_command_line_imports_pisa_sr(tmp_path, capsys):
    from osd_comfy.cli import main

    torch.save(make_official_pisa(rank_pix=4, rank_sem=2), tmp_path / "pisa_sr.pkl")
    out = tmp_path / "pisa_sr.safetensors"
    assert main(["import", str(tmp_path / "pisa_sr.pkl"), "--method", "pisa-sr", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unet LoRA rank 4 (scale 2), unet_sem LoRA rank 2 (scale 4)" in printed and "'timestep': 1" in printed
    assert load_bundle(out).meta.method == "pisa-sr"
    assert main(["import", str(tmp_path / "pisa_sr.pkl"), "--method", "codsr", "--out", str(out)]) == 1
    assert "the file has the pisa-sr layout" in capsys.readouterr().err


# ---- TADSR's time_vae/ folder (CHECKPOINTS.md §3) ------------------------------------------------------------------

def write_time_vae(folder, ckpt, *, changed=(), decoder_changed=False, suffix="safetensors"):
    """A diffusers-format time_vae/ folder from the tiny VAE plus the .pkl's time layers; ``changed`` encoder
    weights (and optionally a decoder weight) are moved away from the base VAE."""
    state = {k: v.clone() for k, v in tiny_components(seed=0).vae.state_dict().items()}
    for key in changed:
        state[key] += 0.01
    if decoder_changed:
        state["decoder.conv_out.weight"] += 0.01
    state.update({k: v.clone() for k, v in ckpt["state_dict_vae_time"].items()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "TimeAwareAutoencoderKL", "latent_channels": 4}))
    if suffix == "safetensors":
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return state


CHANGED = ("encoder.conv_in.weight", "encoder.down_blocks.1.resnets.0.conv1.weight", "quant_conv.bias")


def _official_tadsr_vae(ckpt, folder_state):
    """TADSR's loader replayed for the VAE: built from the folder's weights, then its LoRA injected and copied."""
    vae = tiny_components(seed=0).vae
    vae.load_state_dict({k: v for k, v in folder_state.items() if "time" not in k}, strict=True)
    _inject(vae, {"default_encoder": list(dict.fromkeys(ckpt["vae_lora_encoder_modules"]))}, RANK)
    vae.load_state_dict(ckpt["state_dict_vae"], strict=False)
    return vae


def test_time_vae_encoder_weights_that_differ_are_imported(tmp_path, caplog):
    ckpt, _ = make_official("tadsr")
    torch.save(ckpt, tmp_path / "tadsr.pkl")
    state = write_time_vae(tmp_path / "time_vae", ckpt, changed=CHANGED, decoder_changed=True)
    with caplog.at_level(logging.WARNING, logger="osd_core.official_time_vae"):
        meta, tensors = import_official(tmp_path / "tadsr.pkl", time_vae=tmp_path / "time_vae",
                                        base_vae=tiny_components(seed=0).vae)
    assert "decoder side differs from the base in 1 tensors" in caplog.text
    assert {k for k in tensors if k.startswith("vae_encoder_base.")} == {f"vae_encoder_base.{k}" for k in CHANGED}
    assert meta.extra["time_vae"].startswith("time_vae: 3 of ") and "vae_encoder_base" in meta.modules
    meta = type(meta)(**{**vars(meta), "base_family": tiny_components().family})
    comps = tiny_components(seed=0)
    apply_bundle(comps, Bundle(meta=meta, tensors=tensors, path="tadsr.safetensors"))
    official = _encode_mean(_official_tadsr_vae(ckpt, state))
    torch.testing.assert_close(_vae(comps), official, atol=1e-5, rtol=1e-5)
    stock = _encode_mean(_official_tadsr_vae(ckpt, write_time_vae(tmp_path / "stock", ckpt)))
    assert not torch.allclose(official, stock, atol=1e-4)  # the changed encoder weights matter


def test_time_vae_equal_to_the_base_is_a_verified_check(tmp_path):
    ckpt, _ = make_official("tadsr")
    state = write_time_vae(tmp_path / "time_vae", ckpt, suffix="bin")
    assert read_time_vae(tmp_path / "time_vae").keys() == state.keys()
    stored, note = encoder_base_tensors(state, tiny_components(seed=0).vae)
    assert stored == {} and note.startswith("time_vae: verified")
    everything, note = encoder_base_tensors(state)  # no base to compare with: the whole encoding path is kept
    assert set(everything) == {k for k in state if k.startswith(("encoder.", "quant_conv.")) and "time" not in k}
    meta, tensors = convert_official(ckpt, encoder_base=stored, encoder_note="verified")
    assert "vae_encoder_base" not in meta.modules and meta.extra["time_vae"] == "verified"


def test_time_vae_refusals(tmp_path):
    ckpt, _ = make_official("tadsr")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        read_time_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="describes a 'UNet2DConditionModel'"):
        read_time_vae(tmp_path)
    state = write_time_vae(tmp_path / "time_vae", ckpt)
    other = tiny_components(seed=0).vae
    other.encoder.conv_in = torch.nn.Conv2d(3, 16, 3, padding=1)
    with pytest.raises(ValueError, match="made for another base model"):
        encoder_base_tensors(state, other)
    with pytest.raises(ValueError, match="--time-vae is TADSR's time_vae/ folder, but the file has the osediff"):
        convert_official(make_official("osediff")[0], encoder_base={})


def test_command_line_time_vae_with_base(tmp_path, capsys):
    from osd_comfy.cli import main

    ckpt, _ = make_official("tadsr")
    torch.save(ckpt, tmp_path / "tadsr.pkl")
    write_time_vae(tmp_path / "time_vae", ckpt, changed=CHANGED[:1])
    save_tiny_diffusers(tmp_path / "base", seed=0)
    out = tmp_path / "tadsr.safetensors"
    argv = ["import", str(tmp_path / "tadsr.pkl"), "--time-vae", str(tmp_path / "time_vae"), "--out", str(out)]
    assert main([*argv, "--base", str(tmp_path / "base")]) == 0
    assert "time_vae: 1 of" in capsys.readouterr().out
    assert set(load_bundle(out).component("vae_encoder_base")) == {CHANGED[0]}
    assert main(["import", str(tmp_path / "tadsr.pkl"), "--base", str(tmp_path / "base"), "--out", str(out)]) == 1
    assert "--base is only used with --time-vae" in capsys.readouterr().err
