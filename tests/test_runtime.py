"""The in-process ComfyUI runtime: validation and run-time errors surface with the node, pack loading fails loudly."""

from __future__ import annotations

import pytest
import torch

from conftest import demo_workflow, node_of, write_image
from osd_comfy.demo import DEMO_BASE, DEMO_BUNDLES
from osd_comfy.runtime import WorkflowError


def test_core_nodes_and_pack_nodes_are_registered(comfy):
    classes = comfy.node_classes()
    assert {"LoadImage", "SaveImage", "ImageBatch", "OneStepSRDenoise", "OneStepSRLoadModel"} <= set(classes)
    for name, node_class in classes.items():
        if name.startswith("OneStepSR"):
            assert node_class.DESCRIPTION and node_class.CATEGORY.startswith("OneStep SR")
            for section in node_class.INPUT_TYPES().values():
                for input_name, declaration in section.items():
                    assert declaration[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_invalid_value_names_the_node_and_input(comfy, input_dir):
    image = write_image(input_dir, "v.png", 16, 16)
    prompt = demo_workflow("osediff", image)
    prompt[node_of(prompt, "OneStepSRColorFix")]["inputs"]["method"] = "lab"
    with pytest.raises(WorkflowError, match=r"OneStepSRColorFix.*method"):
        comfy.run(prompt)


def test_unknown_node_type(comfy):
    with pytest.raises(WorkflowError, match="NotANode"):
        comfy.run({"1": {"class_type": "NotANode", "inputs": {}}})


def test_node_exception_carries_node_id_and_message(comfy, input_dir):
    image = write_image(input_dir, "w.png", 16, 16)
    prompt = demo_workflow("osediff", image, vae_tile_overlap=200)
    with pytest.raises(WorkflowError, match=r"node \d+ \(OneStepSREncode\) raised ValueError: `tile_overlap`"):
        comfy.run(prompt)


def test_broken_pack_fails_with_its_traceback(comfy, tmp_path):
    pack = tmp_path / "broken_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text("raise ImportError('the broken pack says no')\n")
    with pytest.raises(RuntimeError, match="the broken pack says no"):
        comfy.load_pack(pack)


def test_denoise_node_reports_progress_per_tile_and_can_be_cancelled(comfy):
    classes = comfy.node_classes()
    import comfy.model_management as mm  # ComfyUI's own package (the fixture booted it)
    import comfy.utils as comfy_utils

    (model,) = classes["OneStepSRLoadModel"]().load(DEMO_BASE, DEMO_BUNDLES["osediff"], "auto")
    image = torch.rand(1, 64, 48, 3)
    (latent,) = classes["OneStepSREncode"]().encode(model, image, 2.0, "mode", 0, 128, 16, 67.1)
    (cond,) = classes["OneStepSRTextConditioning"]().encode(model, "")
    (t,) = classes["OneStepSRTimestep"]().make(999.0)
    updates = []
    comfy_utils.set_progress_bar_global_hook(lambda value, total, preview=None, *rest: updates.append((value, total)))
    try:
        classes["OneStepSRDenoise"]().denoise(model, latent, cond, t, 8, 0)
        assert updates == [(1, 4), (2, 4), (3, 4), (4, 4)]  # a 16 x 12 latent in 8 x 8 tiles
        mm.interrupt_current_processing(True)
        with pytest.raises(mm.InterruptProcessingException):
            classes["OneStepSRDenoise"]().denoise(model, latent, cond, t, 8, 0)
    finally:
        mm.interrupt_current_processing(False)
        comfy_utils.set_progress_bar_global_hook(None)
