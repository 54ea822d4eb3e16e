"""The trainer on real Horovod ranks (CPU, Gloo / MPI): the lr and batch used at every step,
kill-and-resume, resume on another world size, bad input on 2 ranks, crash-safe checkpoints,
``--synthetic`` rehearsal."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hvd_largebatch.errors import ConfigError, DataError
from hvd_largebatch.schedules import from_config, preset
from hvd_largebatch.training.checkpoint import (CHECKPOINT_NAME, check_model_matches, load_checkpoint,
                                                resolve_resume, save_checkpoint)
from hvd_largebatch.training.metrics import MetricsLogger, read_metrics
from hvd_largebatch.training.setup import micro_batch_plan, rehearsal_schedule
from launch import CLI, MP, REPO, run_ranks


# Three phases: a linear warmup at batch 32, then batch 64 from epoch 0.25 (mid-epoch) with
# another momentum, then batch 96. With max_per_rank_batch 16 on 2 ranks: 1, 2, 3 micro-batches.
PHASES = [
    {"end_epoch": 0.25, "global_batch": 32, "momentum": 0.9, "lr_start": 0.02, "lr_end": 0.1,
     "shape": "linear"},
    {"end_epoch": 1.0, "global_batch": 64, "momentum": 0.8, "lr_start": 0.1},
    {"end_epoch": 1.5, "global_batch": 96, "momentum": 0.9, "lr_start": 0.05},
]
N_TRAIN = 1438  # write_digits_folder's training split


NO_AUGMENTATION = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip": False}
AUGMENTATION = {"crop_scale": [0.3, 1.0], "crop_ratio": [0.75, 1.3333], "flip": True}


def config(digits: Path, out: Path, augmentation: dict = NO_AUGMENTATION, **train) -> dict:
    return {
        "model": {"name": "small_resnet", "options": {"width": 4}},
        "data": {"source": "digits", "path": str(digits), "image_size": 8, "resize_shorter": 8,
                 "workers": 1, **augmentation},
        "schedule": {"name": "test", "phases": PHASES},
        "optimizer": {"name": "lars", "weight_decay": 1.0e-4, "trust_coefficient": 0.02,
                      "shard_optimizer_state": True},
        "train": {"max_per_rank_batch": 16, "log_every": 1, "noise_scale_every": 1, **train},
        "output": {"dir": str(out), "progress": False, "plots": False, "tensorboard": False},
    }


def write_config(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path




@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    """An uninterrupted 2-rank run (LARS, sharded optimizer state, random crops and flips) with
    checkpoints every 5 updates (shared by several tests)."""
    work = tmp_path_factory.mktemp("ref")
    cfg = write_config(work / "cfg.yaml", config(digits, work / "out", AUGMENTATION, checkpoint_every=5))
    proc = run_ranks(*CLI, "train", str(cfg), np=2, timeout=180)
    assert proc.returncode == 0, proc.stdout
    (work / "digits_path").write_text(str(digits))
    return work


def schedule_for_test():
    return from_config({"dataset_size": N_TRAIN, "phases": PHASES})


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(str(out / "metrics.csv")) if r["kind"] == "train"]


@pytest.mark.multiprocess
def test_lr_batch_and_micro_batches_follow_the_schedule_every_step(reference):
    schedule = schedule_for_test()
    rows = train_rows(reference / "out")
    assert schedule.total_updates == 36  # 12 + 16 iterations in epoch 0, 8 in epoch 1
    assert [r["updates"] for r in rows] == list(range(1, 37))
    for row in rows:
        point = schedule.at(row["epoch"], row["step"])
        assert row["lr"] == pytest.approx(point.lr, rel=1e-12)
        assert row["momentum"] == point.momentum
        assert row["global_batch"] == point.global_batch  # samples all ranks actually read
        assert row["micro_batches"] == {32: 1, 64: 2, 96: 3}[point.global_batch]
    # by hand: the warmup adds (0.1 - 0.02) * 32 / (0.25 * 1438) per iteration of 32 samples
    assert rows[0]["lr"] == pytest.approx(0.02)
    assert rows[11]["lr"] == pytest.approx(0.02 + 0.08 * 11 * 32 / (0.25 * N_TRAIN))
    assert (rows[11]["global_batch"], rows[12]["global_batch"]) == (32, 64)  # mid-epoch change
    assert (rows[12]["epoch"], rows[12]["step"], rows[12]["lr"], rows[12]["momentum"]) == (0, 12, 0.1, 0.8)
    assert (rows[28]["epoch"], rows[28]["step"], rows[28]["global_batch"]) == (1, 0, 96)
    assert rows[-1]["samples"] == 12 * 32 + 16 * 64 + 8 * 96
    assert all(0 < r["trust_ratio_min"] <= r["trust_ratio_mean"] <= r["trust_ratio_max"] for r in rows)
    assert all(r["grad_noise_scale"] > 0 for r in rows[3:])  # measured from the 2 ranks' gradients
    evals = [r for r in read_metrics(str(reference / "out" / "metrics.csv")) if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in evals)
    state = load_checkpoint(str(reference / "out" / CHECKPOINT_NAME))
    assert (state["epoch"], state["step"], state["updates"]) == (2, 0, 36)
    # the last evaluation, redone on one process from the image files: 359 samples split 180 /
    # 179 over the ranks, so a mean of per-rank means would differ from the true mean
    loss, top1 = evaluate_by_hand(state, Path(reference / "digits_path").read_text())
    assert evals[-1]["loss"] == pytest.approx(loss, rel=1e-4)
    assert abs(evals[-1]["top1"] - top1) <= 100 / 359 / 2


def evaluate_by_hand(state: dict, digits: str) -> tuple[float, float]:
    import numpy as np
    from PIL import Image

    from hvd_largebatch.data import DIGITS_MEAN, DIGITS_STD, FileIndex
    from hvd_largebatch.models import build_model

    val = FileIndex.from_folder(os.path.join(digits, "val"))
    pixels = np.stack([np.asarray(Image.open(val.path(i)), dtype=np.float32) for i in range(len(val))])
    x = (torch.from_numpy(pixels)[:, None].expand(-1, 3, -1, -1) / 255 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    model = build_model(state["model_name"], state["num_classes"], state["model_options"])
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        logits = model(x)
    labels = torch.from_numpy(val.labels)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return loss, 100.0 * (logits.argmax(1) == labels).float().mean().item()


def final_state(out: Path) -> dict:
    return load_checkpoint(str(out / CHECKPOINT_NAME))


def assert_bit_identical(ours: dict, theirs: dict) -> None:
    """Every parameter and buffer (BN statistics averaged over ranks, and each rank's own) and
    every momentum buffer of two checkpoints are bitwise equal."""
    assert ours["model"].keys() == theirs["model"].keys()
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name
    for rank in (0, 1):
        assert ours["bn_local"][rank].keys() == theirs["bn_local"][rank].keys()
        for name, tensor in theirs["bn_local"][rank].items():
            assert torch.equal(ours["bn_local"][rank][name], tensor), (rank, name)
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for key, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])


@pytest.mark.multiprocess
def test_kill_in_the_last_epoch_and_resume_ends_bit_identical(reference, digits, tmp_path):
    # the last checkpoint before the kill (after update 33) is the one of update 30, in the
    # 3-micro-batch phase of epoch 1
    cfg = write_config(tmp_path / "cfg.yaml",
                       config(digits, tmp_path / "out", AUGMENTATION, checkpoint_every=5))
    crashed = run_ranks(MP / "train_crash.py", "33", str(cfg), np=2, timeout=180)
    assert "killed after update 33" in crashed.stdout and crashed.returncode != 0, crashed.stdout
    assert final_state(tmp_path / "out")["updates"] == 30
    resumed = run_ranks(*CLI, "train", str(cfg), "--resume", "auto", np=2, timeout=180)
    assert resumed.returncode == 0, resumed.stdout
    assert_bit_identical(final_state(tmp_path / "out"), final_state(reference / "out"))


@pytest.mark.multiprocess
def test_kill_and_resume_equals_the_uninterrupted_run(reference, digits, tmp_path):
    # checkpoints every 5 updates, plus one requested with SIGUSR1 to rank 0 after update 11:
    # agreed at the next logging row (update 12) and written after it; killed after update 14.
    # Random crops and flips: each sample's are a function of (seed, epoch, index) only
    cfg = write_config(tmp_path / "cfg.yaml",
                       config(digits, tmp_path / "out", AUGMENTATION, checkpoint_every=5))
    crashed = run_ranks(MP / "train_crash.py", "14", "--usr1-at", "11", str(cfg), np=2, timeout=180)
    assert crashed.returncode != 0, crashed.stdout
    assert "killed after update 14" in crashed.stdout
    at_crash = final_state(tmp_path / "out")
    assert (at_crash["epoch"], at_crash["step"], at_crash["updates"]) == (0, 12, 12)
    assert at_crash["sampler"]["step"] == 12 and at_crash["sampler"]["samples_seen"] == 12 * 32
    # the sharded optimizer state was gathered: a momentum buffer for every parameter
    assert len(at_crash["optimizer"]["state"]) == len([
        n for n in at_crash["model"] if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))])
    assert max(r["updates"] for r in train_rows(tmp_path / "out")) == 14  # rows past the checkpoint
    # mid-epoch, each rank's BN statistics are its own; the checkpoint holds both and their mean
    local = at_crash["bn_local"]
    assert not torch.equal(local[0]["stem.1.running_mean"], local[1]["stem.1.running_mean"])
    assert torch.equal(at_crash["model"]["stem.1.running_mean"],
                       (local[0]["stem.1.running_mean"] + local[1]["stem.1.running_mean"]) / 2)
    shutil.copytree(tmp_path / "out", tmp_path / "crashed")  # for the other-world-size test

    resumed = run_ranks(*CLI, "train", str(cfg), "--resume", "auto", np=2, timeout=180)
    assert resumed.returncode == 0, resumed.stdout
    ours, theirs = final_state(tmp_path / "out"), final_state(reference / "out")
    assert ours["updates"] == theirs["updates"] == 36
    assert_bit_identical(ours, theirs)
    # metrics.csv reads as one run: the interrupted run's rows 13 and 14 were replaced
    rows, ref_rows = train_rows(tmp_path / "out"), train_rows(reference / "out")
    assert [r["updates"] for r in rows] == list(range(1, 37))
    assert [(r["lr"], r["global_batch"], r["loss"]) for r in rows] == \
        [(r["lr"], r["global_batch"], r["loss"]) for r in ref_rows]

    # the same checkpoint, continued on ONE process: same position, schedule and data order
    single = write_config(tmp_path / "one.yaml",
                          config(digits, tmp_path / "crashed", AUGMENTATION, checkpoint_every=5))
    proc = subprocess.run([sys.executable, *CLI, "train", str(single), "--resume", "auto"],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = train_rows(tmp_path / "crashed")
    assert [r["updates"] for r in rows] == list(range(1, 37))
    for row, ref in zip(rows[12:], ref_rows[12:]):
        assert (row["epoch"], row["step"], row["lr"], row["global_batch"]) == \
            (ref["epoch"], ref["step"], ref["lr"], ref["global_batch"])
        # one rank holds the whole per-rank batch: twice the micro-batches for the same cap
        assert row["micro_batches"] == 2 * ref["micro_batches"]
    # the first resumed update reads the same samples as in the 2-rank run, so its loss is
    # close (BN normalizes over 2x larger micro-batches here: not bit-identical)
    assert rows[12]["loss"] == pytest.approx(ref_rows[12]["loss"], rel=0.05)
    assert final_state(tmp_path / "crashed")["world_size"] == 1


@pytest.mark.multiprocess
def test_update_is_the_exact_global_batch_mean_with_uneven_micro_batches(digits, tmp_path):
    # train on the 359 validation images (an odd count): batch 32 = 2 micro-batches of 8 per
    # rank, lr and momentum change mid-epoch, and the epoch ends with a partial batch of
    # 359 - 11 * 32 = 7 samples: 3 / 4 per rank, micro-batches 1 + 2 and 2 + 2. SGD with sharded
    # optimizer state against plain torch.optim.SGD on one process.
    for split in ("train", "val"):
        (tmp_path / "odd").mkdir(exist_ok=True)
        os.symlink(os.path.join(digits, "val"), tmp_path / "odd" / split)
    mapping = config(digits, tmp_path / "out", max_per_rank_batch=8, log_every=10)
    mapping["data"].update(source="folder", path=str(tmp_path / "odd"), stats="digits")
    mapping["optimizer"] = {"name": "sgd", "weight_decay": 1.0e-4, "shard_optimizer_state": True}
    mapping["schedule"] = {"drop_last": False, "phases": [
        {"end_epoch": 0.5, "global_batch": 32, "momentum": 0.9, "lr_start": 0.2},
        {"end_epoch": 1, "global_batch": 32, "momentum": 0.5, "lr_start": 0.05}]}
    cfg = write_config(tmp_path / "cfg.yaml", mapping)
    proc = run_ranks(MP / "train_exact.py", str(cfg), np=2, timeout=180)
    assert proc.returncode == 0, proc.stdout
    assert sorted(re.findall(r"RANK (\d) EXACT OK", proc.stdout)) == ["0", "1"], proc.stdout
    assert "checkpoint momentum OK" in proc.stdout, proc.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("case,launcher", [("batch", "gloo"), ("folder", "mpirun"),
                                           ("model", "gloo"), ("key", "gloo"),
                                           ("filelist", "mpirun")])
def test_bad_input_ends_every_rank_with_one_message(case, launcher, reference, digits, tmp_path):
    mapping = config(digits, tmp_path / "out")
    extra = []
    if case == "batch":
        mapping["schedule"] = {"epochs": 1, "batch": 33, "lr": 0.1}
        expected = ("schedule.phases[0].global_batch: global batch 33 (epochs 0-1) is not "
                    "divisible by world size 2")
    elif case == "folder":
        mapping["data"].update(source="folder", path=str(tmp_path / "nowhere"))
        expected = f"DataError: {tmp_path / 'nowhere'}: data.path does not exist"
    elif case == "model":
        mapping["model"] = {"name": "wrn_16_4"}
        extra = ["--resume", str(reference / "out" / CHECKPOINT_NAME)]
        expected = "model.name: " + str(reference / "out" / CHECKPOINT_NAME) + " holds a small_resnet model"
    elif case == "filelist":  # the list names a file that is gone: found at indexing
        copy = tmp_path / "listed"
        shutil.copytree(digits, copy)
        sixth = (copy / "train.txt").read_text().splitlines()[5].split()[0]
        (copy / sixth).unlink()
        mapping["data"].update(source="filelist", path=str(copy), train_list="train.txt",
                               val_list="val.txt", stats="digits")
        # the 2 ranks of this node share the check: sample 5 is rank 1's
        expected = (f"rank 1 of 2: DataError: {copy / 'train.txt'}:6: {copy / sixth}: listed "
                    f"file not found")
    else:  # a typo on the command line
        extra = ["--set", "train.warmup_epochs=5"]
        expected = "train.warmup_epochs: unknown key"
    cfg = write_config(tmp_path / "cfg.yaml", mapping)
    start = time.monotonic()
    # the launcher helper's limit is far above the bound asserted below, and Gloo's own timeout
    # (what would end a hang under horovodrun) above both: the job must end by itself, in time
    proc = run_ranks(*CLI, "train", str(cfg), *extra, np=2, launcher=launcher, timeout=150,
                     env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "600"})
    assert proc.returncode != 0, proc.stdout
    assert proc.stdout.count(expected) == 1, proc.stdout
    assert proc.stdout.count("hvd-largebatch train: error:") == 1, proc.stdout
    assert not (tmp_path / "out" / "metrics.csv").exists()  # no training started
    assert time.monotonic() - start < 60


@pytest.mark.multiprocess
def test_resume_with_other_settings_says_what_changed_or_refuses(reference, digits, tmp_path):
    shutil.copytree(reference / "out", tmp_path / "out")
    mapping = config(digits, tmp_path / "out", AUGMENTATION, checkpoint_every=5)
    mapping["optimizer"].update(name="sgd", weight_decay=2.0e-4)
    cfg = write_config(tmp_path / "cfg.yaml", mapping)
    proc = run_ranks(*CLI, "train", str(cfg), "--resume", "auto", np=2, timeout=180)
    assert proc.returncode == 0, proc.stdout
    warnings = [line.split("hvd-largebatch train: warning: ", 1)[1]
                for line in proc.stdout.splitlines() if "hvd-largebatch train: warning: " in line]
    assert warnings == [  # once (rank 0), one line per key; output.dir moved: not a change
        "resuming with optimizer.name = 'sgd' (the checkpoint was written with 'lars')",
        "resuming with optimizer.weight_decay = 0.0002 (the checkpoint was written with 0.0001)"]
    # the momentum buffers of the other form would be wrong by a factor lr: refused
    proc = run_ranks(*CLI, "train", str(cfg), "--resume", "auto", "--set",
                     "optimizer.momentum_correction=false", np=2, timeout=180)
    assert proc.returncode != 0, proc.stdout
    assert proc.stdout.count("hvd-largebatch train: error: ConfigError: "
                             "optimizer.momentum_correction: ") == 1, proc.stdout
    assert "was written with True, this config has False" in proc.stdout


@pytest.mark.multiprocess
def test_rank_dependent_failure_reaches_every_rank():
    proc = run_ranks(MP / "agree_failure.py", "1", np=2, timeout=60)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"RANK {rank} SetupError: rank 1 of 2: DataError: /scratch/node1/ckpt.pt: "
                "checkpoint not found") in proc.stdout, proc.stdout


def test_synthetic_rehearsal_of_a_paper_schedule(tmp_path):
    # a GPU job config for data that is not on this machine, rehearsed on one CPU process
    mapping = {
        "model": {"name": "small_resnet", "options": {"width": 4}},
        "data": {"source": "folder", "path": str(tmp_path / "imagenet"), "image_size": 8},
        "schedule": {"preset": "smith_30min"},
        "optimizer": {"name": "lars"},
        "train": {"max_per_rank_batch": 128, "precision": "bf16", "device": "cuda"},
        "output": {"dir": str(tmp_path / "r50"), "progress": False, "tensorboard": False},
    }
    cfg = write_config(tmp_path / "cfg.yaml", mapping)
    proc = subprocess.run([sys.executable, *CLI, "train", str(cfg), "--synthetic"],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "r50-synthetic"
    rows = train_rows(out)
    # by hand, world size 1: s = min(2 / 8192, 64 / 16384): batches 8192 -> 2, 16384 -> 4;
    # 90 epochs -> 3, so the warmup ends at 5/30 and the steps at 30, 60, 80 move to 1, 2, 8/3;
    # N = 3 * 2 / (1/6) = 36 samples (the warmup spans 3 batches). Per epoch: 3 warmup
    # iterations (lr 0.1 + 3.1 x / (1/6) at x = 0, 2/36, 4/36) and 15 at lr 3.2; 9 at batch 4,
    # lr 3.2 x 2 / 10 = 0.64; then 6 at 0.064 and 3 at 0.0064.
    expected = ([(2, 0.1), (2, 0.1 + 3.1 / 3), (2, 0.1 + 2 * 3.1 / 3)] + [(2, 3.2)] * 15
                + [(4, 0.64)] * 9 + [(4, 0.064)] * 6 + [(4, 0.0064)] * 3)
    assert [r["global_batch"] for r in rows] == [b for b, _ in expected]
    assert [r["lr"] for r in rows] == pytest.approx([lr for _, lr in expected])
    assert all(r["momentum"] == 0.9 for r in rows)
    assert all(0 < r["trust_ratio_min"] <= r["trust_ratio_mean"] <= r["trust_ratio_max"] for r in rows)
    assert (out / "curves.png").exists() and (out / "schedule.png").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["device"] == "auto"
    assert not (tmp_path / "r50").exists()  # the job's own output folder is left alone


# -- units ------------------------------------------------------------------------------------

def test_rehearsal_keeps_the_shape_of_goyal():
    full = preset("goyal_1h")
    small = rehearsal_schedule(full, world_size=2)
    assert [p.global_batch for p in small.phases] == [4] * 5  # 2 per rank
    assert small.epochs == 3
    assert [p.end_epoch for p in small.phases] == pytest.approx([5 / 30, 1, 2, 80 / 30, 3])
    assert [(p.lr_start, p.lr_end, p.shape) for p in small.phases] == \
        [(p.lr_start, p.lr_end, p.shape) for p in full.phases]
    # the 1/6-epoch warmup spans 3 batches of 4: N = 3 * 4 * 6 = 72, 18 iterations per epoch
    assert small.dataset_size == 72
    assert small.nesterov and small.phase_updates == (3, 15, 18, 12, 6)


def test_rehearsal_of_an_adaptive_batch():
    full = from_config({"preset": "goyal_1h",
                        "batch_increase": {"mode": "adaptive", "max_batch": 32768}})
    small = rehearsal_schedule(full, world_size=2)
    # batches 8192 -> 4, so the cap 32768 -> 16; the start (the 5-epoch warmup's end) is
    # stretched to 5/30; 14,040 updates -> 54, so the interval 100 -> 1: decisions every update
    assert (small.adaptive.max_batch, small.adaptive.interval) == (16, 1)
    assert small.adaptive.start_epoch == pytest.approx(5 / 30)
    assert small.adaptive.factor == 2 and small.total_updates == 54


def test_micro_batch_plan():
    schedule = schedule_for_test()
    assert micro_batch_plan(schedule, 2, 16) == (1, 2, 3)
    assert micro_batch_plan(schedule, 1, 16) == (2, 4, 6)
    assert micro_batch_plan(schedule, 4, 16) == (1, 1, 2)  # 96 / 4 = 24 -> 2 x 12
    with pytest.raises(ConfigError, match=r"^schedule\.phases\[0\]\.global_batch: global batch 32 .*world size 3"):
        micro_batch_plan(schedule, 3, 16)
    # ghost BN: micro-batches are whole groups. Groups of 8, cap 12: 16 / 32 / 48 per rank ->
    # micro-batches of 8 (2, 4, 6 of them), where without groups 16 -> 2 x 8, 32 -> 3 x 10.67 is
    # not possible so 4 x 8, 48 -> 4 x 12
    assert micro_batch_plan(schedule, 2, 16, bn_group=4) == (1, 2, 3)
    assert micro_batch_plan(schedule, 2, 12, bn_group=8) == (2, 4, 6)
    assert micro_batch_plan(schedule, 2, 12) == (2, 4, 4)
    with pytest.raises(ConfigError, match=r"^train\.bn_group: phase 0: the per-rank batch of 16 .*"
                                          r"not a multiple of 6"):
        micro_batch_plan(schedule, 2, 16, bn_group=6)
    keep_all = from_config({"dataset_size": 64, "drop_last": False, "epochs": 1, "batch": 32, "lr": 0.1})
    with pytest.raises(ConfigError, match=r"^train\.bn_group: needs schedule\.drop_last: true"):
        micro_batch_plan(keep_all, 2, 16, bn_group=4)


def test_checkpoint_survives_a_failing_write(tmp_path, monkeypatch):
    path = str(tmp_path / CHECKPOINT_NAME)
    save_checkpoint({"value": torch.arange(4)}, path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 partial")  # the start of a zip archive, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"value": torch.arange(8)}, path)
    assert torch.equal(load_checkpoint(path)["value"], torch.arange(4))
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]  # no temporary file left behind


WRITER = """
import io, os, signal, sys, torch
from hvd_largebatch.training import checkpoint

def die_half_way(obj, f):  # the process is killed after half of the file reached the disk
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

def die_before_rename(src, dst):  # killed with the new file complete but not yet in place
    os.kill(os.getpid(), signal.SIGKILL)

real_save = torch.save
if sys.argv[2] == "half":
    torch.save = die_half_way
else:
    checkpoint.os.replace = die_before_rename
checkpoint.save_checkpoint({"version_of_run": 2, "big": torch.ones(1_000_000)}, sys.argv[1])
"""


@pytest.mark.parametrize("moment", ["half", "before_rename"])
def test_checkpoint_survives_sigkill_during_a_write(tmp_path, moment):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"version_of_run": 1, "big": torch.zeros(1_000_000)}, str(path))
    proc = subprocess.run([sys.executable, "-c", WRITER, str(path), moment],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    debris = [name for name in os.listdir(tmp_path) if name != CHECKPOINT_NAME]
    assert len(debris) == 1 and debris[0].endswith(".tmp")  # the interrupted write
    state = load_checkpoint(str(path))  # the previous checkpoint, whole
    assert state["version_of_run"] == 1 and torch.equal(state["big"], torch.zeros(1_000_000))
    save_checkpoint({"version_of_run": 3}, str(path))  # the next save clears the debris
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]
    assert load_checkpoint(str(path))["version_of_run"] == 3


def test_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"bad\.pt: not a readable checkpoint"):
        load_checkpoint(str(bad))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"other\.pt: not an hvd-largebatch checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    state = {"model_name": "resnet50", "model_options": {"variant": "goyal"}, "num_classes": 1000}
    check_model_matches(state, "c.pt", "resnet50", {"variant": "goyal"}, 1000)
    with pytest.raises(ConfigError, match=r"^model\.name: c\.pt holds a resnet50 model"):
        check_model_matches(state, "c.pt", "wrn_16_4", {}, 1000)
    with pytest.raises(ConfigError, match=r"^model\.options: "):
        check_model_matches(state, "c.pt", "resnet50", {}, 1000)
    with pytest.raises(ConfigError, match=r"^model\.num_classes: "):
        check_model_matches(state, "c.pt", "resnet50", {"variant": "goyal"}, 10)
    assert resolve_resume("auto", str(tmp_path)) is None
    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(DataError, match="--resume checkpoint not found"):
        resolve_resume(str(tmp_path / "nope.pt"), str(tmp_path))


def test_metrics_resume_drops_rows_after_the_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for u in range(1, 6):
        log.log({"kind": "train", "epoch": 0, "step": u - 1, "updates": u, "lr": 0.1 * u, "loss": 1.0 / u})
    log.log({"kind": "eval", "epoch": 0, "updates": 5, "top1": 50.0})
    log.close()
    log = MetricsLogger(str(tmp_path), tensorboard=False, resume_updates=3)
    log.log({"kind": "train", "epoch": 0, "step": 3, "updates": 4, "lr": 0.7})
    log.close()
    rows = read_metrics(str(tmp_path / "metrics.csv"))
    assert [(r["kind"], r["updates"], r["lr"]) for r in rows] == [
        ("train", 1, 0.1), ("train", 2, 0.2), ("train", 3, 0.30000000000000004), ("train", 4, 0.7)]
    assert rows[0]["top1"] is None and rows[1]["loss"] == 0.5
    with pytest.raises(KeyError):
        MetricsLogger(str(tmp_path), tensorboard=False).log({"kind": "train", "updates": 1, "acc": 1})


def test_train_cli_help_lists_options(capsys):
    from hvd_largebatch.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--set", "--resume", "--overwrite", "--synthetic"):
        assert option in text


def test_demo_table_and_claim_line():
    from hvd_largebatch.training.demo import compare, format_table

    def run(updates, top1, wall):
        return {"updates": updates, "val_top1": top1, "wall_time": wall, "job_time": wall + 10}

    results = {"decaying lr": [run(1780, 99.0, 60.0), run(1780, 98.0, 50.0)],
               "increasing batch": [run(780, 98.5, 20.0), run(780, 98.5, 30.0)]}
    table = format_table(results).splitlines()
    # mean +- sample standard deviation: 98.5 +- 0.71 (|99 - 98| / sqrt(2))
    assert table[2] == "| decaying lr | 98.50 ± 0.71 | 1780 | 55.0 | 65.0 | 2 |"
    assert table[3] == "| increasing batch | 98.50 ± 0.00 | 780 | 25.0 | 35.0 | 2 |"
    assert compare(results, 400) == ("increasing batch vs decaying lr: 2.28x fewer parameter "
                                     "updates, validation top-1 +0.00 points (one validation "
                                     "image is 0.25 points)")
    # the adaptive goal: mean top-1 >= 98.5 - 0.71 = 97.79, and fewer updates than 780
    results["adaptive batch"] = [run(500, 97.9, 20.0), run(700, 97.8, 20.0)]
    lines = compare(results, 400).splitlines()
    assert lines[1].startswith("adaptive batch vs decaying lr: 2.97x fewer parameter updates, "
                               "validation top-1 -0.65 points")
    assert lines[2] == ("adaptive batch goal (decaying lr's seed spread, fewer updates than "
                        "increasing batch): top-1 97.85 vs >= 97.79 (met); updates 600 vs 780 "
                        "(met)")
    results["adaptive batch"] = [run(800, 97.0, 20.0), run(800, 97.2, 20.0)]
    assert compare(results, 400).splitlines()[2].endswith(
        "top-1 97.10 vs >= 97.79 (NOT met); updates 800 vs 780 (NOT met)")



def test_demo_schedules_by_hand():
    from hvd_largebatch.training.config import build_schedule, load_config
    from hvd_largebatch.training.demo import CONFIG, SCHEDULES

    # lr 0.05 / 3 at epochs 6, 12, 16 of 20 at batch 16; N = 1438: 89 iterations per epoch at
    # 16, 29 at 48, 9 at 144 (drop_last). Each lr drop of 3 becomes a batch x3 up to the cap.
    lr = 0.05
    expected = {
        "decaying lr": ([16] * 4, [lr, lr / 3, lr / 9, lr / 27], 20 * 89),
        "hybrid": ([16, 48, 48, 48], [lr, lr, lr / 3, lr / 9], 6 * 89 + 6 * 29 + 8 * 29),
        "increasing batch": ([16, 48, 144, 144], [lr, lr, lr, lr / 3], 6 * 89 + 6 * 29 + 8 * 9),
        "constant lr (control)": ([16], [lr], 20 * 89),
        # decided at run time: starts at 16, lr / 3 at epoch 16 as in the increasing batch
        "adaptive batch": ([16, 16], [lr, lr / 3], 20 * 89),
    }
    for label, (_, overrides) in SCHEDULES.items():
        schedule = build_schedule(load_config(CONFIG, overrides), N_TRAIN)
        batches, lrs, updates = expected[label]
        assert [p.global_batch for p in schedule.phases] == batches, label
        assert [p.lr_start for p in schedule.phases] == pytest.approx(lrs), label
        assert schedule.total_updates == updates, label
        assert (schedule.adaptive is not None) == (label == "adaptive batch"), label
    rule = build_schedule(load_config(CONFIG, SCHEDULES["adaptive batch"][1]), N_TRAIN).adaptive
    assert (rule.max_batch, rule.factor, rule.interval) == (144, 2, 50)
    assert (1780, 940, 780) == tuple(expected[k][2] for k in ("decaying lr", "hybrid", "increasing batch"))
