"""The shipped workflows run inside a real ComfyUI (in-process, its own PromptExecutor) on the tiny demo models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import WORKFLOWS, demo_workflow, node_of, write_image
from osd_comfy.demo import DEMO_BUNDLES
from osd_comfy.runtime import WorkflowError
from osd_comfy.workflow_format import build, shipped_workflows, ui_to_api, ui_twin

SHIPPED = [p.name[: -len("_api.json")] for p in shipped_workflows()]


def _output(comfy, prompt) -> torch.Tensor:
    result = comfy.run(prompt)
    source, slot = prompt[node_of(prompt, "SaveImage")]["inputs"]["images"]
    return result.outputs[source][slot]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_runs_with_exact_size_range_and_determinism(comfy, input_dir, name):
    image = write_image(input_dir, "odd_37x29.png", 37, 29)
    first = _output(comfy, demo_workflow(name, image))
    again = _output(comfy, demo_workflow(name, image))
    assert first.shape == (1, 29 * 4, 37 * 4, 3)
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", SHIPPED)
def test_ui_twin_is_the_same_graph(comfy, name):
    api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    ui = json.loads(ui_twin(WORKFLOWS / f"{name}_api.json").read_text())
    assert ui_to_api(ui, comfy.node_classes()) == api


def test_ui_files_and_templates_are_fresh(comfy):
    assert build(comfy.node_classes(), check=True) == [], "run: python -m osd_comfy.workflow_format build"


def test_float_factor_gives_exact_size(comfy, input_dir):
    image = write_image(input_dir, "odd_33x21.png", 33, 21)
    out = _output(comfy, demo_workflow("osediff", image, upscale_factor=2.37))
    assert out.shape == (1, round(21 * 2.37), round(33 * 2.37), 3)


def test_seed_changes_the_sampled_latent(comfy, input_dir):
    image = write_image(input_dir, "seed.png", 24, 24)
    a = _output(comfy, demo_workflow("osediff", image, seed=1))
    b = _output(comfy, demo_workflow("osediff", image, seed=2))
    assert not torch.equal(a, b)


def test_plain_sd_without_bundle_runs(comfy, input_dir):
    image = write_image(input_dir, "plain.png", 16, 16)
    prompt = demo_workflow("osediff", image)
    prompt[node_of(prompt, "OneStepSRLoadModel")]["inputs"]["bundle"] = "none"
    with_bundle = _output(comfy, demo_workflow("osediff", image))
    plain = _output(comfy, prompt)
    assert plain.shape == with_bundle.shape == (1, 64, 64, 3)
    assert not torch.equal(plain, with_bundle)


def _batched(prompt: dict, second: str) -> dict:
    """The same graph on a batch of two images: LoadImage + a second LoadImage joined by ImageBatch."""
    loader = node_of(prompt, "LoadImage")
    prompt["100"] = {"class_type": "LoadImage", "inputs": {"image": second}}
    prompt["101"] = {"class_type": "ImageBatch", "inputs": {"image1": [loader, 0], "image2": ["100", 0]}}
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if value == [loader, 0] and node["class_type"] != "ImageBatch":
                node["inputs"][key] = ["101", 0]
    del prompt[node_of(prompt, "OneStepSREncode")]["inputs"]["mask"]
    return prompt


@pytest.mark.parametrize("name", SHIPPED)
def test_batch_items_equal_single_runs(comfy, input_dir, name):
    first = write_image(input_dir, "batch_a.png", 20, 16, seed=1)
    second = write_image(input_dir, "batch_b.png", 20, 16, seed=2)
    batch = _output(comfy, _batched(demo_workflow(name, first, tile_size=8, tile_overlap=0), second))
    assert batch.shape[0] == 2
    for index, image in enumerate((first, second)):
        single = _output(comfy, demo_workflow(name, image, tile_size=8, tile_overlap=0))
        torch.testing.assert_close(batch[index:index + 1], single, atol=1e-5, rtol=1e-5)


def test_idas_s_changes_the_output(comfy, input_dir):
    image = write_image(input_dir, "idas_s.png", 24, 24)
    structural = _output(comfy, demo_workflow("idas", image, s=0.0))
    generative = _output(comfy, demo_workflow("idas", image, s=0.6))
    assert not torch.allclose(structural, generative, atol=1e-3)


def test_mine_and_chariot_give_per_sample_timesteps(comfy, input_dir):
    first = write_image(input_dir, "ts_a.png", 24, 16, seed=3)
    second = write_image(input_dir, "ts_b.png", 24, 16, seed=4)
    prompt = _batched(demo_workflow("idas", first), second)
    result = comfy.run(prompt)
    tau = result.outputs[node_of(prompt, "OneStepSRMINEEstimate")][0].t
    t_prime = result.outputs[node_of(prompt, "OneStepSRChariotMix")][0].t
    assert tau.shape == t_prime.shape == (2,) and tau[0] != tau[1]
    torch.testing.assert_close(t_prime, tau + 0.6 * (999 - tau))


def test_missing_module_names_the_bundle_and_the_provider(comfy, input_dir):
    image = write_image(input_dir, "nomine.png", 16, 16)
    prompt = demo_workflow("idas", image)
    prompt[node_of(prompt, "OneStepSRLoadModel")]["inputs"]["bundle"] = DEMO_BUNDLES["osediff"]
    with pytest.raises(WorkflowError, match=r"onestep-demo-osediff\.safetensors has no `mine`.*IDaS-SR bundle"):
        comfy.run(prompt)


def test_alpha_is_upscaled_and_returned_as_mask(comfy, input_dir):
    image = write_image(input_dir, "rgba.png", 24, 16, alpha=True)
    prompt = demo_workflow("osediff", image)
    result = comfy.run(prompt)
    mask = result.outputs[node_of(prompt, "OneStepSRDecode")][1]
    assert mask.shape == (1, 64, 96)
    # LoadImage's mask is 1 - alpha; the alpha ramps 0 -> 1 left to right, so the mask falls.
    assert float(mask[0, :, 0].mean()) > 0.9 and float(mask[0, :, -1].mean()) < 0.1


def test_bad_tile_size_is_reported_by_the_node(comfy, input_dir):
    image = write_image(input_dir, "tile.png", 16, 16)
    with pytest.raises(WorkflowError, match="multiple of 8"):
        comfy.run(demo_workflow("osediff", image, tile_size=100))


def test_pixel_cap_is_reported_with_the_fix(comfy, input_dir):
    image = write_image(input_dir, "cap.png", 64, 64)  # x4 = 0.065 MP > 0.01 MP
    with pytest.raises(WorkflowError, match="max_output_megapixels"):
        comfy.run(demo_workflow("osediff", image, max_output_megapixels=0.01))


def test_missing_bundle_is_a_validation_error(comfy, input_dir):
    image = write_image(input_dir, "missing.png", 16, 16)
    prompt = demo_workflow("osediff", image)
    prompt[node_of(prompt, "OneStepSRLoadModel")]["inputs"]["bundle"] = "nope.safetensors"
    with pytest.raises(WorkflowError, match="bundle"):
        comfy.run(prompt)


@pytest.mark.parametrize("level,t", [("fidelity", 250.0), ("neutral", 500.0), ("realism", 750.0)])
def test_rcod_levels_are_the_ldg_timesteps(comfy, input_dir, level, t):
    image = write_image(input_dir, "rcod_level.png", 16, 16)
    prompt = demo_workflow("rcod", image, level=level)
    result = comfy.run(prompt)
    assert result.outputs[node_of(prompt, "OneStepSRRealismLevel")][0].t.tolist() == [t]


def test_rcod_adaptive_level_uses_mem_per_image(comfy, input_dir):
    first = write_image(input_dir, "adapt_a.png", 16, 16, seed=5)
    second = write_image(input_dir, "adapt_b.png", 16, 16, seed=6)
    prompt = _batched(demo_workflow("rcod", first, level="adaptive"), second)
    level = node_of(prompt, "OneStepSRRealismLevel")
    with pytest.raises(WorkflowError, match="needs `clip_vision`"):
        comfy.run(prompt)
    prompt[level]["inputs"]["clip_vision"] = [node_of(prompt, "CLIPVisionLoader"), 0]
    t = comfy.run(prompt).outputs[level][0].t
    assert t.shape == (2,) and set(t.tolist()) <= {250.0, 500.0, 750.0}


def test_tadsr_timestep_reaches_the_time_aware_encoder(comfy, input_dir):
    image = write_image(input_dir, "tadsr_t.png", 16, 16)
    latents = []
    for t in (100.0, 500.0):
        prompt = demo_workflow("tadsr", image, timestep=t)
        latents.append(comfy.run(prompt).outputs[node_of(prompt, "OneStepSREncode")][0].z)
    prompt = demo_workflow("tadsr", image)
    del prompt[node_of(prompt, "OneStepSREncode")]["inputs"]["timestep"]
    plain = comfy.run(prompt).outputs[node_of(prompt, "OneStepSREncode")][0].z
    assert not torch.allclose(latents[0], latents[1]) and not torch.allclose(latents[1], plain)


def test_pisa_sr_lambdas_blend_the_pixel_and_semantic_passes(comfy, input_dir, models_dir):
    """A synthetic official pisa_sr.pkl, converted for the tiny demo base (the real file is for SD 2.1), runs in the
    shipped workflow; the denoise output is affine in (λ_pix, λ_sem) exactly as PiSA-SR's blend says."""
    from osd_core.bundle import save_bundle
    from osd_core.official_import import convert_official
    from osd_core.tiny import tiny_components
    from test_official_import import make_official_pisa

    bundle = models_dir / "onestep_sr" / "pisa_sr-tiny-official.safetensors"
    save_bundle(bundle, *convert_official(make_official_pisa(), base_family=tiny_components().family))
    image = write_image(input_dir, "pisa.png", 16, 16)

    def latents(lambda_pix: float, lambda_sem: float):
        prompt = demo_workflow("pisa_sr", image, lambda_pix=lambda_pix, lambda_sem=lambda_sem)
        prompt[node_of(prompt, "OneStepSRLoadModel")]["inputs"]["bundle"] = bundle.name
        outputs = comfy.run(prompt).outputs
        return outputs[node_of(prompt, "OneStepSREncode")][0].z, outputs[node_of(prompt, "OneStepSRDenoise")][0].z

    try:
        z_lq, both = latents(1.0, 1.0)
        _, pixel = latents(1.0, 0.0)
        _, mixed = latents(0.8, 1.2)
        _, again = latents(1.0, 1.0)  # the cached model, offloaded in between, still has its live adapters
    finally:
        bundle.unlink()
    eps_pix, eps_ps = z_lq - pixel, z_lq - both  # x0 = z_L - eps (parameterisation P)
    assert not torch.allclose(both, pixel, atol=1e-4)
    torch.testing.assert_close(mixed, z_lq - (0.8 * eps_pix + 1.2 * (eps_ps - eps_pix)), atol=1e-4, rtol=1e-4)
    assert torch.equal(again, both)


def test_lambdas_need_a_pisa_sr_bundle(comfy, input_dir):
    image = write_image(input_dir, "nolambda.png", 16, 16)
    with pytest.raises(WorkflowError, match=r"lambda_sem` = 0.6 need a PiSA-SR bundle.*onestep-demo-osediff"):
        comfy.run(demo_workflow("osediff", image, lambda_sem=0.6))
