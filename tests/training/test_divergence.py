"""A diverged run stops with a non-zero exit and one message, counts its skipped updates in
metrics.csv, never checkpoints non-finite weights or BN statistics, and says so in its summary."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from hvd_largebatch.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from hvd_largebatch.training.metrics import read_metrics
from hvd_largebatch.training.trainer import Trainer
from launch import CLI, REPO, run_ranks

EXIT_DIVERGED = 3




def one_error(out: str) -> str:
    lines = [line for line in out.splitlines() if "hvd-largebatch train: error:" in line]
    assert len(lines) == 1, out
    return lines[0].split("hvd-largebatch train: error: ", 1)[1]


def test_the_issues_lr_1e6_run_stops_with_exit_3(digits, tmp_path):
    # MP --set schedule.lr=1e6, on one process
    out = tmp_path / "x"
    proc = subprocess.run(
        [sys.executable, *CLI, "train", str(REPO / "configs/demo/digits.yaml"),
         "--set", "schedule.epochs=2", "--set", "schedule.decay=null", "--set", f"output.dir={out}",
         "--set", f"data.path={digits}", "--set", "data.image_size=8", "--set",
         "data.resize_shorter=8", "--set", "schedule.lr=1e6", "--set", "output.progress=false"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == EXIT_DIVERGED, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    message = one_error(proc.stderr)
    assert re.match(r"training diverged: \d+ consecutive updates skipped for non-finite gradients "
                    r"by update \d+ .*train\.max_skipped_steps = 20", message), message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["max_consecutive_skipped"] >= 20
    assert message == f"training diverged: {summary['error']}"
    assert not (out / CHECKPOINT_NAME).exists()  # nothing good to keep: no checkpoint at all
    rows = [r for r in read_metrics(str(out / "metrics.csv")) if r["kind"] == "train"]
    assert rows[-1]["skipped_steps"] == summary["skipped_steps"] >= 20
    loss = rows[-1]["loss"]
    assert math.isnan(loss) or loss > 1e6  # the record shows the blow-up


@pytest.mark.multiprocess
def test_divergence_mid_run_keeps_the_last_finite_checkpoint(digits, tmp_path):
    # 2 ranks (mpirun): 11 sane updates at lr 0.05, then lr 1e6; checkpoints every 4 updates
    out = tmp_path / "out"
    mapping = {
        "model": {"name": "small_resnet", "options": {"width": 4, "blocks": 1}},
        "data": {"source": "digits", "path": str(digits), "image_size": 8, "resize_shorter": 8,
                 "workers": 1},
        "schedule": {"phases": [{"end_epoch": 0.5, "global_batch": 64, "lr_start": 0.05,
                                 "momentum": 0.9},
                                {"end_epoch": 1.0, "global_batch": 64, "lr_start": 1.0e6,
                                 "momentum": 0.9}]},
        "train": {"max_per_rank_batch": 32, "log_every": 2, "checkpoint_every": 4,
                  "max_skipped_steps": 3},
        "output": {"dir": str(out), "progress": False, "plots": False, "tensorboard": False},
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(mapping))
    proc = run_ranks(*CLI, "train", str(cfg), np=2, launcher="mpirun", timeout=180)
    assert re.search(rf"Exit code:\s+{EXIT_DIVERGED}", proc.stdout), proc.stdout
    message = one_error(proc.stdout)
    assert message.startswith("training diverged: "), message
    kept = re.search(r"the last good checkpoint, (.*) \(update (\d+)\), is kept", message)
    assert kept and kept.group(1) == str(out / CHECKPOINT_NAME), message
    state = load_checkpoint(str(out / CHECKPOINT_NAME))
    assert state["updates"] == int(kept.group(2)) >= 8  # updates 4 and 8 were sane
    for name, tensor in state["model"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["last_checkpoint_updates"] == state["updates"]
    assert summary["updates"] > state["updates"]
    rows = [r for r in read_metrics(str(out / "metrics.csv")) if r["kind"] == "train"]
    skipped = [r["skipped_steps"] for r in rows]
    assert skipped == sorted(skipped) and skipped[0] == 0 and skipped[-1] == summary["skipped_steps"]


def test_skip_counters_on_the_device():
    # the counters the trainer keeps per step, against the sequence counted by hand
    trainer = Trainer.__new__(Trainer)
    trainer.device = torch.device("cpu")
    trainer._skips = torch.zeros(3, dtype=torch.int64)
    flags = [0, 1, 1, 0, 1, 1, 1, 0, 1]
    for flag in flags:
        trainer._count_skip(torch.tensor(bool(flag)))
    # 6 skipped in all, a current run of 1, the longest run 3
    assert trainer._skips.tolist() == [6, 1, 3]
