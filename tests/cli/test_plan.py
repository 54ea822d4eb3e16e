"""``hvd-largebatch plan``: per-phase table / JSON, update totals against the papers and hand
computation, world-size and accumulation checks, YAML configs and their errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hvd_largebatch.cli.main import main

IMAGENET = 1_281_167
CIFAR = 50_000


def plan(capsys, *argv):
    """Run ``hvd-largebatch plan`` in-process: (exit code, stdout, stderr)."""
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, *argv):
    code, out, err = plan(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


# (batches, epochs per phase, papers.md derived updates)
WRN = {
    "smith_wrn_original": ([128] * 4, 78_125),
    "smith_wrn_increasing_batch": ([128, 640, 3200, 5120], 29_141),
    "smith_wrn_increased_lr": ([640, 3200, 5120, 5120], 6_406),
    "smith_wrn_increased_momentum": ([3200, 5120, 5120, 5120], 2_305),
}


@pytest.mark.parametrize("name", sorted(WRN))
def test_smith_wrn_update_totals(capsys, name):
    batches, derived = WRN[name]
    epochs = [60, 60, 40, 40]
    result = plan_json(capsys, name)
    assert result["total_updates"] == sum(e * (CIFAR // b) for e, b in zip(epochs, batches))
    assert round(result["nominal_updates"]) == derived
    assert result["world_size"] == 8  # the recipe's workers
    assert [p["global_batch"] for p in result["phases"]] == batches
    assert [p["per_rank_batch"] for p in result["phases"]] == [b // 8 for b in batches]
    assert [p["updates"] for p in result["phases"]] == [e * (CIFAR // b)
                                                        for e, b in zip(epochs, batches)]
    assert [(p["start_epoch"], p["end_epoch"]) for p in result["phases"]] == [
        (0, 60), (60, 120), (120, 160), (160, 200)]


def test_goyal_json_fields(capsys):
    result = plan_json(capsys, "goyal_1h")
    assert result["total_updates"] == 90 * 156 and round(result["nominal_updates"]) == 14_075
    warmup, *rest = result["phases"]
    assert warmup["lr_start"] == pytest.approx(0.1) and warmup["lr_end"] == pytest.approx(3.2)
    assert warmup["per_rank_batch"] == 32 and warmup["micro_batches"] == 1
    for phase in result["phases"]:
        assert phase["momentum"] == 0.9
        # g = lr / (1 - m) * (N / B - 1)
        assert phase["noise_scale"] == pytest.approx(
            phase["lr_start"] / 0.1 * (IMAGENET / 8192 - 1), rel=1e-12)
    assert [p["updates"] for p in result["phases"]] == [780, 3900, 4680, 3120, 1560]


def test_goyal_table_shows_both_counts(capsys):
    code, out, _ = plan(capsys, "goyal_1h")
    assert code == 0
    assert "14,075" in out and "14,040" in out  # papers' count and executed count
    assert "8,192" in out and "0.1 -> 3.2" in out
    assert len([line for line in out.splitlines() if line[:1].isdigit()]) == 5  # phase rows


def test_world_size_that_does_not_divide(capsys):
    code, out, err = plan(capsys, "goyal_1h", "--world-size", "3")
    assert code == 2 and out == ""
    assert "schedule.phases[0].global_batch" in err and "not divisible by world size 3" in err
    code, _, err = plan(capsys, "goyal_1h", "--micro-batches", "3")  # 32 per rank / 3
    assert code == 2 and "micro-batches 3" in err


def test_accumulation_for_max_per_rank_batch(capsys):
    result = plan_json(capsys, "smith_30min", "--world-size", "8", "--max-per-rank-batch", "256")
    # 8192 / 8 = 1024 per rank -> 4 x 256; 16384 / 8 = 2048 -> 8 x 256
    assert [(p["per_rank_batch"], p["micro_batches"], p["micro_batch"])
            for p in result["phases"]] == [(1024, 4, 256)] * 2 + [(2048, 8, 256)] * 3
    result = plan_json(capsys, "goyal_1h", "--world-size", "64", "--max-per-rank-batch", "100")
    assert (result["phases"][0]["micro_batches"], result["phases"][0]["micro_batch"]) == (2, 64)
    code, out, _ = plan(capsys, "smith_30min", "--world-size", "8", "--max-per-rank-batch", "256")
    assert "8 x 256" in out


def test_fixed_micro_batches(capsys):
    result = plan_json(capsys, "goyal_1h", "--micro-batches", "4")
    assert {(p["micro_batches"], p["micro_batch"]) for p in result["phases"]} == {(4, 8)}


def test_dataset_size_override(capsys):
    result = plan_json(capsys, "goyal_1h", "--dataset-size", "100000")
    assert result["dataset_size"] == 100_000
    assert result["total_updates"] == 90 * (100_000 // 8192)
    code, _, err = plan(capsys, "goyal_1h", "--dataset-size", "1000")
    assert code == 2 and "schedule.dataset_size" in err


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_config_ignores_other_sections(tmp_path, capsys):
    path = write(tmp_path, """
        model: {name: resnet50, zero_gamma: true}
        optimizer: {anything: goes}
        schedule:
          preset: goyal_1h
          batch: 4096
          workers: 128
    """)
    result = plan_json(capsys, path)
    assert result["phases"][0]["lr_end"] == pytest.approx(1.6)  # 0.1 x 4096 / 256
    assert result["world_size"] == 128 and result["phases"][0]["per_rank_batch"] == 32
    assert result["total_updates"] == 90 * (IMAGENET // 4096)


def test_yaml_explicit_schedule(tmp_path, capsys):
    path = write(tmp_path, """
        schedule:
          dataset_size: 50000
          epochs: 200
          batch: 128
          lr: 0.1
          decay: {type: step, milestones: [60, 120, 160], factor: 0.2}
          batch_increase: {max_batch: 5120}
    """)
    assert plan_json(capsys, path)["total_updates"] == 60 * 390 + 60 * 78 + 40 * 15 + 40 * 9


def adaptive_config(tmp_path, batch: int, train: str = "") -> str:
    """1,000 samples, 3 epochs from ``batch``, x2 up to 80 decided every 10 updates."""
    return write(tmp_path, f"""
        schedule:
          dataset_size: 1000
          epochs: 3
          batch: {batch}
          lr: 0.1
          batch_increase: {{mode: adaptive, max_batch: 80, interval: 10}}
        {train}
    """)


def test_adaptive_batch_bounds_by_hand(tmp_path, capsys):
    # N 1000, B 10, 3 epochs, a decision every 10 updates, x2 up to 80. Growing at every
    # decision: epoch 0 runs 10 x 10, 10 x 20, 10 x 40 (700 samples), then 3 x 80 (60
    # dropped); epochs 1-2 run 12 x 80 each: 57 updates. Never growing: 3 x 100.
    path = adaptive_config(tmp_path, batch=10, train="train: {max_per_rank_batch: 100}")
    a = plan_json(capsys, path)["adaptive"]
    assert (a["first_batch"], a["max_batch"], a["fewest_updates"], a["most_updates"]) == \
        (10, 80, 57, 300)
    assert [p["global_batch"] for p in a["fewest_phases"]] == [10, 20, 40, 80]
    code, out, _ = plan(capsys, path)
    assert code == 0
    assert "global batch: decided at run time" in out
    assert "first batch 10, cap 80; x2 when the measured B_simple >= 2 x the batch" in out
    assert "updates: between 57 (grows at every decision) and 300 (never grows)" in out
    # the predicted time for both ends at 12 img/s on 1 rank (one parameter: no optimizer
    # time): the never-growing run reads 3,000 samples (250 s), the fastest one 940 + 2 x 960
    code, out, _ = plan(capsys, path, "--gpu-throughput", "12", "--parameters", "1")
    assert code == 0
    assert "predicted time to train: 4.2 min (250 s;" in out
    assert "one that grows at every decision (57 updates) takes 4.0 min (238 s)" in out
    # on 3 ranks the cap rounds down to 78 (26 per rank): 10 does not split, so 12
    code, out, _ = plan(capsys, adaptive_config(tmp_path, batch=12), "--world-size", "3")
    assert "cap 80, 78 after rounding for 3 ranks" in out


@pytest.mark.parametrize("text, message", [
    ("schedule: {preset: goyal_1h, batchsize: 4}\n", "schedule.batchsize: unknown key"),
    ("schedule: {preset: goyal_1h, decay: {factor: 2}}\n", "schedule.decay.factor"),
    ("model: {name: resnet50}\n", "no `schedule:` section"),
    ("schedule: [1, 2\n", "not valid YAML"),
])
def test_bad_yaml(tmp_path, capsys, text, message):
    code, out, err = plan(capsys, write(tmp_path, text))
    assert code == 2 and out == "" and message in err


def test_neither_preset_nor_file(capsys):
    code, _, err = plan(capsys, "goyal_2h")
    assert code == 2 and "neither a preset" in err and "goyal_1h" in err


def test_command_line_entry_stays_light():
    # through the real command line; `plan` must not import torch
    code = ("import sys; from hvd_largebatch.cli.plan import add_arguments, run; import argparse;"
            "p = argparse.ArgumentParser(); add_arguments(p);"
            "rc = run(p.parse_args(['lars_32k', '--format', 'json']));"
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert light.returncode == 0, light.stderr
    assert json.loads(light.stdout)["total_updates"] == 100 * (IMAGENET // 32768)
    full = subprocess.run(
        [sys.executable, "-m", "hvd_largebatch.cli", "plan", "smith_wrn_original"],
        capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    assert "78,000" in full.stdout and "78,125" in full.stdout
