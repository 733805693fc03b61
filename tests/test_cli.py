"""``onestep-sr``: demo models + upscale end to end through the real ComfyUI, and readable errors."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import WORKFLOWS, write_image
from osd_comfy.cli import main

needs_workflow = pytest.mark.skipif(not (WORKFLOWS / "osediff_api.json").is_file(),
                                    reason="workflows/osediff_api.json (the default workflow) does not exist yet")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, comfy):
    folder = tmp_path_factory.mktemp("cli_models")
    assert main(["make-demo-models", str(folder)]) == 0
    return folder


# ---- argument and user errors: exit status and one readable line, no traceback -----------------------------------

@pytest.mark.parametrize("argv", [[], ["upscale"], ["upscale", "in.png"], ["upscale", "in.png", "--out", "o.png",
                                                                          "--scale", "four"], ["resize"]])
def test_bad_arguments_exit_2_with_usage(argv, capsys):
    assert main(argv) == 2
    assert "usage: onestep-sr" in capsys.readouterr().err


def test_missing_input_is_a_readable_error(tmp_path, capsys):
    assert main(["upscale", str(tmp_path / "absent.png"), "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "absent.png" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [(["--out", "o.tiff"], "extension must be one of"),
                                            (["--out", "o.png", "--scale", "-2"], "--scale must be positive")])
def test_bad_output_or_scale_is_refused_before_booting(tmp_path, capsys, extra, message):
    source = tmp_path / write_image(tmp_path, "in.png", 4, 4)
    assert main(["upscale", str(source), *extra]) == 1
    assert message in capsys.readouterr().err


def test_unreadable_input_is_a_readable_error(tmp_path, capsys):
    source = tmp_path / "not_an_image.png"
    source.write_text("hello")
    assert main(["upscale", str(source), "--out", str(tmp_path / "o.png")]) == 1
    assert "cannot be read" in capsys.readouterr().err


def test_missing_workflow_is_a_readable_error(tmp_path, capsys):
    source = tmp_path / write_image(tmp_path, "in.png", 4, 4)
    code = main(["upscale", str(source), "--out", str(tmp_path / "o.png"), "--workflow", str(tmp_path / "nope.json")])
    assert code == 1 and "nope.json" in capsys.readouterr().err


# ---- end to end ----------------------------------------------------------------------------------------------------

def test_make_demo_models_writes_the_layout(demo_dir):
    assert (demo_dir / "checkpoints" / "onestep-demo-sd.safetensors").is_file()
    assert (demo_dir / "onestep_sr" / "onestep-demo-osediff.safetensors").is_file()
    assert Image.open(demo_dir / "demo_input.png").size == (48, 40)


@needs_workflow
def test_upscale_gives_exactly_input_times_factor(demo_dir, tmp_path, capsys, caplog):
    out = tmp_path / "out.png"
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(out), "--models-dir", str(demo_dir),
                 "--scale", "2.5", "--seed", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert Image.open(out).size == (120, 100) and Image.open(out).mode == "RGB"
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"wrote {out} (120x100) in ")  # stdout: the result, not ComfyUI's start-up chatter
    assert "random-weight demo models" in captured.out
    assert "using 'onestep-demo-osediff.safetensors'" in caplog.text  # the workflow's bundle name was substituted


def test_pisa_sr_workflow_finds_its_demo_bundle(demo_dir, tmp_path, caplog):
    """The workflow names the official ``pisa_sr.pkl``; the demo bundle is ``onestep-demo-pisa-sr.safetensors``."""
    out = tmp_path / "pisa.png"
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(out), "--models-dir", str(demo_dir),
                 "--scale", "2", "--workflow", str(WORKFLOWS / "pisa_sr_api.json")])
    assert code == 0 and Image.open(out).size == (96, 80)
    assert "using 'onestep-demo-pisa-sr.safetensors'" in caplog.text


@needs_workflow
def test_upscale_keeps_alpha(demo_dir, tmp_path):
    source = tmp_path / "in.png"
    write_image(tmp_path, "in.png", 20, 12, alpha=True)
    out = tmp_path / "out.webp"
    assert main(["upscale", str(source), "--out", str(out), "--models-dir", str(demo_dir), "--scale", "2"]) == 0
    image = Image.open(out)
    assert image.format == "WEBP" and image.mode == "RGBA" and image.size == (40, 24)
    alpha = image.getchannel("A")  # the input's alpha ramps 0 -> 255 left to right
    assert alpha.getpixel((0, 10)) < 40 and alpha.getpixel((39, 10)) > 215


@needs_workflow
def test_ui_format_workflow_runs_too(demo_dir, tmp_path):
    out = tmp_path / "out.jpg"
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(out), "--models-dir", str(demo_dir),
                 "--scale", "1.5", "--workflow", str(WORKFLOWS / "osediff.json")])
    assert code == 0
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (72, 60)


@needs_workflow
def test_unknown_bundle_lists_what_is_there(demo_dir, tmp_path, capsys):
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(tmp_path / "o.png"),
                 "--models-dir", str(demo_dir), "--bundle", "other.safetensors"])
    err = capsys.readouterr().err
    assert code == 1 and "other.safetensors" in err and "onestep-demo-osediff.safetensors" in err


@needs_workflow
def test_node_error_is_one_readable_message(demo_dir, tmp_path, capsys):
    argv = ["upscale", str(demo_dir / "demo_input.png"), "--out", str(tmp_path / "o.png"), "--models-dir",
            str(demo_dir), "--scale", "0.001"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "onestep-sr: error: node 3 (OneStepSREncode) raised ValueError: `upscale_factor`" in err
    assert "Traceback" not in err and 'File "' not in err and "--verbose" in err
    assert main(["--verbose", *argv]) == 1
    assert 'File "' in capsys.readouterr().err  # the node's traceback, on request


@needs_workflow
def test_invalid_workflow_names_the_node_and_input(demo_dir, tmp_path, capsys):
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(tmp_path / "o.png"),
                 "--models-dir", str(demo_dir), "--scale", "40"])
    err = capsys.readouterr().err
    assert code == 1 and "the workflow is invalid" in err and "(OneStepSREncode) input 'upscale_factor'" in err
