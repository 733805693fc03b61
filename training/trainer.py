"""The training loop on ``accelerate``: phases, accumulation, clipping, logs, validation, checkpoints, the bundle.

One optimiser step = ``train.grad_accumulation`` micro-batches; each micro-batch runs the method's phases in order
(``training.methods.base`` describes a phase). accelerate provides the device, DDP across processes
(``accelerate launch``), autocast and the fp16 grad scaler; the data order, the LR schedules and every random
stream are ours, so that a resumed run repeats the original exactly (``training.checkpoint``).

Random streams of process r: the data (``training.sampler``: pure functions of the seed, epoch and index), the
step generator ``SeedSequence([seed, STEP, r])`` handed to ``phase_loss`` (noise, timesteps), and the init generator
``SeedSequence([seed, INIT])`` the method builds its weights with (the same on every process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import torch

from osd_core.bundle import save_bundle
from osd_core.models import SDComponents, load_sd_components
from osd_core.tiny import tiny_components
from training.checkpoint import capture_rng, load_checkpoint, resolve_resume, restore_rng, save_checkpoint
from training.config import ModelConfig, TrainingConfig
from training.data import TrainingImages, training_loader
from training.logs import RunLog
from training.methods import method_class
from training.methods.base import RunContext
from training.module_state import ModuleState
from training.optim import build_optimiser, build_schedule, check_group_names
from training.sampler import ResumableSampler, seed_of
from training.schema import ConfigError
from training.toml_write import dumps
from training.warm_start import apply_base_weights, load_init_bundle, warm_start

logger = logging.getLogger(__name__)

INIT, STEP = 3, 4  # generator streams (0-2 are the data's, training.sampler)
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_components(config: ModelConfig) -> SDComponents:
    """The base SD components on the CPU in float32 (tiny random ones for ``model.tiny``)."""
    if config.tiny:
        return tiny_components(config.tiny_seed)
    if not Path(config.base).exists():
        raise FileNotFoundError(f"model.base {config.base!r} does not exist; set it to a local SD 2.1-base diffusers "
                                "folder (unet/, vae/, text_encoder/) or single .safetensors checkpoint.")
    return load_sd_components(config.base, dtype=torch.float32, tokenizer_dir=config.tokenizer or None)


def weight_dtype(config: TrainingConfig) -> torch.dtype:
    """``model.dtype``, with "auto" following ``train.mixed_precision``."""
    name = config.model.dtype
    if name == "auto":
        name = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[config.train.mixed_precision]
    return WEIGHT_DTYPES[name]


def _accelerator(config: TrainingConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision = \"fp16\" needs a CUDA GPU and none is available; use "
                          "train.mixed_precision=no (or bf16).")
    # Phases freeze each other's parameters, so a DDP module may leave parameters unused in a backward pass.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=config.train.mixed_precision, kwargs_handlers=[ddp],
                       gradient_accumulation_steps=config.train.grad_accumulation)


class Trainer:
    """Builds everything from a resolved config; ``run()`` trains to ``train.max_steps`` and writes the bundle."""

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        t = config.train
        self.accelerator = acc = _accelerator(config)
        rank = acc.process_index
        # the data first: a wrong folder fails before the models load
        self.dataset = TrainingImages(config.data, t.seed)
        self.sampler = ResumableSampler(len(self.dataset), t.batch_size, seed=t.seed, rank=rank,
                                        world_size=acc.num_processes)
        self.loader = training_loader(self.dataset, self.sampler, config.data.num_workers)
        self.validator = None
        if t.val_every and acc.is_main_process:
            from training.validation import Validator

            self.validator = Validator(config, acc.device)
        self.generator = torch.Generator().manual_seed(seed_of(t.seed, STEP, rank))
        init_bundle = load_init_bundle(config)
        components = load_components(config.model)
        if init_bundle is not None:
            apply_base_weights(components, init_bundle)
        components = components.to(acc.device)
        context = RunContext(acc.device, weight_dtype(config), torch.Generator().manual_seed(seed_of(t.seed, INIT)))
        self.method = method_class(config.method)(config, components, context)
        if init_bundle is not None:
            warm_start(self.method, init_bundle)
        self.modules = self.method.trainable_modules()
        self.phases = self.method.phases()
        check_group_names(config.optim, self.phases)
        self.state = ModuleState(self.modules, self.phases)
        if config.model.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        optimisers = [build_optimiser(config.optim, phase) for phase in self.phases]
        self.schedules = [build_schedule(config.optim, o) for o in optimisers]
        prepared = acc.prepare(*self.modules.values(), *optimisers)
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self.prepared = list(prepared[: len(self.modules)])
        self.optimisers = list(prepared[len(self.modules):])
        self.method.bind(dict(zip(self.modules, self.prepared)))
        self.step = self.epoch = self.position = 0
        self._batches = None
        checkpoint = resolve_resume(t.resume, t.output_dir)
        if checkpoint is not None:
            self._restore(checkpoint)

    def _enable_gradient_checkpointing(self) -> None:
        """Every diffusers model inside a trainable module that supports it recomputes activations in backward."""
        switched = 0
        for module in self.modules.values():
            for sub in module.modules():
                if getattr(sub, "_supports_gradient_checkpointing", False) and hasattr(
                        sub, "enable_gradient_checkpointing"):
                    sub.enable_gradient_checkpointing()
                    switched += 1
        if not switched:
            logger.warning("model.gradient_checkpointing is on but no trainable module supports it")

    # ------------------------------------------------------------------ data

    def _next_batch(self) -> dict:
        while True:
            if self._batches is None:
                self.sampler.set_position(self.epoch, self.position)
                self._batches = iter(self.loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self.epoch, self.position, self._batches = self.epoch + 1, 0, None
                continue
            self.position += 1
            device = self.accelerator.device
            return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ one optimiser step

    @contextlib.contextmanager
    def _only(self, phase_index: int):
        """Only this phase's parameters require grad inside the block."""
        own = {id(p) for p in self.phases[phase_index].parameters()}
        for p in self.state.parameters:
            p.requires_grad_(id(p) in own)
        try:
            yield
        finally:
            for p in self.state.parameters:
                p.requires_grad_(True)

    def _micro_batch(self, batch: dict, terms: dict[str, float]) -> None:
        acc = self.accelerator
        carry: dict = {}
        for i, (phase, optimiser, schedule) in enumerate(zip(self.phases, self.optimisers, self.schedules)):
            with self._only(i):
                with acc.autocast():
                    out = self.method.phase_loss(phase.name, batch, carry, self.generator)
                acc.backward(out.loss)
                if acc.sync_gradients and self.config.optim.max_grad_norm > 0:
                    acc.unscale_gradients(optimiser)
                    norm = torch.nn.utils.clip_grad_norm_(phase.parameters(), self.config.optim.max_grad_norm)
                    terms[f"{phase.name}/grad_norm"] = terms.get(f"{phase.name}/grad_norm", 0.0) + float(norm)
                optimiser.step()
                if acc.sync_gradients and not optimiser.step_was_skipped:
                    schedule.step()
                optimiser.zero_grad(set_to_none=True)
            for name, value in out.terms.items():
                terms[name] = terms.get(name, 0.0) + value / self.config.train.grad_accumulation

    def train_step(self) -> dict[str, float]:
        """One optimiser step (all micro-batches and phases); returns the step's loss terms."""
        terms: dict[str, float] = {}
        for _ in range(self.config.train.grad_accumulation):
            batch = self._next_batch()
            with self.accelerator.accumulate(*self.prepared):
                self._micro_batch(batch, terms)
        self.step += 1
        self.method.after_step(self.step)
        return terms

    # ------------------------------------------------------------------ the run

    def run(self, stop_at: int | None = None) -> Path | None:
        """Train until ``train.max_steps`` (or ``stop_at``); returns the bundle's path once max_steps is reached."""
        t, acc = self.config.train, self.accelerator
        end = min(t.max_steps, stop_at or t.max_steps)
        log = RunLog(t.output_dir, enabled=acc.is_main_process, start_step=self.step, total_steps=t.max_steps,
                     progress_bar=t.progress_bar)
        images_per_step = t.batch_size * t.grad_accumulation * acc.num_processes
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        for module in self.modules.values():
            module.train()
        try:
            while self.step < end:
                for name, value in self.train_step().items():
                    window[name] = window.get(name, 0.0) + value
                window_steps += 1
                if self.step % t.log_every == 0 or self.step == end:
                    values = self._reduce({k: v / window_steps for k, v in window.items()})
                    values["lr"] = self.schedules[0].get_last_lr()[0]
                    values["images_per_s"] = images_per_step * window_steps / (time.perf_counter() - window_start)
                    log.scalars(self.step, values)
                    log.progress(self.step, {k: v for k, v in values.items() if not k.endswith("grad_norm")})
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                if t.save_every and (self.step % t.save_every == 0 or self.step == t.max_steps):
                    self.save()
                if t.val_every and (self.step % t.val_every == 0 or self.step == t.max_steps):
                    self.validate(log)
        finally:
            log.close()
        return self.export() if self.step >= t.max_steps else None

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not values:
            return values
        names = sorted(values)
        tensor = torch.tensor([values[n] for n in names], device=self.accelerator.device)
        return dict(zip(names, self.accelerator.reduce(tensor, "mean").tolist()))

    def validate(self, log: RunLog) -> None:
        """Score the validation set on the main process (the others wait)."""
        if self.validator is not None:
            for module in self.modules.values():
                module.eval()
            rows, means = self.validator.run(self.method, self.step)
            log.validation(self.step, rows, means)
            for module in self.modules.values():
                module.train()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ checkpoints and the bundle

    def save(self) -> Path:
        """Write a checkpoint of the current step (see ``training.checkpoint``)."""
        optim = {"optimisers": [o.state_dict() for o in self.optimisers],
                 "schedules": [s.state_dict() for s in self.schedules],
                 "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None}
        path = save_checkpoint(
            self.accelerator, self.config.train.output_dir, step=self.step, epoch=self.epoch, position=self.position,
            modules=self.state.capture(), optim=optim, extra=self.method.extra_state(),
            rng=capture_rng({"step": self.generator}), meta={"method": self.config.method,
                                                             "config": self.config.to_dict()},
            config_toml=dumps(self.config.to_dict()), keep_last=self.config.train.keep_last)
        logger.info("saved checkpoint %s", path)
        return path

    def _restore(self, path: Path) -> None:
        acc = self.accelerator
        checkpoint = load_checkpoint(path, acc.process_index, acc.num_processes)
        if checkpoint.meta.get("method") != self.config.method:
            raise ValueError(f"checkpoint {str(path)!r} was made by method {checkpoint.meta.get('method')!r}, not "
                             f"{self.config.method!r}; resume it with its own config.")
        _warn_config_changes(checkpoint.meta.get("config", {}), self.config.to_dict())
        self.state.restore(checkpoint.modules, str(path))
        for optimiser, state in zip(self.optimisers, checkpoint.optim["optimisers"], strict=True):
            optimiser.load_state_dict(state)
        for schedule, state in zip(self.schedules, checkpoint.optim["schedules"], strict=True):
            schedule.load_state_dict(state)
        if acc.scaler is not None and checkpoint.optim["scaler"] is not None:
            acc.scaler.load_state_dict(checkpoint.optim["scaler"])
        self.method.load_extra_state(checkpoint.extra)
        if checkpoint.rng is not None:
            restore_rng(checkpoint.rng, {"step": self.generator})
        self.step, self.epoch, self.position = checkpoint.step, checkpoint.epoch, checkpoint.position
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.position)

    def export(self) -> Path | None:
        """Write the adapter bundle (main process) with the resolved config and step count in its ``extra``."""
        path = None
        if self.accelerator.is_main_process:
            meta, tensors = self.method.export_bundle()
            training = {"config": self.config.to_dict(), "steps": self.step}
            meta = dataclasses.replace(meta, extra={**meta.extra, "training": training})
            name = self.config.train.bundle_name or f"{self.config.method}.safetensors"
            path = Path(self.config.train.output_dir) / name
            save_bundle(path, meta, tensors)
            logger.info("wrote the adapter bundle %s; copy it to ComfyUI/models/onestep_sr/", path)
        self.accelerator.wait_for_everyone()
        return path


def _warn_config_changes(saved: dict, current: dict, prefix: str = "") -> None:
    """Log the settings that differ from the checkpoint's (resume and max_steps may change freely)."""
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            _warn_config_changes(old, new, dotted + ".")
        elif old != new and dotted not in ("train.resume", "train.max_steps"):
            logger.warning("resuming with %s = %r; the checkpoint was made with %r", dotted, new, old)
