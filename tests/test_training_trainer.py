"""The trainer's method interface on a toy two-phase method (generator -> discriminator): phase order and gradient
isolation, per-group optimiser settings, accumulation, the LR schedule, logs and the command line."""

from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from osd_core.bundle import BundleMeta
from training.cli import main
from training.config import ConfigError, apply_overrides, config_from_dict
from training.methods import register_method
from training.methods.base import Method, Phase, PhaseOutput
from training.optim import WarmupConstant
from training.trainer import Trainer
from training_support import OSEDIFF_TOML, isolated_training, image_folder  # noqa: F401 (fixture)


@dataclass(frozen=True)
class ToyConfig:
    lambda_gan: float = 0.1


class Toy(Method):
    """G: a 1x1 conv from LQ to HQ; D: a 3x3 conv critic. Records what each phase saw."""

    name = "toy"
    config_class = ToyConfig

    def __init__(self, config, components, context):
        super().__init__(config, components, context)
        generator = context.init_generator
        self.g = torch.nn.Conv2d(3, 3, 1)
        self.d = torch.nn.Conv2d(3, 1, 3)
        with torch.no_grad():
            for p in [*self.g.parameters(), *self.d.parameters()]:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        self.seen: list[tuple[str, bool]] = []

    def trainable_modules(self):
        return {"g": self.g, "d": self.d}

    def phases(self):
        return [Phase("generator", {"gen": list(self.g.parameters())}),
                Phase("discriminator", {"disc": list(self.d.parameters())})]

    def phase_loss(self, phase, batch, carry, generator):
        d_has_grad = any(p.grad is not None for p in self.d.parameters())
        self.seen.append((phase, d_has_grad))
        if phase == "generator":
            out = self.models["g"](batch["lq"])
            carry["fake"] = out.detach()
            gan = F.softplus(-self.models["d"](out)).mean()
            loss = F.mse_loss(out, batch["hq"]) + self.cfg.lambda_gan * gan
            return PhaseOutput(loss, {"loss_g": float(loss.detach())})
        loss = F.softplus(-self.models["d"](batch["hq"])).mean() + F.softplus(self.models["d"](carry["fake"])).mean()
        return PhaseOutput(loss, {"loss_d": float(loss.detach())})

    def generate(self, lq, prompts, generator):
        return self.g(lq).clamp(-1, 1)

    def export_bundle(self):
        return BundleMeta(method="custom", base_family=self.components.family), {}


register_method("toy", Toy)


def _toy_config(tmp_path, *overrides, images=6):
    data = tomllib.loads(OSEDIFF_TOML.read_text())
    del data["osediff"]
    data["method"] = "toy"
    hq = image_folder(tmp_path / "hq", images, width=64, height=64)
    return config_from_dict(apply_overrides(data, [
        "model.tiny=true", f"data.hq_dir={hq.as_posix()}", "data.crop_size=64", "data.num_workers=0",
        f"train.output_dir={(tmp_path / 'run').as_posix()}", "train.mixed_precision=no", "train.batch_size=2",
        "train.max_steps=3", "train.save_every=0", "train.log_every=1", "train.progress_bar=false", *overrides]))


def test_phases_run_in_order_and_leave_each_other_no_gradient(tmp_path):
    trainer = Trainer(_toy_config(tmp_path, "toy.lambda_gan=1.0"))
    d_before = trainer.method.d.weight.detach().clone()
    trainer.run()
    assert [phase for phase, _ in trainer.method.seen] == ["generator", "discriminator"] * 3
    # the generator's GAN loss ran D, yet D had no gradient when its own phase began
    assert not any(has_grad for _, has_grad in trainer.method.seen)
    assert not torch.equal(trainer.method.d.weight, d_before)
    assert all(p.requires_grad for p in trainer.state.parameters)


def test_group_overrides_and_unknown_groups(tmp_path):
    trainer = Trainer(_toy_config(tmp_path, "optim.groups.disc.lr=1e-3", "optim.groups.disc.betas=[0.5, 0.9]"))
    gen, disc = (o.param_groups[0] for o in trainer.optimisers)
    assert (gen["name"], gen["lr"], gen["betas"], gen["weight_decay"]) == ("gen", 5e-5, (0.9, 0.999), 1e-2)
    assert (disc["name"], disc["lr"], disc["betas"], disc["weight_decay"]) == ("disc", 1e-3, (0.5, 0.9), 1e-2)
    with pytest.raises(ConfigError, match=r"names \['dsic'\].*groups are \['gen', 'disc'\]"):
        Trainer(_toy_config(tmp_path, "optim.groups.dsic.lr=1e-3"))


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    large = Trainer(_toy_config(tmp_path / "a", "toy.lambda_gan=0.0"))
    large.run()
    small = Trainer(_toy_config(tmp_path / "b", "toy.lambda_gan=0.0", "train.batch_size=1",
                                "train.grad_accumulation=2"))
    small.run()
    assert len(small.method.seen) == 2 * len(large.method.seen)
    for a, b in zip(large.method.g.parameters(), small.method.g.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert small.step == large.step == 3


def test_warmup_schedule_and_logs(tmp_path):
    assert [WarmupConstant(4)(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert WarmupConstant(0)(0) == 1.0
    config = _toy_config(tmp_path, "optim.schedule=\"constant_with_warmup\"", "optim.warmup_steps=2",
                         "train.log_every=2")
    trainer = Trainer(config)
    trainer.run()
    with open(tmp_path / "run" / "train_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [2, 3]  # every log_every steps, and the last one
    assert {"loss_g", "loss_d", "lr", "images_per_s", "generator/grad_norm"} <= set(rows[0])
    assert float(rows[0]["lr"]) == pytest.approx(5e-5) and float(rows[0]["images_per_s"]) > 0
    assert trainer.optimisers[0].param_groups[0]["lr"] == pytest.approx(5e-5)


def test_tensorboard_holds_the_csv_scalars(tmp_path):
    """TensorBoard (optional for training, in the test extra) gets the rows of train_log.csv as train/<term>."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    Trainer(_toy_config(tmp_path, "train.log_every=2")).run()
    with open(tmp_path / "run" / "train_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    board = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    for term in ("loss_g", "loss_d", "lr"):
        events = board.Scalars(f"train/{term}")
        assert [e.step for e in events] == [int(r["step"]) for r in rows]
        assert [e.value for e in events] == pytest.approx([float(r[term]) for r in rows], rel=1e-5)


def test_command_line_prints_the_resolved_config_and_reports_errors(tmp_path, capsys):
    hq = image_folder(tmp_path / "hq", 1)
    code = main(["--config", str(OSEDIFF_TOML), "model.tiny=true", f"data.hq_dir={hq}", "train.max_steps=7",
                 "--print-config"])
    printed = tomllib.loads(capsys.readouterr().out)
    assert code == 0 and printed["train"]["max_steps"] == 7 and printed["method"] == "osediff"
    assert main(["--config", str(OSEDIFF_TOML), "model.tiny=true", f"data.hq_dir={hq}", "train.max_stpes=7"]) == 2
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_a_missing_base_model_is_named_as_the_setting(tmp_path, caplog):
    hq = image_folder(tmp_path / "hq", 2)
    code = main(["--config", str(OSEDIFF_TOML), f"model.base={tmp_path / 'sd21'}", f"data.hq_dir={hq}",
                 "train.mixed_precision=no", "data.num_workers=0", "train.batch_size=1",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2 and "model.base" in caplog.text and "does not exist" in caplog.text
