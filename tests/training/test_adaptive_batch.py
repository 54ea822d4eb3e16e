"""The adaptive batch on real ranks (``schedule.batch_increase.mode: adaptive``): every decision
against the rule computed by hand from the logged B_simple, the batch and micro-batches of every
update against the decisions, kill-and-resume bit for bit with the same decisions (mpirun, LARS,
sharded), resume on 4 ranks replaying them, SGD replicated under Gloo, and the one-rank refusal."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from hvd_largebatch.training.metrics import read_metrics
from launch import CLI, MP, run_command, run_ranks
from test_train import AUGMENTATION, assert_bit_identical, config, final_state, write_config

pytestmark = pytest.mark.multiprocess
FIRST, CAP, INTERVAL, MARGIN = 16, 64, 5, 5.0
#: 1.5 epochs of digits at batch 16, growing x2 up to 64 (per rank 8, 16, 32: 1, 1, 2
#: micro-batches of at most 16); a decision every 10 updates while below the cap
SCHEDULE = {"name": "adaptive", "dataset_size": 1438, "epochs": 1.5, "batch": FIRST, "lr": 0.05,
            "momentum": 0.9,
            "batch_increase": {"mode": "adaptive", "max_batch": CAP, "interval": INTERVAL,
                               "margin": MARGIN, "smoothing": 0.8}}
CRASH_AFTER = 27  # after the first growth; the last checkpoint before it is update 25


def adaptive_config(digits: Path, out: Path, **overrides) -> dict:
    mapping = config(digits, out, AUGMENTATION, checkpoint_every=5)
    mapping["schedule"] = SCHEDULE
    for section, values in overrides.items():
        mapping[section] = {**mapping[section], **values}
    return mapping


def decisions(out: Path) -> list[dict]:
    return json.loads((out / "batch_decisions.json").read_text())


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(str(out / "metrics.csv")) if r["kind"] == "train"]


def check_run_follows_the_rule(out: Path, world: int) -> None:
    """Every decision of the run in ``out`` against the rule by hand, and every update's batch
    (and micro-batch count on ``world`` ranks) against the decisions."""
    made, rows = decisions(out), train_rows(out)
    by_update = {r["updates"]: r for r in rows}
    batch = FIRST
    expected_updates = []
    for u in range(INTERVAL, max(by_update) + 1, INTERVAL):
        if batch >= CAP or u == max(by_update):
            break
        expected_updates.append(u)
        d = made[len(expected_updates) - 1]
        assert d["updates"] == u and d["batch"] == batch, d
        measured = d["noise_scale"]
        # the decision's B_simple is the estimate logged after that update (rank 0's)
        logged = by_update[u].get("grad_noise_scale")
        if measured is None:  # the |G|^2 average is not positive yet: not resolved
            assert logged is None
        else:
            assert logged == pytest.approx(measured, rel=1e-9)
        grows = measured is not None and measured >= MARGIN * batch
        assert d["new_batch"] == (min(2 * batch, CAP) if grows else batch), d
        batch = d["new_batch"]
    assert [d["updates"] for d in made] == expected_updates
    # the batch (and micro-batches) of every update: the last growth before it
    grown = [(d["updates"], d["new_batch"]) for d in made if d["new_batch"] != d["batch"]]
    for r in rows:
        expected = max([b for u, b in grown if u < r["updates"]], default=FIRST)
        assert r["global_batch"] == expected, r
        assert r["micro_batches"] == (2 if expected // world > 16 else 1), r


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    """An uninterrupted adaptive run: LARS with sharded state on 2 ranks under mpirun."""
    work = tmp_path_factory.mktemp("adaptive")
    cfg = write_config(work / "cfg.yaml", adaptive_config(digits, work / "out"))
    proc = run_ranks(*CLI, "train", str(cfg), np=2, launcher="mpirun", timeout=240)
    assert proc.returncode == 0, proc.stdout
    return work, proc.stdout


def test_the_batch_grows_exactly_when_the_rule_says(reference):
    work, stdout = reference
    out = work / "out"
    check_run_follows_the_rule(out, world=2)
    made = decisions(out)
    grew = [d for d in made if d["new_batch"] != d["batch"]]
    kept = [d for d in made if d["new_batch"] == d["batch"] and d["noise_scale"] is not None]
    assert grew and kept  # the run shows both sides of the rule
    assert f"global batch 16 -> 32 from epoch 0, iteration {grew[0]['updates']}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch_decisions"] == grew
    assert summary["final_global_batch"] == train_rows(out)[-1]["global_batch"]
    # the realized schedule is what the sampler read: every update's batch adds up
    rows = train_rows(out)
    assert summary["samples"] == sum(r["global_batch"] for r in rows)
    # schedule.yaml is the schedule as decided: the first batch, then every growth
    written = yaml.safe_load((out / "schedule.yaml").read_text())
    assert written["batch_increase"]["mode"] == "adaptive"
    assert [p["global_batch"] for p in written["phases"]] == [16] + [d["new_batch"] for d in grew]
    # the demo's plot of batch and B_simple against updates reads these metrics
    from hvd_largebatch.training.plots import plot_adaptive

    png = plot_adaptive({"seed 0": str(out / "metrics.csv")}, str(work / "adaptive.png"), MARGIN)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_and_resume_reproduces_the_decisions_bit_for_bit(reference, digits, tmp_path):
    work, _ = reference
    cfg = write_config(tmp_path / "cfg.yaml", adaptive_config(digits, tmp_path / "out"))
    crashed = run_ranks(MP / "train_crash.py", str(CRASH_AFTER), str(cfg), np=2,
                        launcher="mpirun", timeout=240)
    assert f"killed after update {CRASH_AFTER}" in crashed.stdout, crashed.stdout
    at_crash = final_state(tmp_path / "out")
    assert at_crash["updates"] == 25
    assert [d["updates"] for d in at_crash["batch_decisions"]] == [5, 10, 15, 20, 25]
    assert at_crash["noise_scale"]["steps"] == 25  # the estimator's averages travel too
    shutil.copytree(tmp_path / "out", tmp_path / "crashed")
    # a resumed run starts its decisions file from the checkpoint's (not the killed run's
    # later ones): killed again right after its first update, the file holds updates <= 25
    (tmp_path / "out" / "batch_decisions.json").write_text(json.dumps(
        decisions(tmp_path / "out") + [{**at_crash["batch_decisions"][-1], "updates": 30}]))
    again = run_ranks(MP / "train_crash.py", "26", str(cfg), "--resume", "auto", np=2,
                      launcher="mpirun", timeout=240)
    assert "killed after update 26" in again.stdout, again.stdout
    assert decisions(tmp_path / "out") == at_crash["batch_decisions"]
    resumed = run_ranks(*CLI, "train", str(cfg), "--resume", "auto", np=2, launcher="mpirun",
                        timeout=240)
    assert resumed.returncode == 0, resumed.stdout
    assert decisions(tmp_path / "out") == decisions(work / "out")
    assert_bit_identical(final_state(tmp_path / "out"), final_state(work / "out"))
    assert [(r["global_batch"], r["loss"]) for r in train_rows(tmp_path / "out")] == \
        [(r["global_batch"], r["loss"]) for r in train_rows(work / "out")]

    # the same checkpoint on 4 ranks: the decisions so far are replayed, later ones follow
    # the rule on the new world size
    four = tmp_path / "four"
    shutil.copytree(tmp_path / "crashed", four)
    cfg4 = write_config(tmp_path / "cfg4.yaml", adaptive_config(digits, four))
    resumed4 = run_ranks(*CLI, "train", str(cfg4), "--resume", "auto", np=4, launcher="mpirun",
                         timeout=300)
    assert resumed4.returncode == 0, resumed4.stdout
    assert decisions(four)[:5] == decisions(work / "out")[:5]
    check_run_follows_the_rule(four, world=4)
    rows = train_rows(four)
    assert [r["global_batch"] for r in rows if r["updates"] <= 25] == \
        [r["global_batch"] for r in train_rows(work / "out") if r["updates"] <= 25]


def test_sgd_with_replicated_state_under_gloo(digits, tmp_path):
    mapping = adaptive_config(digits, tmp_path / "out",
                              optimizer={"name": "sgd", "shard_optimizer_state": False})
    cfg = write_config(tmp_path / "cfg.yaml", mapping)
    proc = run_ranks(*CLI, "train", str(cfg), np=2, launcher="gloo", timeout=240)
    assert proc.returncode == 0, proc.stdout
    check_run_follows_the_rule(tmp_path / "out", world=2)
    assert any(d["new_batch"] != d["batch"] for d in decisions(tmp_path / "out"))


def test_one_rank_is_refused_before_training(digits, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", adaptive_config(digits, tmp_path / "out"))
    proc = run_command([sys.executable, *CLI, "train", str(cfg)], timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stdout.splitlines() if "schedule.batch_increase.mode" in line]
    assert len(lines) == 1 and "2 or more ranks" in lines[0], proc.stdout
    assert not (tmp_path / "out" / "metrics.csv").exists()
