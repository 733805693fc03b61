"""Boot a real ComfyUI in-process and run API-format workflows through its own executor.

ComfyUI keeps global state (its argument parser, ``folder_paths``, ``nodes.NODE_CLASS_MAPPINGS``), so there is one
runtime per process: ``ComfyRuntime.boot`` is idempotent and refuses a second, different ComfyUI folder. Only this
pack is loaded as a custom node, through ``nodes.load_custom_node`` exactly as ComfyUI's start-up does (neither the
``custom_nodes/`` folder nor ``comfy_extras``); core nodes (LoadImage, SaveImage, ImageScaleBy, CLIPVisionLoader, ...)
come with ``nodes.py``. No HTTP server is started: a small stand-in object plays the server's part for the executor.

Works with the vendored ComfyUI of 2024-03 (synchronous ``validate_prompt(prompt)``) and with newer checkouts
(``async validate_prompt(prompt_id, prompt, partial_execution_list)``, async ``load_custom_node``, outputs kept in
``executor.caches``): the call shapes are read from the signatures, not from a version number.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import importlib.util
import inspect
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .locate import find_comfyui, pack_root

logger = logging.getLogger(__name__)

PACK_MODULE_NAME = "comfyui-onestep-sr"
SHIM_DIR = Path(__file__).parent / "shims"
# Folders a models directory is searched for even when this ComfyUI does not register them (yet): the pack adds
# ``onestep_sr`` itself when it loads, and ``diffusers``/``clip_vision`` exist in every ComfyUI we know of.
MODEL_FOLDERS = ("checkpoints", "diffusers", "onestep_sr", "clip_vision")
NOT_MODEL_FOLDERS = ("custom_nodes",)
# ComfyUI's top-level modules; a module of the same name imported from elsewhere would be used instead of them.
COMFY_MODULES = ("nodes", "execution", "folder_paths", "comfy")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class ComfyBootError(RuntimeError):
    """ComfyUI could not be started in this process, or the pack could not be loaded into it."""


class WorkflowError(RuntimeError):
    """A workflow failed validation, or a node raised while it ran.

    ``summary`` names the node(s), input(s) and the problem; ``node_traceback`` is the failing node's traceback
    (empty for validation errors). ``str()`` gives both.
    """

    def __init__(self, summary: str, *, node_traceback: str = "") -> None:
        super().__init__(f"{summary}\n{node_traceback}".rstrip("\n"))
        self.summary = summary
        self.node_traceback = node_traceback


@dataclass(frozen=True)
class RunResult:
    """What a run produced.

    ``outputs``: node id -> one entry per output slot, for every node that ran. ComfyUI keeps each slot as a list
    with one value per list item (``OUTPUT_IS_LIST`` nodes or list inputs give several); a slot holding exactly one
    value is unwrapped to that value (an IMAGE slot is the (B, H, W, C) tensor itself), a slot with several stays a
    list. ``ui``: node id -> what output nodes report to the editor (e.g. SaveImage's ``{"images": [...]}``).
    ``messages``: the executor's ``(event, data)`` status messages.
    """

    outputs: dict[str, tuple]
    ui: dict[str, dict] = field(default_factory=dict)
    messages: list[tuple[str, dict]] = field(default_factory=list)


class _ServerStandIn:
    """The attributes of ComfyUI's PromptServer that the executor touches when no client is connected."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None) -> None:
        """Nobody is listening: progress and status events go nowhere (the executor also keeps its messages)."""


class ComfyRuntime:
    """A booted ComfyUI (one per process): its ``nodes``, ``execution`` and ``folder_paths`` modules, and ``run``."""

    _instance: ComfyRuntime | None = None

    def __init__(self, comfy_dir: Path) -> None:
        import execution
        import folder_paths
        import nodes

        self.comfy_dir = comfy_dir
        self.execution, self.folder_paths, self.nodes = execution, folder_paths, nodes
        self.pack_module: str | None = None

    # ---- boot ----------------------------------------------------------------------------------------------------

    @classmethod
    def boot(cls, comfy_dir=None, *, models_dir=None, input_dir=None, output_dir=None) -> ComfyRuntime:
        """Start ComfyUI in this process (once) with this pack loaded, and point its folders.

        ``comfy_dir``: the ComfyUI to use (default: ``locate.find_comfyui``). Later calls return the running
        runtime; naming a different folder then is an error. ``models_dir``: a ComfyUI-style models folder searched
        before ComfyUI's own (``checkpoints/``, ``diffusers/``, ``onestep_sr/``, ``clip_vision/``, ...).
        ``input_dir``/``output_dir``: where LoadImage reads and SaveImage writes.
        """
        runtime = cls._instance
        if runtime is None:
            folder = find_comfyui(comfy_dir)
            _import_comfy(folder)
            runtime = cls._instance = cls(folder)
            runtime._load_extra_model_paths()
        elif comfy_dir is not None and find_comfyui(comfy_dir) != runtime.comfy_dir:
            raise ComfyBootError(
                f"ComfyUI from {runtime.comfy_dir} is already running in this process; cannot also start "
                f"{find_comfyui(comfy_dir)}. ComfyUI keeps global state: use one ComfyUI per process.")
        runtime.set_folders(models_dir=models_dir, input_dir=input_dir, output_dir=output_dir)
        if runtime.pack_module is None:
            runtime.pack_module = runtime.load_pack(pack_root())
        return runtime

    def _load_extra_model_paths(self) -> None:
        yaml_path = self.comfy_dir / "extra_model_paths.yaml"
        if yaml_path.is_file():
            self.add_extra_model_paths(yaml_path)

    def add_extra_model_paths(self, yaml_path: Path) -> None:
        """Register the model folders of an ``extra_model_paths.yaml``, with the semantics of ComfyUI's main.py.

        Each top-level section maps folder names to one or more paths (one per line); an optional ``base_path``
        prefixes them (a relative one is taken from the yaml file's folder, as current ComfyUI does) and an optional
        ``is_default: true`` puts them first.
        """
        import yaml

        config = yaml.safe_load(Path(yaml_path).read_text()) or {}
        for section in config.values():
            if not section:
                continue
            section = dict(section)
            base = section.pop("base_path", None)
            first = bool(section.pop("is_default", False))
            if base is not None:
                base = os.path.expandvars(os.path.expanduser(str(base)))
                base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(yaml_path)), base))
            for folder_name, paths in section.items():
                for entry in str(paths).splitlines():
                    entry = entry.strip()
                    if entry:
                        full = os.path.join(base, entry) if base is not None else entry
                        logger.debug("extra model path %s: %s", folder_name, full)
                        self._add_model_folder(folder_name, os.path.normpath(full), first=first)

    def _add_model_folder(self, name: str, path: str, *, first: bool) -> None:
        """``folder_paths.add_model_folder_path``; with ``first``, the folder is searched before the others."""
        fp = self.folder_paths
        if "is_default" in inspect.signature(fp.add_model_folder_path).parameters:
            fp.add_model_folder_path(name, path, is_default=first)
            return
        paths = fp.folder_names_and_paths.get(name, ([], set()))[0]
        if path not in paths:
            fp.add_model_folder_path(name, path)
            paths = fp.folder_names_and_paths[name][0]
        if first:  # this ComfyUI only appends; an explicitly given models folder must win over ComfyUI's own
            paths.remove(path)
            paths.insert(0, path)

    def set_folders(self, *, models_dir=None, input_dir=None, output_dir=None) -> None:
        """Search ``models_dir``'s subfolders first for every model folder name; set the input/output folders."""
        fp = self.folder_paths
        if models_dir is not None:
            models_dir = Path(models_dir).resolve()
            if not models_dir.is_dir():
                raise FileNotFoundError(f"the models folder {str(models_dir)!r} does not exist; pass a folder "
                                        "holding checkpoints/, onestep_sr/, ... (`onestep-sr make-demo-models DIR` "
                                        "writes one).")
            names = (set(fp.folder_names_and_paths) | set(MODEL_FOLDERS)) - set(NOT_MODEL_FOLDERS)
            for name in sorted(names):
                self._add_model_folder(name, str(models_dir / name), first=True)
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

    def load_pack(self, root: str | os.PathLike) -> str:
        """Load the custom-node pack in ``root`` exactly as ComfyUI does; return its module name.

        ComfyUI names the module after the folder and the pack imports itself relatively, so a folder whose name is
        not a module name (``/tmp/tmp.x1y2``) or is already taken is loaded through a symlink named
        ``comfyui-onestep-sr`` (or ``comfyui-onestep-sr-2``, ... if that is taken too). ComfyUI logs a failed
        import and returns False; that becomes a ComfyBootError carrying the logged traceback.
        """
        root = Path(root).resolve()
        path = _importable_path(root)
        with _captured_log() as log:
            loaded = _await(self.nodes.load_custom_node(str(path)))
        if loaded is False:
            raise ComfyBootError(f"ComfyUI could not load the custom-node pack at {root}:\n{log.getvalue()}")
        return path.name

    # ---- running -------------------------------------------------------------------------------------------------

    def node_classes(self) -> dict:
        """ComfyUI's registry of node classes (``nodes.NODE_CLASS_MAPPINGS``), core nodes and this pack's."""
        return self.nodes.NODE_CLASS_MAPPINGS

    def run(self, prompt: dict, *, prompt_id: str | None = None) -> RunResult:
        """Validate and execute an API-format prompt with a fresh executor (nothing cached from earlier runs).

        Raises WorkflowError naming every invalid node and input, or the node that raised (with its traceback).
        The caller's ``prompt`` is not modified.
        """
        prompt = copy.deepcopy(prompt)  # ComfyUI converts values and adds ``is_changed`` in place
        prompt_id = prompt_id or uuid.uuid4().hex
        self._check_node_types(prompt)
        output_nodes = self._validate(prompt, prompt_id)
        executor = self.execution.PromptExecutor(_ServerStandIn())
        _await(executor.execute(prompt, prompt_id, {}, output_nodes))
        messages = list(executor.status_messages)
        events = {event: data for event, data in messages}
        if "execution_error" in events:
            failure = events["execution_error"]
            raise WorkflowError(_format_failure(failure), node_traceback="".join(failure.get("traceback") or []))
        if "execution_interrupted" in events or not executor.success:
            node_id = events.get("execution_interrupted", {}).get("node_id", "?")
            raise WorkflowError(f"the workflow was interrupted at node {node_id}")
        ui = getattr(executor, "outputs_ui", None)
        if ui is None:  # newer ComfyUI reports it in history_result
            ui = getattr(executor, "history_result", {}).get("outputs", {})
        return RunResult(outputs=_unwrap(_raw_outputs(executor, prompt)), ui=dict(ui), messages=messages)

    def _check_node_types(self, prompt: dict) -> None:
        """Unknown or missing class types, reported before ComfyUI (whose old versions raise a bare KeyError)."""
        classes = self.node_classes()
        problems = [f"node {node_id} has no class_type" if "class_type" not in node else
                    f"node {node_id} uses {node['class_type']!r}, which this ComfyUI does not have"
                    for node_id, node in prompt.items() if node.get("class_type") not in classes]
        if problems:
            pack = [name for name in classes if name.startswith("OneStepSR")]
            raise WorkflowError("the workflow uses unknown node types:\n  " + "\n  ".join(problems)
                                + f"\n(this pack's nodes here: {', '.join(pack)})")

    def _validate(self, prompt: dict, prompt_id: str) -> list[str]:
        """ComfyUI's ``validate_prompt``; returns the output node ids to execute, or raises WorkflowError."""
        validate = self.execution.validate_prompt
        by_name = {"prompt": prompt, "prompt_id": prompt_id, "partial_execution_list": None,
                   "partial_execution_targets": None}
        params = list(inspect.signature(validate).parameters)
        args = [by_name[name] if name in by_name else None for name in params]
        valid, error, outputs, node_errors = _await(validate(*args))[:4]
        if not valid or node_errors:
            raise WorkflowError(_format_validation(error, node_errors, prompt))
        return list(outputs)


