"""Importing the official OSEDiff / TADSR / CODSR .pkl layouts (CHECKPOINTS.md §1–4, recipes of §8).

Synthetic checkpoints are built from the tiny models exactly as the official savers lay them out, with random
non-zero LoRA B matrices; the reference is the official loading rule replayed here (peft injection from the saved
lists with peft's default alpha, tensor copy, every adapter active, conv_in replaced for OSEDiff/TADSR only).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from osd_core.adapters import apply_bundle
from osd_core.bundle import Bundle
from osd_core.lora import unet_lora_targets, vae_encoder_lora_targets
from osd_core.method_modules import load_method_modules
from osd_core.official_import import convert_official, detect_layout, import_official, read_official
from osd_core.tae import TAEConfig, TimeAwareEncoder
from osd_core.tiny import tiny_components

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
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        return comps.vae.encode(x).latent_dist.mean


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
