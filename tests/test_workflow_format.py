"""UI <-> API workflow formats: the editor's widget order, links, layout, editor-only nodes, and the build/check tool.

Golden values come from ComfyUI's editor: its default text-to-image graph (web/scripts/defaultGraph.js) as saved in
UI format and as "Save (API)" writes it.
"""

from __future__ import annotations

import copy
import json

import pytest

import osd_comfy.workflow_format as wf
from osd_comfy.workflow_format import api_to_ui, sockets, ui_to_api, widgets

CORE_CHAIN = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bicubic", "scale_by": 2.0}},
    "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
    "4": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["2", 0]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "chain"}},
    "6": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
}

# ComfyUI's default graph, UI format, as the editor saves it (positions and sizes left out: they do not matter).
DEFAULT_GRAPH_UI = {
    "last_node_id": 9, "last_link_id": 9, "version": 0.4, "groups": [], "config": {}, "extra": {},
    "nodes": [
        {"id": 3, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 2}],
         "widgets_values": [156680208700286, "randomize", 20, 8, "euler", "normal", 1]},
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["v1-5-pruned-emaonly.ckpt"]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [512, 512, 1]},
        {"id": 6, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
         "widgets_values": ["beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"]},
        {"id": 7, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "widgets_values": ["text, watermark"]},
        {"id": 8, "type": "VAEDecode", "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}]},
        {"id": 9, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 9}],
         "widgets_values": ["ComfyUI"]},
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 7, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 6, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
}

# ... and what "Save (API)" writes for it.
DEFAULT_GRAPH_API = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.ckpt"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {
        "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


class FakeSource:
    RETURN_TYPES = ("INT", "FLOAT")
    RETURN_NAMES = ("count", "amount")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 3})}}


class FakeSink:
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "count": ("INT", {"default": 1}),
                "forced": ("FLOAT", {"forceInput": True}),
                "mode": (["a", "b"], {"control_after_generate": True}),
                "noise_seed": ("INT", {"default": 0}),
            },
            "optional": {"strength": ("FLOAT", {"default": 0.5}), "mask": ("MASK",)},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }


@pytest.fixture(scope="module")
def classes(comfy):
    return {**comfy.node_classes(), "FakeSource": FakeSource, "FakeSink": FakeSink}


def test_widget_and_socket_order_follow_the_editor():
    names = [(w.name, w.editor_only) for w in widgets(FakeSink)]
    assert names == [("count", False), ("mode", False), ("control_after_generate", True), ("noise_seed", False),
                     ("control_after_generate", True), ("strength", False)]
    assert sockets(FakeSink) == [("image", "IMAGE"), ("forced", "FLOAT"), ("mask", "MASK")]


def test_default_graph_converts_to_what_the_editor_queues(classes):
    assert ui_to_api(DEFAULT_GRAPH_UI, classes) == DEFAULT_GRAPH_API


def test_default_graph_widgets_values_and_links_match_the_editor(classes):
    ui = api_to_ui(DEFAULT_GRAPH_API, classes)
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert by_id[3]["widgets_values"] == [156680208700286, "fixed", 20, 8, "euler", "normal", 1]
    assert by_id[5]["widgets_values"] == [512, 512, 1]
    assert [(i["name"], i["type"]) for i in by_id[3]["inputs"]] == [
        ("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")]
    expected = {tuple(link[1:]) for link in DEFAULT_GRAPH_UI["links"]}
    assert {tuple(link[1:]) for link in ui["links"]} == expected
    assert ui["version"] == 0.4 and ui["last_node_id"] == 9 and ui["last_link_id"] == 9


@pytest.mark.parametrize("prompt", [CORE_CHAIN, DEFAULT_GRAPH_API], ids=["image-chain", "default-graph"])
def test_round_trip_is_exact(classes, prompt):
    ui = api_to_ui(prompt, classes)
    assert ui_to_api(json.loads(json.dumps(ui)), classes) == prompt


def test_load_image_keeps_the_upload_widget_value(classes):
    node = next(n for n in api_to_ui(CORE_CHAIN, classes)["nodes"] if n["type"] == "LoadImage")
    assert node["widgets_values"] == ["example.png", "image"]
    assert [o["name"] for o in node["outputs"]] == ["IMAGE", "MASK"]
    assert [len(o["links"]) for o in node["outputs"]] == [2, 0]  # ImageScaleBy and PreviewImage


def test_links_are_consistent_from_both_ends(classes):
    ui = api_to_ui(CORE_CHAIN, classes)
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert len(ui["links"]) == 6
    for link_id, source, slot, target, target_slot, kind in ui["links"]:
        assert link_id in by_id[source]["outputs"][slot]["links"]
        assert by_id[target]["inputs"][target_slot]["link"] == link_id
        assert kind == by_id[source]["outputs"][slot]["type"] == "IMAGE"


def test_layout_runs_left_to_right_without_overlaps(classes):
    ui = api_to_ui(DEFAULT_GRAPH_API, classes)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for _, source, _, target, _, _ in ui["links"]:
        assert by_id[source]["pos"][0] + by_id[source]["size"][0] < by_id[target]["pos"][0]
    columns: dict[int, list] = {}
    for node in ui["nodes"]:
        columns.setdefault(node["pos"][0], []).append((node["pos"][1], node["pos"][1] + node["size"][1]))
    for spans in columns.values():
        spans.sort()
        assert all(top_next > bottom for (_, bottom), (top_next, _) in zip(spans, spans[1:]))
    assert [n["order"] for n in ui["nodes"]] == list(range(len(ui["nodes"])))


