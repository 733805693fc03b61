"""Run logs: CSV files always, TensorBoard when it is installed, and a progress bar, on the main process only.

``train_log.csv`` gets one row per ``train.log_every`` steps: step, learning rate, images per second and every loss
term the method reports (averaged over the steps since the last row and over processes); ``val_metrics.csv`` one row
per validation image and a ``mean`` row. When a run resumes from step s, rows after s (written by the interrupted run
after its last checkpoint) are dropped, so each file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class CsvLog:
    """Append-only CSV with a header fixed by the file or by its first row; rows after ``resume_step`` dropped."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        self.fields: list[str] | None = None
        self._warned: set[str] = set()
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.fields = list(reader.fieldnames or []) or None
                rows = [r for r in reader if _step_of(r) <= resume_step]
            if self.fields:
                self._write(rows, mode="w")

    def append(self, row: dict) -> None:
        if self.fields is None:
            self.fields = list(row)
            self._write([], mode="w")
        new = sorted(set(row) - set(self.fields) - self._warned)
        if new:
            logger.warning("%s: columns %s appeared after the header was written; they are not logged", self.path, new)
            self._warned.update(new)
        self._write([row], mode="a")

    def _write(self, rows: list[dict], mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open(mode, newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)


def _step_of(row: dict) -> int:
    try:
        return int(row.get("step") or 0)
    except ValueError:
        return 0


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard is not installed (pip install tensorboard); logging to CSV only")
        return None
    return SummaryWriter(str(folder))


class RunLog:
    """The training run's logs; a no-op on processes other than the main one (``enabled`` False)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, start_step: int, total_steps: int,
                 progress_bar: bool = True) -> None:
        self.enabled = enabled
        out = Path(output_dir)
        self.train_csv = CsvLog(out / "train_log.csv", start_step) if enabled else None
        self.val_csv = CsvLog(out / "val_metrics.csv", start_step) if enabled else None
        self.board = _tensorboard(out / "tensorboard") if enabled else None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and progress_bar),
                        desc="training", unit="step", dynamic_ncols=True)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """Advance the bar to ``step`` and show ``values`` (loss terms, images/s)."""
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One ``train_log.csv`` row and the TensorBoard scalars ``train/<name>``."""
        if not self.enabled:
            return
        self.train_csv.append({"step": step, **values})
        if self.board is not None:
            for name, value in values.items():
                self.board.add_scalar(f"train/{name}", value, step)

    def validation(self, step: int, rows: list[dict], means: dict[str, float]) -> None:
        """Per-image ``val_metrics.csv`` rows, a ``mean`` row, and TensorBoard scalars ``val/<metric>``."""
        if not self.enabled:
            return
        for row in rows:
            self.val_csv.append({"step": step, **row})
        self.val_csv.append({"step": step, "image": "mean", **means})
        if self.board is not None:
            for name, value in means.items():
                self.board.add_scalar(f"val/{name}", value, step)
        logger.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))

    def close(self) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()