def _import_comfy(folder: Path) -> None:
    """Import ComfyUI's ``comfy``, ``nodes``, ``execution`` and ``folder_paths`` from ``folder``."""
    for name in COMFY_MODULES:
        origin = _module_origin(sys.modules.get(name))
        if origin is not None and not origin.is_relative_to(folder):
            raise ComfyBootError(
                f"a module named `{name}` is already imported from {origin}, which would shadow ComfyUI's {name} "
                f"from {folder}. Run from outside the pack's folder: `pytest tests/...` or `onestep-sr`, not "
                "`python -m pytest` in the repository root (which puts the pack's own nodes/ on sys.path).")
    sys.path.insert(0, str(folder))
    argv = sys.argv
    # ComfyUI parses sys.argv once, at import; give it only what it needs (a test runner's flags would stop it).
    sys.argv = [argv[0]] + ([] if _cuda_available() else ["--cpu"])
    stand_in = importlib.util.find_spec("torchvision") is None
    if stand_in:
        # transformers decides once (lru_cache) whether torchvision exists, by find_spec; let it see the truth
        # first, then show ComfyUI the stand-in only while ComfyUI imports (comfy/ldm/cascade imports torchvision
        # at module level but only uses it for Stable Cascade models).
        _preload_model_libraries()
        logger.info("torchvision is not installed; ComfyUI starts with the stand-in in %s", SHIM_DIR)
        sys.modules["torchvision"] = _torchvision_stand_in()
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        import execution  # noqa: F401
        import folder_paths  # noqa: F401
        import nodes  # noqa: F401
    except ImportError as err:
        raise ComfyBootError(
            f"ComfyUI in {folder} failed to import ({err}). Install what it needs: for the vendored one, "
            "`pip install 'comfyui-onestep-sr[comfy]'`; for a checkout, its requirements.txt.") from err
    finally:
        sys.argv = argv
        if stand_in:
            del sys.modules["torchvision"]  # ComfyUI's modules keep their reference; nobody else sees the stand-in


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


