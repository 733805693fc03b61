"""``onestep-sr``: demo models + upscale end to end through the real ComfyUI, and readable errors."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import write_image
from osd_comfy.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, comfy):
    folder = tmp_path_factory.mktemp("cli_models")
    assert main(["make-demo-models", str(folder)]) == 0
    return folder


def test_make_demo_models_writes_the_layout(demo_dir, capsys):
    assert (demo_dir / "checkpoints" / "onestep-demo-sd.safetensors").is_file()
    assert (demo_dir / "onestep_sr" / "onestep-demo-osediff.safetensors").is_file()
    assert Image.open(demo_dir / "demo_input.png").size == (48, 40)


def test_upscale_gives_exactly_input_times_factor(demo_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(out), "--models-dir", str(demo_dir),
                 "--scale", "2.5", "--seed", "3"])
    assert code == 0
    assert Image.open(out).size == (120, 100)
    printed = capsys.readouterr().out
    assert "wrote" in printed and "random-weight demo models" in printed


def test_upscale_keeps_alpha(demo_dir, tmp_path):
    source = tmp_path / "in.png"
    write_image(tmp_path, "in.png", 20, 12, alpha=True)
    out = tmp_path / "out.png"
    assert main(["upscale", str(source), "--out", str(out), "--models-dir", str(demo_dir), "--scale", "2"]) == 0
    image = Image.open(out)
    assert image.mode == "RGBA" and image.size == (40, 24)
    alpha = image.getchannel("A")
    assert alpha.getpixel((0, 10)) < 40 and alpha.getpixel((39, 10)) > 215


def test_missing_input_is_a_readable_error(tmp_path, capsys):
    assert main(["upscale", str(tmp_path / "absent.png"), "--out", str(tmp_path / "o.png")]) == 1
    assert "absent.png" in capsys.readouterr().err


def test_missing_workflow_is_a_readable_error(demo_dir, tmp_path, capsys):
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(tmp_path / "o.png"),
                 "--workflow", str(tmp_path / "nope.json")])
    assert code == 1 and "nope.json" in capsys.readouterr().err


def test_unknown_bundle_lists_what_is_there(demo_dir, tmp_path, capsys):
    code = main(["upscale", str(demo_dir / "demo_input.png"), "--out", str(tmp_path / "o.png"),
                 "--models-dir", str(demo_dir), "--bundle", "other.safetensors"])
    err = capsys.readouterr().err
    assert code == 1 and "other.safetensors" in err and "onestep-demo-osediff.safetensors" in err
