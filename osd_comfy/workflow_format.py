"""ComfyUI's two workflow formats, and the conversion between them for the workflows we ship.

* API format (what the executor runs): ``{id: {"class_type": ..., "inputs": {name: value | [src_id, slot]}}}``.
* UI format (what the editor opens and users share): LiteGraph nodes with positions, link-type ``inputs``,
  ``outputs`` with their link ids, ``widgets_values`` in the order of the node's widget inputs, and a ``links`` table.

Widget order follows ``INPUT_TYPES`` (required, then optional); the editor adds one extra value after seed-like INT
widgets ("control_after_generate") and after image-upload combos ("image"). Each shipped workflow is written in API
format by hand (``workflows/<name>_api.json``); its UI twin ``workflows/<name>.json`` and the template copy in
``example_workflows/`` are generated from it:

    python -m osd_comfy.workflow_format build    # regenerate the UI files
    python -m osd_comfy.workflow_format check    # exit 1 if any UI file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .locate import pack_root

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}
COLUMN_PX, ROW_PX = 380, 260


def _declared_inputs(node_class) -> list[tuple[str, object, dict]]:
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, declaration in spec.get(section, {}).items():
            options = declaration[1] if len(declaration) > 1 and isinstance(declaration[1], dict) else {}
            out.append((name, declaration[0], options))
    return out


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_widget_value(name: str, kind, options: dict):
    """The value the editor stores after some widgets, or None."""
    if kind == "INT" and (name in SEED_NAMES or options.get("control_after_generate")):
        return "fixed"
    if options.get("image_upload"):
        return "image"
    return None


def _depths(prompt: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[node_id]

    for node_id in prompt:
        visit(node_id)
    return depth


def api_to_ui(prompt: dict, node_classes: dict) -> dict:
    """The UI-format twin of an API-format prompt (a left-to-right layout by dependency depth)."""
    depth, rows = _depths(prompt), {}
    links, nodes = [], []
    outputs: dict[str, list[list[int]]] = {
        nid: [[] for _ in node_classes[n["class_type"]].RETURN_TYPES] for nid, n in prompt.items()
    }
    for order, node_id in enumerate(sorted(prompt, key=lambda n: (depth[n], int(n)))):
        node = prompt[node_id]
        node_class = node_classes[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, options in _declared_inputs(node_class):
            value = node["inputs"].get(name)
            if _is_widget(kind):
                widgets.append(value)
                extra = _extra_widget_value(name, kind, options)
                if extra is not None:
                    widgets.append(extra)
            elif isinstance(value, list):
                link_id = len(links) + 1
                source, slot = value
                links.append([link_id, int(source), slot, int(node_id), len(inputs), kind])
                outputs[source][slot].append(link_id)
                inputs.append({"name": name, "type": kind, "link": link_id})
            elif name in node_class.INPUT_TYPES().get("required", {}):
                inputs.append({"name": name, "type": kind, "link": None})
        row = rows.setdefault(depth[node_id], 0)
        rows[depth[node_id]] += 1
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [50 + depth[node_id] * COLUMN_PX, 50 + row * ROW_PX],
            "size": [340, 200], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    for ui_node in nodes:
        node_class = node_classes[ui_node["type"]]
        names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
        ui_node["outputs"] = [
            {"name": name, "type": kind, "links": outputs[str(ui_node["id"])][slot], "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(names, node_class.RETURN_TYPES))
        ]
    return {"last_node_id": max(int(n) for n in prompt), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """The API-format prompt the editor would queue for a UI-format workflow."""
    link_source = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for ui_node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        node_class = node_classes[ui_node["type"]]
        linked = {i["name"]: i["link"] for i in ui_node.get("inputs", []) if i.get("link") is not None}
        values = iter(ui_node.get("widgets_values", []))
        inputs: dict[str, object] = {}
        for name, kind, options in _declared_inputs(node_class):
            if _is_widget(kind):
                inputs[name] = next(values)
                if _extra_widget_value(name, kind, options) is not None:
                    next(values)
            elif name in linked:
                source, slot = link_source[linked[name]]
                inputs[name] = [source, slot]
        prompt[str(ui_node["id"])] = {"class_type": ui_node["type"], "inputs": inputs}
    return prompt


def shipped_workflows() -> list[Path]:
    return sorted((pack_root() / "workflows").glob("*_api.json"))


def ui_twin(api_path: Path) -> Path:
    return api_path.with_name(api_path.name.replace("_api.json", ".json"))


def _render(api_path: Path, node_classes: dict) -> str:
    return json.dumps(api_to_ui(json.loads(api_path.read_text()), node_classes), indent=2) + "\n"


def build(node_classes: dict, *, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, compare) every UI twin and its example_workflows/ copy; return stale paths."""
    stale = []
    templates = pack_root() / "example_workflows"
    for api_path in shipped_workflows():
        text = _render(api_path, node_classes)
        for target in (ui_twin(api_path), templates / ui_twin(api_path).name):
            if not target.is_file() or target.read_text() != text:
                stale.append(target)
                if not check:
                    target.parent.mkdir(exist_ok=True)
                    target.write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    from .runtime import ComfyRuntime

    mode = (argv or sys.argv[1:] or ["check"])[0]
    if mode not in ("build", "check"):
        print("usage: python -m osd_comfy.workflow_format build|check", file=sys.stderr)
        return 2
    stale = build(ComfyRuntime.boot().node_classes(), check=mode == "check")
    for path in stale:
        print(("stale: " if mode == "check" else "wrote: ") + str(path))
    return 1 if stale and mode == "check" else 0


if __name__ == "__main__":
    sys.exit(main())
