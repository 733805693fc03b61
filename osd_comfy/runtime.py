"""Boot a real ComfyUI in-process and run API-format workflows through its own executor.

ComfyUI keeps global state (its argument parser, ``folder_paths``, ``nodes.NODE_CLASS_MAPPINGS``), so there is one
runtime per process. Only this pack is loaded as a custom node, through ``nodes.load_custom_node`` exactly as
ComfyUI's start-up does; core nodes (LoadImage, SaveImage, CLIPVisionLoader, ...) come with ``nodes.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .locate import find_comfyui, pack_root

logger = logging.getLogger(__name__)

PACK_MODULE_NAME = "comfyui-onestep-sr"
SHIM_DIR = Path(__file__).parent / "shims"
PACK_MODEL_FOLDERS = ("onestep_sr",)


class WorkflowError(RuntimeError):
    """A workflow failed validation or a node raised while it ran."""


@dataclass
class RunResult:
    """``outputs``: node id -> tuple with one value per output slot (ComfyUI's per-slot lists unwrapped when they
    hold a single value); ``ui``: what output nodes report to the editor; ``messages``: the executor's status."""

    outputs: dict[str, tuple]
    ui: dict[str, Any]
    messages: list


class _Server:
    """The few attributes of ComfyUI's PromptServer that the executor touches."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None) -> None:
        return None


def _await(value):
    return asyncio.run(value) if inspect.iscoroutine(value) else value


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.stream = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")


class ComfyRuntime:
    _instance: ComfyRuntime | None = None

    def __init__(self, comfy_dir: Path) -> None:
        self.comfy_dir = comfy_dir
        import execution
        import folder_paths
        import nodes

        self.execution, self.folder_paths, self.nodes = execution, folder_paths, nodes

    # ---- boot ----------------------------------------------------------------------------------------------------

    @classmethod
    def boot(cls, comfy_dir=None, *, models_dir=None, input_dir=None, output_dir=None) -> ComfyRuntime:
        """Start ComfyUI once per process (idempotent), point its folders, and load this pack."""
        folder = find_comfyui(comfy_dir)
        if cls._instance is None:
            cls._import_comfy(folder)
            runtime = cls(folder)
            runtime._load_extra_model_paths()
            cls._instance = runtime
            runtime.set_folders(models_dir=models_dir, input_dir=input_dir, output_dir=output_dir)
            runtime.load_pack(pack_root())
            return runtime
        runtime = cls._instance
        if runtime.comfy_dir != folder:
            raise RuntimeError(
                f"ComfyUI from {runtime.comfy_dir} is already running in this process; cannot also start {folder}."
            )
        runtime.set_folders(models_dir=models_dir, input_dir=input_dir, output_dir=output_dir)
        return runtime

    @staticmethod
    def _import_comfy(folder: Path) -> None:
        loaded = sys.modules.get("nodes")
        if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(folder)):
            raise RuntimeError(
                f"a module named `nodes` is already imported from {getattr(loaded, '__file__', '?')}, which would "
                "shadow ComfyUI's nodes.py. Run with `pytest` / `onestep-sr`, not from the pack's folder on sys.path."
            )
        sys.path.insert(0, str(folder))
        argv = sys.argv
        sys.argv = [argv[0]] + ([] if _cuda_available() else ["--cpu"])
        stand_in = importlib.util.find_spec("torchvision") is None
        if stand_in:
            # transformers and diffusers decide once whether torchvision exists; let them see the truth first.
            _preload_model_libraries()
            logger.info("torchvision is not installed; ComfyUI starts with the stand-in in %s", SHIM_DIR)
            sys.modules["torchvision"] = _torchvision_stand_in()
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses sys.argv once, now)
            import execution  # noqa: F401
            import nodes  # noqa: F401
        finally:
            sys.argv = argv
            if stand_in:
                # ComfyUI's modules keep their reference; nobody else may mistake the stand-in for torchvision.
                del sys.modules["torchvision"]

    def _load_extra_model_paths(self) -> None:
        """Read ComfyUI's extra_model_paths.yaml the way its main.py does."""
        yaml_path = self.comfy_dir / "extra_model_paths.yaml"
        if not yaml_path.is_file():
            return
        import yaml

        config = yaml.safe_load(yaml_path.read_text()) or {}
        for section in config.values():
            if not section:
                continue
            base = section.pop("base_path", None)
            for folder_name, paths in section.items():
                for entry in str(paths).split("\n"):
                    if entry:
                        full = os.path.join(base, entry) if base else entry
                        self.folder_paths.add_model_folder_path(folder_name, full)

    def set_folders(self, *, models_dir=None, input_dir=None, output_dir=None) -> None:
        """Put ``models_dir``'s subfolders first in every model folder list; set input/output folders."""
        fp = self.folder_paths
        if models_dir is not None:
            for name in set(fp.folder_names_and_paths) | set(PACK_MODEL_FOLDERS):
                path = str(Path(models_dir) / name)
                paths, extensions = fp.folder_names_and_paths.get(name, ([], {".safetensors"}))
                if path not in paths:
                    paths.insert(0, path)
                fp.folder_names_and_paths[name] = (paths, extensions)
            getattr(fp, "filename_list_cache", {}).clear()
        if input_dir is not None:
            fp.set_input_directory(str(input_dir))
        if output_dir is not None:
            fp.set_output_directory(str(output_dir))

    @contextmanager
    def using_folders(self, *, input_dir, output_dir) -> Iterator[None]:
        """Use these input/output folders for the duration of the block, then restore the previous ones."""
        fp = self.folder_paths
        previous = fp.get_input_directory(), fp.get_output_directory()
        self.set_folders(input_dir=input_dir, output_dir=output_dir)
        try:
            yield
        finally:
            self.set_folders(input_dir=previous[0], output_dir=previous[1])

    def load_pack(self, root: Path) -> None:
        """Load a custom-node pack from ``root`` exactly as ComfyUI does; raise with its traceback if that fails."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", root.name):
            link_dir = Path(tempfile.mkdtemp(prefix="onestep-sr-pack-"))
            (link_dir / PACK_MODULE_NAME).symlink_to(root, target_is_directory=True)
            root = link_dir / PACK_MODULE_NAME
        capture = _Capture()
        logging.getLogger().addHandler(capture)
        try:
            loaded = _await(self.nodes.load_custom_node(str(root)))
        finally:
            logging.getLogger().removeHandler(capture)
        if loaded is False:
            raise RuntimeError(f"ComfyUI could not load the pack at {root}:\n{capture.stream.getvalue()}")

    # ---- running -------------------------------------------------------------------------------------------------

    def node_classes(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def _validate(self, prompt: dict, prompt_id: str):
        validate = self.execution.validate_prompt
        params = inspect.signature(validate).parameters
        args = (prompt_id, prompt, None) if len(params) >= 3 else (prompt,)
        return _await(validate(*args))

    def run(self, prompt: dict, *, prompt_id: str | None = None) -> RunResult:
        """Validate and execute an API-format prompt with a fresh executor; raise WorkflowError on any error."""
        prompt_id = prompt_id or uuid.uuid4().hex
        unknown = sorted({n["class_type"] for n in prompt.values()} - set(self.node_classes()))
        if unknown:
            raise WorkflowError(f"the workflow uses node types this ComfyUI does not have: {unknown}")
        valid, error, outputs, node_errors = self._validate(prompt, prompt_id)[:4]
        if not valid:
            raise WorkflowError(_format_validation(error, node_errors, prompt))
        executor = self.execution.PromptExecutor(_Server())
        _await(executor.execute(prompt, prompt_id, {}, list(outputs)))
        failure = next((data for event, data in executor.status_messages if event == "execution_error"), None)
        if failure is not None or not executor.success:
            raise WorkflowError(_format_failure(failure))
        return RunResult(outputs=self._outputs(executor, prompt), ui=dict(executor.outputs_ui),
                         messages=list(executor.status_messages))

    @staticmethod
    def _outputs(executor, prompt: dict) -> dict[str, tuple]:
        raw = getattr(executor, "outputs", None)
        if raw is None:  # newer ComfyUI keeps outputs in its cache set
            raw = {node: executor.caches.outputs.get(node) for node in prompt}
            raw = {k: (v.outputs if hasattr(v, "outputs") else v) for k, v in raw.items() if v is not None}
        return {node: tuple(slot[0] if isinstance(slot, list) and len(slot) == 1 else slot for slot in slots)
                for node, slots in raw.items()}


def _preload_model_libraries() -> None:
    """Resolve the lazy imports of diffusers, transformers and peft that the pack uses."""
    import diffusers.loaders.peft  # noqa: F401
    import peft  # noqa: F401
    import transformers.image_utils  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel  # noqa: F401


def _torchvision_stand_in():
    spec = importlib.util.spec_from_file_location("torchvision", SHIM_DIR / "torchvision" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _format_validation(error, node_errors, prompt) -> str:
    lines = [f"the workflow is invalid: {error.get('message', error) if isinstance(error, dict) else error}"]
    for node_id, info in (node_errors or {}).items():
        for reason in info.get("errors", []):
            name = reason.get("extra_info", {}).get("input_name", "")
            lines.append(f"  node {node_id} ({prompt[node_id]['class_type']}) {name}: "
                         f"{reason.get('message')}: {reason.get('details')}")
    return "\n".join(lines)


def _format_failure(failure) -> str:
    if failure is None:
        return "the workflow failed without an error message (interrupted?)"
    trace = "".join(failure.get("traceback", []))
    return (f"node {failure['node_id']} ({failure['node_type']}) raised {failure['exception_type']}: "
            f"{failure['exception_message']}\n{trace}")
