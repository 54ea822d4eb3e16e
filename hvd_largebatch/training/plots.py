"""PNG plots of a run's ``metrics.csv`` and of several runs side by side (matplotlib, Agg).

* ``plot_run``: ``curves.png`` -- validation top-1 and loss (train loss too) against epochs and
  against parameter updates; ``schedule.png`` -- lr and global batch against epochs.

lr and batch are drawn from the ``train`` rows as steps that end at each row (a row holds the
values of the last iteration of its logging window).
* ``plot_comparison``: one figure for several runs (the demo's schedules): validation error
  against epochs and updates, validation loss against updates, and global batch, lr and noise
  scale against epochs (log scales).
* ``plot_adaptive``: adaptive batch runs (one panel per run): the global batch, the measured
  gradient noise scale B_simple and the threshold the batch grows at, against updates.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from hvd_largebatch.training.metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str, title: str = "") -> str:
    """Title, lay out, write and close ``fig``; returns ``path``."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(rows: Sequence[dict], kind: str, x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in rows if r["kind"] == kind and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _epoch_end(rows: Sequence[dict], kind: str, y: str) -> tuple[list, list]:
    """``y`` of ``kind`` rows against the fractional epoch at which they were taken
    (evaluations are at the end of their epoch: epoch + 1)."""
    xs, ys = [], []
    for r in rows:
        if r["kind"] == kind and r.get(y) is not None:
            xs.append(r["epoch"] + 1 if kind == "eval" else r["epoch_float"])
            ys.append(r[y])
    return xs, ys


def plot_run(csv_path: str, out_dir: str, title: str = "") -> list[str]:
    """Write ``curves.png`` and ``schedule.png`` for one run; return their paths."""
    plt = _pyplot()
    rows = read_metrics(csv_path)
    paths = []

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for col, (xlabel, use_updates) in enumerate((("epochs", False), ("parameter updates", True))):
        acc_ax, loss_ax = axes[0][col], axes[1][col]
        if use_updates:
            acc = _series(rows, "eval", "updates", "top1")
            eval_loss = _series(rows, "eval", "updates", "loss")
            train_loss = _series(rows, "train", "updates", "loss")
        else:
            acc = _epoch_end(rows, "eval", "top1")
            eval_loss = _epoch_end(rows, "eval", "loss")
            train_loss = _epoch_end(rows, "train", "loss")
        acc_ax.plot(*acc, marker="o", ms=3, label="validation top-1")
        acc_ax.set_ylabel("top-1 accuracy (%)")
        loss_ax.plot(*train_loss, lw=0.8, alpha=0.7, label="train loss")
        loss_ax.plot(*eval_loss, marker="o", ms=3, label="validation loss")
        loss_ax.set_ylabel("cross-entropy loss")
        loss_ax.set_yscale("log")
        for ax in (acc_ax, loss_ax):
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend()
    paths.append(_save(plt, fig, os.path.join(out_dir, "curves.png"),
                       title or os.path.basename(os.path.dirname(os.path.abspath(csv_path)))))

    fig, lr_ax = plt.subplots(figsize=(8, 4.5))
    x, lr = _series(rows, "train", "epoch_float", "lr")
    x2, batch = _series(rows, "train", "epoch_float", "global_batch")
    lr_ax.step(x, lr, where="pre", color="tab:blue", label="lr")
    lr_ax.set_xlabel("epochs")
    lr_ax.set_ylabel("lr", color="tab:blue")
    batch_ax = lr_ax.twinx()
    batch_ax.step(x2, batch, where="pre", color="tab:orange", label="global batch")
    batch_ax.set_ylabel("global batch", color="tab:orange")
    batch_ax.set_yscale("log", base=2)
    lr_ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, os.path.join(out_dir, "schedule.png"),
                       (title + ": " if title else "") + "lr and global batch"))
    return paths


_LINESTYLES = ("-", "--", "-.", ":")


def plot_comparison(runs: Mapping[str, str], out_path: str, title: str = "") -> str:
    """One 2x3 figure comparing runs (label -> metrics.csv path): validation error against
    epochs and updates, validation loss against updates; global batch, lr and Smith et al.'s
    noise scale against epochs. Returns ``out_path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for i, (label, path) in enumerate(runs.items()):
        rows = read_metrics(path)
        style = {"label": label, "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}
        epochs, top1 = _epoch_end(rows, "eval", "top1")
        updates, top1_u = _series(rows, "eval", "updates", "top1")
        axes[0][0].plot(epochs, [100 - a for a in top1], marker="o", ms=3, **style)
        axes[0][1].plot(updates, [100 - a for a in top1_u], marker="o", ms=3, **style)
        axes[0][2].plot(*_series(rows, "eval", "updates", "loss"), marker="o", ms=3, **style)
        for ax, column in zip(axes[1], ("global_batch", "lr", "noise_scale")):
            ax.step(*_series(rows, "train", "epoch_float", column), where="pre", **style)
    labels = (("epochs", "validation error (%)"), ("parameter updates", "validation error (%)"),
              ("parameter updates", "validation loss"), ("epochs", "global batch"),
              ("epochs", "lr"), ("epochs", "noise scale lr (N / B - 1) / (1 - m)"))
    for ax, (xlabel, ylabel) in zip(axes.flat, labels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[1][0].set_yscale("log", base=2)
    return _save(plt, fig, out_path, title)


def plot_adaptive(runs: Mapping[str, str], out_path: str, threshold: float, title: str = "") -> str:
    """One panel per adaptive batch run (label -> metrics.csv path): the global batch (steps),
    the smoothed B_simple logged with each row (``grad_noise_scale``, samples) and ``threshold``
    x the batch, above which a decision grows the batch, against parameter updates (log
    scale). Returns ``out_path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), sharey=True,
                             squeeze=False)
    for ax, (label, path) in zip(axes[0], runs.items()):
        rows = read_metrics(path)
        updates, batch = _series(rows, "train", "updates", "global_batch")
        ax.step(updates, batch, where="pre", label="global batch B")
        ax.step(updates, [threshold * b for b in batch], where="pre", linestyle="--",
                label=f"{threshold:g} x B: grows above")
        ax.plot(*_series(rows, "train", "updates", "grad_noise_scale"), ".", ms=3,
                label="measured B_simple")
        ax.set_xlabel("parameter updates")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("samples")
    axes[0][0].legend(fontsize=8)
    return _save(plt, fig, out_path, title)
