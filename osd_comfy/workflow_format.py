"""ComfyUI's two workflow formats, and the conversion between them for the workflows we ship.

* API format (what the executor runs): ``{id: {"class_type": ..., "inputs": {name: value | [src_id, slot]}}}``.
* UI format (what the editor saves and opens, version 0.4): LiteGraph ``nodes`` with id/type/pos/size, ``inputs``
  (sockets, each with its link id), ``outputs`` (with the ids of their links), ``widgets_values`` (one value per
  widget, in the editor's widget order), and a ``links`` table ``[id, from_node, from_slot, to_node, to_slot, type]``.

The editor's widget order (ComfyUI's web/scripts/app.js + widgets.js, unchanged in the newer frontend): one widget
per INT/FLOAT/STRING/BOOLEAN/combo input (unless ``forceInput``), required inputs then optional ones, in declaration
order. Two widgets exist only in the editor and are saved in ``widgets_values`` but never sent to the executor:
``control_after_generate`` right after an INT named ``seed``/``noise_seed`` or any widget declared with
``control_after_generate``, and the ``upload`` button ("image") that the image-upload extension appends after the
required inputs of a node with an ``image_upload`` combo. Every other type (IMAGE, MASK, OSD_MODEL, ...) is a socket.

Each shipped workflow is written in API format by hand (``workflows/<name>_api.json``); its UI twin
``workflows/<name>.json`` and the template copy ``example_workflows/<name>.json`` are generated from it:

    python -m osd_comfy.workflow_format build    # regenerate the UI files
    python -m osd_comfy.workflow_format check    # exit 1 if any UI file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from .locate import pack_root

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
UI_VERSION = 0.4
# Editor-only nodes: not sent to the executor. A Reroute passes its input through; a PrimitiveNode has already
# written its value into the widget it drives; notes hold text.
REROUTE, PRIMITIVE, NOTES = "Reroute", "PrimitiveNode", ("Note", "MarkdownNote")
MUTED, BYPASSED = 2, 4
# Layout: LiteGraph's title bar, socket row and widget row heights, in canvas pixels.
NODE_WIDTH, COLUMN_GAP, ROW_GAP, MARGIN = 320, 80, 40, 50
TITLE_PX, SLOT_PX, WIDGET_PX, MULTILINE_PX = 30, 22, 24, 80


@dataclass(frozen=True)
class Widget:
    """One entry of ``widgets_values``: the input it holds, or an editor-only widget with a fixed value."""

    name: str
    kind: object
    options: dict
    editor_only: bool = False
    editor_value: object = None

    def default(self):
        if self.editor_only:
            return self.editor_value
        if "default" in self.options:
            return self.options["default"]
        if isinstance(self.kind, list):
            return self.kind[0] if self.kind else ""
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.kind)


def _declared(node_class, section: str) -> list[tuple[str, object, dict]]:
    out = []
    for name, declaration in node_class.INPUT_TYPES().get(section, {}).items():
        options = declaration[1] if len(declaration) > 1 and isinstance(declaration[1], dict) else {}
        out.append((name, declaration[0], options))
    return out


def _is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widgets(node_class) -> list[Widget]:
    """The node's widgets in the editor's order, editor-only ones included (see the module docstring)."""
    out = []
    for section in ("required", "optional"):
        uploads = []
        for name, kind, options in _declared(node_class, section):
            if not _is_widget(kind, options):
                continue
            out.append(Widget(name, kind, options))
            if (kind == "INT" and name in SEED_NAMES) or options.get("control_after_generate"):
                out.append(Widget("control_after_generate", "COMBO", {}, editor_only=True, editor_value="fixed"))
            if options.get("image_upload"):
                uploads.append(Widget("upload", "IMAGEUPLOAD", {}, editor_only=True, editor_value="image"))
        out += uploads
    return out


def sockets(node_class) -> list[tuple[str, object]]:
    """The node's link-only inputs (name, type), required then optional, as the editor lays them out."""
    return [(name, kind) for section in ("required", "optional")
            for name, kind, options in _declared(node_class, section) if not _is_widget(kind, options)]


def _output_names(node_class) -> list[str]:
    return list(getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES)


# ---- API -> UI ----------------------------------------------------------------------------------------------------

def _depths(prompt: dict) -> dict[str, int]:
    """Longest path from a source node: the column each node goes in."""
    depth: dict[str, int] = {}

    def visit(node_id: str, path: tuple[str, ...]) -> int:
        if node_id in path:
            raise ValueError(f"the workflow has a cycle through nodes {' -> '.join(path + (node_id,))}")
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max((visit(s, path + (node_id,)) for s in sources), default=-1)
        return depth[node_id]

    for node_id in prompt:
        visit(node_id, ())
    return depth


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _height(n_slots: int, node_widgets: list[Widget]) -> int:
    rows = sum(MULTILINE_PX if w.options.get("multiline") else WIDGET_PX for w in node_widgets)
    return TITLE_PX + n_slots * SLOT_PX + rows + 10