def test_widget_converted_to_input_round_trips(classes):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "FakeSource", "inputs": {"value": 7}},
        "3": {"class_type": "FakeSink", "inputs": {"image": ["1", 0], "count": ["2", 0], "forced": ["2", 1],
                                                    "mode": "b", "noise_seed": 5, "strength": 0.25}},
    }
    ui = api_to_ui(prompt, classes)
    sink = next(n for n in ui["nodes"] if n["type"] == "FakeSink")
    assert [i["name"] for i in sink["inputs"]] == ["image", "forced", "mask", "count"]
    assert sink["inputs"][3]["widget"] == {"name": "count"} and sink["inputs"][2]["link"] is None
    assert sink["widgets_values"] == [1, "b", "fixed", 5, "fixed", 0.25]
    assert next(link for link in ui["links"] if link[1] == 2 and link[2] == 1)[5] == "FLOAT"
    assert ui_to_api(ui, classes) == prompt


def test_titles_come_from_title_map_or_meta(classes):
    prompt = copy.deepcopy(CORE_CHAIN)
    prompt["3"]["_meta"] = {"title": "Negative"}
    ui = api_to_ui(prompt, classes, title_map={"2": "Upscale x2"})
    titles = {n["id"]: n.get("title") for n in ui["nodes"]}
    assert titles[2] == "Upscale x2" and titles[3] == "Negative" and titles[1] is None
    back = ui_to_api(ui, classes)
    assert back["2"]["_meta"] == {"title": "Upscale x2"} and back["3"] == prompt["3"] and "_meta" not in back["1"]


def test_editor_only_nodes_reroutes_bypass_and_mute(classes):
    workflow = {
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "widgets_values": ["a.png", "image"]},
            {"id": 10, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}]},
            {"id": 2, "type": "ImageInvert", "mode": 4, "inputs": [{"name": "image", "type": "IMAGE", "link": 2}]},
            {"id": 11, "type": "PrimitiveNode", "mode": 0, "widgets_values": [2.5, "fixed"]},
            {"id": 3, "type": "ImageScaleBy", "mode": 0,
             "inputs": [{"name": "image", "type": "IMAGE", "link": 3},
                        {"name": "scale_by", "type": "FLOAT", "link": 4, "widget": {"name": "scale_by"}}],
             "widgets_values": ["area", 2.5]},
            {"id": 4, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 5}],
             "widgets_values": ["out"]},
            {"id": 5, "type": "PreviewImage", "mode": 2, "inputs": [{"name": "images", "type": "IMAGE", "link": 6}]},
            {"id": 12, "type": "Note", "mode": 0, "widgets_values": ["a note"]},
        ],
        "links": [[1, 1, 0, 10, 0, "IMAGE"], [2, 10, 0, 2, 0, "IMAGE"], [3, 2, 0, 3, 0, "IMAGE"],
                  [4, 11, 0, 3, 1, "FLOAT"], [5, 3, 0, 4, 0, "IMAGE"], [6, 3, 0, 5, 0, "IMAGE"]],
    }
    assert ui_to_api(workflow, classes) == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "area", "scale_by": 2.5}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "out"}},
    }


def test_short_widgets_values_take_the_defaults(classes):
    workflow = {"nodes": [{"id": 1, "type": "FakeSink", "mode": 0, "widgets_values": [4]}], "links": []}
    assert ui_to_api(workflow, classes)["1"]["inputs"] == {"count": 4, "mode": "a", "noise_seed": 0, "strength": 0.5}


def test_errors_name_the_node(classes):
    with pytest.raises(ValueError, match=r"node 2 \(ImageInvert\) has inputs \['scale'\]"):
        api_to_ui({"1": CORE_CHAIN["1"], "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0], "scale": 2}}},
                  classes)
    with pytest.raises(ValueError, match="output 5 of node 1"):
        api_to_ui({"1": CORE_CHAIN["1"], "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 5]}}}, classes)
    with pytest.raises(ValueError, match="NoSuchNode"):
        ui_to_api({"nodes": [{"id": 1, "type": "NoSuchNode", "mode": 0}], "links": []}, classes)
    with pytest.raises(ValueError, match="cycle"):
        api_to_ui({"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
                   "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}}, classes)


def test_build_writes_twins_and_check_reports_stale(classes, tmp_path, monkeypatch):
    monkeypatch.setattr(wf, "pack_root", lambda: tmp_path)
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "chain_api.json").write_text(json.dumps(CORE_CHAIN))
    twin, template = tmp_path / "workflows" / "chain.json", tmp_path / "example_workflows" / "chain.json"
    assert wf.build(classes, check=True) == [twin, template] and not twin.exists()
    assert wf.main(["check"]) == 1
    assert wf.build(classes) == [twin, template]
    assert json.loads(twin.read_text()) == json.loads(template.read_text()) == api_to_ui(CORE_CHAIN, classes)
    assert wf.build(classes, check=True) == [] and wf.main(["check"]) == 0
    template.write_text("{}")
    assert wf.build(classes, check=True) == [template]