def _module_origin(module) -> Path | None:
    """Where an imported module (or namespace package, like ComfyUI's ``comfy``) lives; None if not imported."""
    if module is None:
        return None
    location = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
    return Path(location).resolve() if location else Path("?")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _importable_path(root: Path) -> Path:
    """``root``, or a symlink to it whose name ComfyUI can use as the pack's module name."""
    if MODULE_NAME.fullmatch(root.name) and root.name not in sys.modules:
        return root
    name = next(n for n in (PACK_MODULE_NAME, *(f"{PACK_MODULE_NAME}-{i}" for i in range(2, 100)))
                if n not in sys.modules)
    link_dir = Path(tempfile.mkdtemp(prefix="onestep-sr-pack-"))
    atexit.register(shutil.rmtree, link_dir, ignore_errors=True)  # removes the link, never the pack
    link = link_dir / name
    link.symlink_to(root, target_is_directory=True)
    logger.debug("loading the pack from %s through %s", root, link)
    return link


@contextmanager
def _captured_log() -> Iterator[io.StringIO]:
    """Collect WARNING and above logged anywhere while the block runs (ComfyUI logs a failed import's traceback)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if level > logging.WARNING:  # an application that silenced warnings would otherwise hide the traceback
        root.setLevel(logging.WARNING)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _await(value):
    """The result of a call that is a coroutine in newer ComfyUI versions and a plain value in older ones."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def _raw_outputs(executor, prompt: dict) -> dict[str, list]:
    """Node id -> ComfyUI's per-slot output lists, from ``executor.outputs`` (2024) or ``executor.caches`` (newer)."""
    if hasattr(executor, "outputs"):
        return dict(executor.outputs)
    raw = {}
    for node_id in prompt:
        entry = executor.caches.outputs.get(node_id)
        if entry is not None:
            raw[node_id] = getattr(entry, "outputs", entry)  # newer caches hold CacheEntry(ui, outputs)
    return raw


def _unwrap(raw: dict[str, list]) -> dict[str, tuple]:
    return {node_id: tuple(slot[0] if isinstance(slot, list) and len(slot) == 1 else slot for slot in slots)
            for node_id, slots in raw.items()}


def _format_validation(error, node_errors: dict, prompt: dict) -> str:
    headline = error.get("message", error) if isinstance(error, dict) else error
    lines = [f"the workflow is invalid: {headline or 'some output nodes failed validation'}"]
    if isinstance(error, dict) and error.get("type") == "prompt_no_outputs":
        lines.append("  add an output node (SaveImage or PreviewImage) that the result flows into")
    for node_id, info in sorted((node_errors or {}).items()):
        class_type = info.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for reason in info.get("errors", []):
            name = (reason.get("extra_info") or {}).get("input_name")
            where = f"input '{name}'" if name else "node"
            lines.append(f"  node {node_id} ({class_type}) {where}: {reason.get('message')}: {reason.get('details')}")
    return "\n".join(lines)


def _format_failure(failure: dict) -> str:
    return (f"node {failure.get('node_id')} ({failure.get('node_type')}) raised {failure.get('exception_type')}: "
            f"{str(failure.get('exception_message', '')).strip()}")