def _check_inputs(node_id: str, node: dict, node_class) -> None:
    declared = {name for section in ("required", "optional") for name, _, _ in _declared(node_class, section)}
    unknown = sorted(set(node["inputs"]) - declared)
    if unknown:
        raise ValueError(f"node {node_id} ({node['class_type']}) has inputs {unknown} that its class does not "
                         f"declare; declared: {sorted(declared)}")


def api_to_ui(prompt: dict, node_classes: dict, *, title_map: dict[str, str] | None = None) -> dict:
    """The UI-format twin of an API-format prompt, laid out left to right by dependency depth.

    ``node_classes``: ``nodes.NODE_CLASS_MAPPINGS`` (for widget order and link types). ``title_map``: node id ->
    title shown in the editor (default: the prompt's ``_meta.title``, else the editor's own display name).
    """
    missing = sorted({n["class_type"] for n in prompt.values()} - set(node_classes))
    if missing:
        raise ValueError(f"the prompt uses node types {missing} that are not in node_classes")
    depth = _depths(prompt)
    order = sorted(prompt, key=lambda n: (depth[n], int(n)))
    links: list[list] = []
    out_links = {n: [[] for _ in node_classes[prompt[n]["class_type"]].RETURN_TYPES] for n in prompt}
    column_y: dict[int, int] = {}
    ui_nodes = []
    for index, node_id in enumerate(order):
        node = prompt[node_id]
        node_class = node_classes[node["class_type"]]
        _check_inputs(node_id, node, node_class)
        inputs = []
        for name, kind in sockets(node_class):
            inputs.append({"name": name, "type": kind, "link": _link(links, out_links, prompt, node_id, name,
                                                                      len(inputs), node_classes)})
        values = []
        node_widgets = widgets(node_class)
        for widget in node_widgets:
            if widget.editor_only:
                values.append(widget.editor_value)
                continue
            value = node["inputs"].get(widget.name, widget.default())
            if _is_link(value):  # a widget converted to an input: the socket holds the link, the widget a default
                inputs.append({"name": widget.name, "type": widget.kind if isinstance(widget.kind, str) else "COMBO",
                               "link": _link(links, out_links, prompt, node_id, widget.name, len(inputs),
                                             node_classes),
                               "widget": {"name": widget.name}})
                value = widget.default()
            values.append(value)
        height = _height(max(len(inputs), len(node_class.RETURN_TYPES)), node_widgets)
        y = column_y.get(depth[node_id], MARGIN)
        column_y[depth[node_id]] = y + height + ROW_GAP
        title = (title_map or {}).get(node_id) or node.get("_meta", {}).get("title")
        ui_nodes.append({
            "id": int(node_id), "type": node["class_type"],
            "pos": [MARGIN + depth[node_id] * (NODE_WIDTH + COLUMN_GAP), y], "size": [NODE_WIDTH, height],
            "flags": {}, "order": index, "mode": 0, "inputs": inputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values,
            **({"title": title} if title else {}),
        })
    for ui_node in ui_nodes:
        node_class = node_classes[ui_node["type"]]
        ui_node["outputs"] = [
            {"name": name, "type": kind, "links": out_links[str(ui_node["id"])][slot], "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(_output_names(node_class), node_class.RETURN_TYPES))
        ]
    return {"last_node_id": max((int(n) for n in prompt), default=0), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": UI_VERSION}


def _link(links: list, out_links: dict, prompt: dict, node_id: str, name: str, target_slot: int,
          node_classes: dict) -> int | None:
    """Add the link feeding ``node_id``'s input ``name`` (if it is linked) and return its id."""
    value = prompt[node_id]["inputs"].get(name)
    if not _is_link(value):
        return None
    source, slot = value
    if source not in prompt:
        raise ValueError(f"node {node_id} input '{name}' links to node {source}, which is not in the prompt")
    return_types = node_classes[prompt[source]["class_type"]].RETURN_TYPES
    if not 0 <= slot < len(return_types):
        raise ValueError(f"node {node_id} input '{name}' links to output {slot} of node {source} "
                         f"({prompt[source]['class_type']}), which has {len(return_types)} outputs")
    link_id = len(links) + 1
    links.append([link_id, int(source), slot, int(node_id), target_slot, return_types[slot]])
    out_links[source][slot].append(link_id)
    return link_id


# ---- UI -> API ----------------------------------------------------------------------------------------------------

def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """The API-format prompt the editor would queue for a UI-format workflow ("Save (API)").

    Follows the editor: muted and bypassed nodes are left out (a bypassed node passes its first input of the
    requested type through), Reroutes are followed, a PrimitiveNode's value is the widget value it drives, notes are
    ignored. A node whose ``widgets_values`` is shorter than its widget list (saved by an older version of the node)
    gets the defaults for the missing ones, as the editor would. Subgraphs (2025 frontend) are not supported.
    """
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ValueError("the workflow contains subgraphs, which ui_to_api does not expand; convert them to nodes "
                         "in the editor, or export the workflow with 'Export (API)'")
    nodes_by_id = {str(n["id"]): n for n in workflow["nodes"]}
    link_table = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node_id, ui_node in sorted(nodes_by_id.items(), key=lambda item: int(item[0])):
        kind = ui_node["type"]
        if kind in (REROUTE, PRIMITIVE, *NOTES) or ui_node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if kind not in node_classes:
            raise ValueError(f"node {node_id} is a {kind!r}, which this ComfyUI does not have (is a custom-node pack "
                             "missing?)")
        node_class = node_classes[kind]
        linked = {}
        for socket in ui_node.get("inputs") or []:
            source = _source(socket.get("link"), socket.get("type"), nodes_by_id, link_table)
            if source is not None:
                linked[socket["name"]] = source
        prompt[node_id] = {"class_type": kind, "inputs": _api_inputs(node_id, ui_node, node_class, linked)}
        if ui_node.get("title"):
            prompt[node_id]["_meta"] = {"title": ui_node["title"]}
    return prompt


def _api_inputs(node_id: str, ui_node: dict, node_class, linked: dict) -> dict:
    saved = ui_node.get("widgets_values") or []
    node_widgets = widgets(node_class)
    if isinstance(saved, dict):  # some nodes save their widgets by name
        values = {w.name: saved.get(w.name, w.default()) for w in node_widgets}
    else:
        values = {w.name: (saved[i] if i < len(saved) else w.default()) for i, w in enumerate(node_widgets)
                  if not w.editor_only}
    inputs = {}
    for section in ("required", "optional"):
        for name, kind, options in _declared(node_class, section):
            if name in linked:
                inputs[name] = linked[name]
            elif _is_widget(kind, options):
                inputs[name] = values[name]
    return inputs


def _source(link_id, wanted_type, nodes_by_id: dict, link_table: dict) -> list | None:
    """``[node_id, slot]`` of the real node feeding a link, through Reroutes and bypassed nodes; None if none."""
    seen = set()
    while link_id is not None and link_id in link_table and link_id not in seen:
        seen.add(link_id)
        _, origin, slot = link_table[link_id][:3]
        node = nodes_by_id.get(str(origin))
        if node is None or node["type"] in (PRIMITIVE, *NOTES) or node.get("mode", 0) == MUTED:
            return None
        inputs = node.get("inputs") or []
        if node["type"] == REROUTE:
            link_id = inputs[0].get("link") if inputs else None
        elif node.get("mode", 0) == BYPASSED:
            candidates = [slot] + list(range(len(inputs)))
            through = next((inputs[i] for i in candidates if i < len(inputs) and inputs[i].get("type") == wanted_type),
                           None)
            link_id = through.get("link") if through else None
        else:
            return [str(origin), int(slot)]
    return None


# ---- the shipped workflows ------------------------------------------------------------------------------------------

def shipped_workflows() -> list[Path]:
    """Every API-format workflow the pack ships (``workflows/*_api.json``)."""
    return sorted((pack_root() / "workflows").glob("*_api.json"))


def ui_twin(api_path: Path) -> Path:
    """``workflows/<name>_api.json`` -> ``workflows/<name>.json``."""
    return api_path.with_name(api_path.name[: -len("_api.json")] + ".json")


def render_ui(api_path: Path, node_classes: dict) -> str:
    """The UI twin's text for an API-format file."""
    return json.dumps(api_to_ui(json.loads(api_path.read_text()), node_classes), indent=2) + "\n"


def build(node_classes: dict, *, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, only compare) every UI twin and its example_workflows/ copy; return the stale."""
    stale = []
    templates = pack_root() / "example_workflows"
    for api_path in shipped_workflows():
        text = render_ui(api_path, node_classes)
        for target in (ui_twin(api_path), templates / ui_twin(api_path).name):
            if not target.is_file() or target.read_text() != text:
                stale.append(target)
                if not check:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osd_comfy.workflow_format",
                                     description="Regenerate or check the UI twins of workflows/*_api.json.")
    parser.add_argument("mode", choices=("build", "check"))
    parser.add_argument("--comfyui", help="ComfyUI folder to read node definitions from (default: as onestep-sr)")
    args = parser.parse_args(argv)
    from .runtime import ComfyRuntime

    with redirect_stdout(sys.stderr):  # ComfyUI's start-up chatter
        node_classes = ComfyRuntime.boot(args.comfyui).node_classes()
    stale = build(node_classes, check=args.mode == "check")
    for path in stale:
        print(("stale: " if args.mode == "check" else "wrote: ") + str(path.relative_to(pack_root())))
    if stale and args.mode == "check":
        print("run `python -m osd_comfy.workflow_format build` to regenerate them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
