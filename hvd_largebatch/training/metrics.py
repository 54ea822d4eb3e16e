"""Rank 0's training record: ``metrics.csv``, TensorBoard events and the per-epoch progress bar.

Every row of ``metrics.csv`` is one of two kinds:

* ``train`` -- written every ``train.log_every`` iterations and at the end of each epoch. The
  schedule values (``lr``, ``momentum``, ``global_batch``, ``micro_batches``, ``noise_scale``)
  are those of the row's iteration, read back from the optimizer's param groups and from the
  number of samples that all ranks actually consumed; ``loss`` / ``top1`` are averages over the
  samples of all ranks since the previous train row; ``images_per_s`` is the global rate over
  that window.
* ``eval`` -- one per evaluation: ``loss``, ``top1``, ``top5`` over the whole validation set
  (summed over ranks, then divided by the number of samples).

``updates`` counts optimizer steps since the start of training (iteration ``step`` of epoch
``epoch`` is update ``updates``, counted from 1), ``samples`` the training samples consumed,
``wall_time`` seconds of training (summed over resumed segments). ``noise_scale`` is Smith et
al.'s ``g = lr / (1 - m) * (N / B - 1)``; ``grad_noise_scale`` and ``trust_ratio_*`` are filled
when the optimizer reports them (empty otherwise). ``skipped_steps`` (train rows) counts the
updates skipped so far for non-finite gradients (cumulative over the run, resumes included).

On resume, rows of updates after the checkpoint (written by the interrupted run) are dropped, and
TensorBoard is told to purge the same steps, so the record reads as one uninterrupted run.
"""
from __future__ import annotations

import csv
import math
import os
import sys

COLUMNS = (
    "kind", "epoch", "step", "epoch_float", "updates", "samples", "lr", "momentum",
    "global_batch", "micro_batches", "noise_scale", "grad_noise_scale", "trust_ratio_min",
    "trust_ratio_mean", "trust_ratio_max", "loss", "top1", "top5", "images_per_s", "wall_time",
    "skipped_steps",
)
#: TensorBoard tag of each numeric column (x axis: ``updates``).
TB_TAGS = {
    "lr": "schedule/lr", "momentum": "schedule/momentum", "global_batch": "schedule/global_batch",
    "micro_batches": "schedule/micro_batches", "noise_scale": "schedule/noise_scale",
    "grad_noise_scale": "train/grad_noise_scale", "trust_ratio_min": "lars/trust_ratio_min",
    "trust_ratio_mean": "lars/trust_ratio_mean", "trust_ratio_max": "lars/trust_ratio_max",
    "loss": "{kind}/loss", "top1": "{kind}/top1", "top5": "{kind}/top5",
    "images_per_s": "train/images_per_s", "epoch_float": "train/epoch", "wall_time": "train/wall_time",
    "skipped_steps": "train/skipped_steps",
}
CSV_NAME = "metrics.csv"


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.csv``, numbers as floats (ints where integral), empty cells None."""
    with open(path, newline="") as f:
        return [{k: _number(v) if k != "kind" else v for k, v in row.items()}
                for row in csv.DictReader(f)]


def _number(text: str):
    if text == "" or text is None:
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


class MetricsLogger:
    """Writes rows to ``<dir>/metrics.csv`` and TensorBoard events under ``<dir>/events``.

    ``resume_updates``: the update count of the checkpoint a resumed run starts from; rows after
    it are dropped. ``None`` starts a new record (an existing ``metrics.csv`` is replaced).
    """

    def __init__(self, directory: str, *, tensorboard: bool = True, resume_updates: int | None = None):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, CSV_NAME)
        kept = []
        if resume_updates is not None and os.path.exists(self.path):
            kept = [row for row in _raw_rows(self.path) if int(row["updates"]) <= resume_updates]
        self._file = open(self.path, "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._file.flush()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_updates + 1 if resume_updates is not None else None
            self._tb = SummaryWriter(os.path.join(directory, "events"), purge_step=purge)

    def log(self, row: dict) -> None:
        """Append one row (keys from ``COLUMNS``; missing ones stay empty)."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown metrics columns {sorted(unknown)}")
        self._csv.writerow({k: _format(row.get(k)) for k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            for key, tag in TB_TAGS.items():
                value = row.get(key)
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(tag.format(kind=row["kind"]), value, int(row["updates"]))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _raw_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class ProgressBar:
    """A tqdm bar over the iterations of one epoch (stderr, rank 0), showing the global
    images/s, the loss, the lr, the global batch and the skipped updates (once there are any);
    a no-op when disabled."""

    def __init__(self, enabled: bool, epoch: int, total: int, initial: int):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="it",
                             file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, steps: int, *, images_per_s: float, loss: float, lr: float, batch: int,
               skipped: int = 0) -> None:
        """Advance by ``steps`` iterations; ``skipped``: updates skipped so far (shown when > 0)."""
        if self._bar is not None:
            extra = {"skipped": skipped} if skipped else {}
            self._bar.set_postfix(img_s=f"{images_per_s:.0f}", loss=f"{loss:.4f}", lr=f"{lr:.4g}",
                                  batch=batch, **extra, refresh=False)
            self._bar.update(steps)

    def set_total(self, total: int) -> None:
        """The epoch now has ``total`` iterations (an adaptive batch grew)."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
