"""``hvd-largebatch plan --gpu-throughput ...``: the predicted time to train beside two
published systems (one set of stated, cited inputs each, never fitted to the result; each
within 25 %), the table and JSON it prints, and its option errors.

Run with ``-s`` to see the comparison printed; a failing or xfailing check prints it too.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from hvd_largebatch.cli.main import main

REPO = Path(__file__).resolve().parents[2]
GOYAL = str(REPO / "jobs/configs/goyal_1h_resnet50.yaml")
IMAGENET = 1_281_167
TOLERANCE = 0.25

# -- Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour" ----------
# System (the paper's hardware section; /work/shared/reference/papers.md): 32 Big Basin servers
# x 8 P100 GPUs joined by NVLink, one 50 Gbit/s Ethernet link per server, Caffe2 + Gloo, fp32.
# Published: 90 epochs of ResNet-50 at kn = 8,192 in about one hour, i.e. about
# 3,600 s / 14,075 updates = 0.256 s per iteration.
# Per-GPU throughput: the paper publishes no single-GPU figure for its Caffe2 build; its
# single-server baseline (kn = 256 on the 8 GPUs of one server) takes about 29 hours for the
# same 90 epochs (papers.md; NVIDIA's news item "Facebook trains ImageNet in 1 hour": "from 29
# hours to one"): 90 x 1,281,167 / (29 x 3,600 s) / 8 = 138.1 img/s per GPU. That figure
# includes the server's own NVLink exchange, so the intra-node term below is counted twice
# (about 2 ms of 256).
# NVLink within a server: P100 SXM2 datasheet, 4 links, 160 GB/s bidirectional = 80 GB/s
# = 640 Gbit/s per direction. GPU memory: P100 SXM2 datasheet, 732 GB/s. Latencies: the CLI's
# defaults (10 us per network ring step, 3.4 us per NVLink step; the paper gives none; the
# latency term is 62 x 10 us = 0.6 ms here). Overlap: the paper aggregates gradients while
# backprop runs (its section on communication) but gives no fraction: 0, the upper bound.
GOYAL_THROUGHPUT = 90 * IMAGENET / (29 * 3600) / 8
GOYAL_ARGS = [GOYAL, "--gpu-throughput", f"{GOYAL_THROUGHPUT:.1f}", "--network", "50",
              "--gpus-per-node", "8", "--intra-node", "640", "--memory-bandwidth", "732"]
GOYAL_PUBLISHED = {"s/iter": 3600 / (90 * IMAGENET / 8192), "time to train (s)": 3600.0}

# -- NVIDIA + CoreWeave, MLPerf Training v3.0 ResNet-50 (ID 3.0-2002), 3,584 H100 -------------
# github.com/mlcommons/training_results_v3.0, NVIDIA_CoreWeave/:
# - benchmarks/resnet/implementations/mxnet/config_DGXH100_multi_448x8x16.sh: 448 nodes x 8
#   GPUs x 16 images = 57,344; LARS, lr 23, 32 warmup epochs, poly power 2, momentum 0.95;
#   "Targeting epoch 77"; "Default is no NCCL and BWD overlap" (overlap 0); NCCL_ALGO=COLLNETCHAIN
#   over SHARP (in-network reduction).
# - systems/coreweave_hgxh100_n448_ngc23.04_mxnet.json: H100-SXM5-80GB, "NVLINK Gen4 900 GB/s"
#   (bidirectional: 450 GB/s = 3,600 Gbit/s per direction), "8x ConnectX-7 InfiniBand NDR
#   400Gb/Sec" per node (3,200 Gbit/s per node).
# - results/coreweave_hgxh100_n448_ngc23.04_mxnet/resnet/result_0.txt: run_start -> run_stop
#   10.961 s (NVIDIA's performance page: 0.183 min), 77 epochs; median tracked throughput
#   10.1 M img/s, i.e. 57,344 / 10.1 M = 5.68 ms per step (results 0-4: 5.67-5.70 ms).
# Per-GPU throughput: MLPerf v3.0 NVIDIA/results/dgxh100_ngc23.04_mxnet/resnet/result_0.txt,
# one DGX H100 (8 GPUs, 400 images each): median tracked throughput 56,056 img/s = 7,007 img/s
# per GPU (its 35 epochs in 816 s agree: 55,000 img/s). Mixed precision: fp16 gradients.
# H100 SXM5 datasheet: 3,350 GB/s of HBM3. Latencies: the CLI's defaults.
MLPERF_CONFIG = """
    model: {name: resnet50}
    optimizer: {name: lars}
    schedule:
      dataset_size: 1281167
      epochs: 77
      batch: 57344
      lr: 23.0
      momentum: 0.95
      warmup: {epochs: 32, mode: gradual, start_lr: 0.0}
      decay: {type: poly, power: 2.0, end_lr: 0.0}
"""
MLPERF_ARGS = ["--world-size", "3584", "--gpu-throughput", "7007", "--network", "3200",
               "--gpus-per-node", "8", "--intra-node", "3600", "--memory-bandwidth", "3350",
               "--gradient-dtype", "fp16"]
MLPERF_PUBLISHED = {"s/iter": 0.00568, "time to train (s)": 10.961}
MLPERF_MISSING = (
    "two terms the model lacks: (1) in-network reduction: the system reduces over SHARP "
    "(NCCL_ALGO=COLLNETCHAIN), while the ring's latency term 2 (N - 1) x 10 us over N = 448 "
    "nodes alone is 8.9 ms, more than the whole published step; (2) the throughput at 16 "
    "images per GPU: no figure is published, and the one-node figure at 400 per GPU gives a "
    "2.3 ms compute where the published step is 5.7 ms (fixed per-iteration costs, group BN "
    "over 2 GPUs); without the latency term the prediction would be 3.0 ms, about half the "
    "published step")


def plan_json(capsys, *argv):
    code = main(["plan", *argv, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def compare(system: str, result: dict, published: dict) -> tuple[str, bool]:
    """The prediction beside the published figures as printed lines, and whether every
    figure is within the tolerance."""
    (phase, *_) = result["prediction"]["phases"]
    predicted = {"s/iter": phase["iteration_s"],
                 "time to train (s)": result["prediction"]["total_seconds"]}
    lines = [f"{system}:"]
    ok = True
    for key, value in published.items():
        ratio = predicted[key] / value
        ok &= abs(ratio - 1) <= TOLERANCE
        lines.append(f"  {key:<18} predicted {predicted[key]:10.4g}  published {value:10.4g}  "
                     f"ratio {ratio:5.2f}")
    return "\n".join(lines), ok


def test_goyal_1_hour_on_256_p100(capsys):
    result = plan_json(capsys, *GOYAL_ARGS)
    phases = result["prediction"]["phases"]
    assert len({p["iteration_s"] for p in phases}) == 1  # 32 per GPU in every phase
    text, ok = compare("Goyal et al. 2017, 256 P100, 50 Gbit/s Ethernet, batch 8,192, 90 epochs",
                       result, GOYAL_PUBLISHED)
    print(text)
    assert ok, text


@pytest.mark.xfail(strict=True, reason="MLPerf v3.0 ResNet-50 on 3,584 H100: " + MLPERF_MISSING)
def test_mlperf_v3_resnet50_on_3584_h100(tmp_path, capsys):
    config = tmp_path / "mlperf.yaml"
    config.write_text(textwrap.dedent(MLPERF_CONFIG))
    result = plan_json(capsys, str(config), *MLPERF_ARGS)
    assert result["prediction"]["phases"][0]["compute_s"] == pytest.approx(16 / 7007)
    text, ok = compare("NVIDIA+CoreWeave MLPerf v3.0, 448 x 8 H100, batch 57,344, 77 epochs",
                       result, MLPERF_PUBLISHED)
    print(f"{text}\n  not within {TOLERANCE:.0%}: {MLPERF_MISSING}")
    assert ok, text


# -- the command ------------------------------------------------------------------------------

def plan(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_shows_the_parts_per_phase_and_the_total(capsys):
    code, out, err = plan(capsys, *GOYAL_ARGS)
    assert code == 0, err
    assert "25,557,032 parameters x 4 bytes = 102.2 MB" in out  # ResNet-50 on the meta device
    assert "hierarchical, 32 nodes x 8 GPUs" in out and "sgd, 20 bytes per parameter" in out
    rows = [line.split() for line in out.split("predicted time to train (")[1].splitlines()
            if line[:1].isdigit()]
    assert len(rows) == 5 and {(row[1], row[2], row[8]) for row in rows} == {("32", "(1x)", "gpu")}
    assert "predicted time to train: 62." in out


def test_preset_needs_the_parameter_count_and_one_rank_needs_no_network(capsys):
    code, _, err = plan(capsys, "goyal_1h", "--world-size", "1", "--gpu-throughput", "100")
    assert code == 2 and "error: --parameters: goyal_1h names no model" in err
    result = plan_json(capsys, "goyal_1h", "--world-size", "1", "--gpu-throughput", "100",
                       "--parameters", "1000")
    phase = result["prediction"]["phases"][0]
    assert phase["exchange_s"] == 0 and phase["compute_s"] == pytest.approx(8192 / 100)
    assert result["prediction"]["total_seconds"] == pytest.approx(
        sum(p["updates"] * p["iteration_s"] for p in result["prediction"]["phases"]))


def test_sharded_lars_config_is_predicted_without_overlap(tmp_path, capsys):
    config = tmp_path / "sharded.yaml"
    config.write_text(textwrap.dedent(MLPERF_CONFIG).replace(
        "{name: lars}", "{name: lars, shard_optimizer_state: true}"))
    result = plan_json(capsys, str(config), "--world-size", "64", "--gpu-throughput", "1000",
                       "--network", "100", "--overlap", "1")
    phase = result["prediction"]["phases"][0]
    assert result["prediction"]["inputs"]["sharded"] is True
    assert phase["exposed_exchange_s"] == phase["exchange_s"] > 0


def test_input_pipeline_bound_is_reported(capsys):
    result = plan_json(capsys, *GOYAL_ARGS, "--input-throughput", "100")
    assert {p["bound"] for p in result["prediction"]["phases"]} == {"input"}
    assert result["prediction"]["phases"][0]["iteration_s"] == pytest.approx(32 / 100)


@pytest.mark.parametrize("argv,message", [
    (["--gpu-throughput", "100"], "--network: needed for 256 ranks"),
    (["--network", "50"], "--gpu-throughput: --network is an input"),
    (["--gpu-throughput", "0", "--network", "50"], "--gpu-throughput: must be > 0"),
    (["--gpu-throughput", "100", "--network", "fast"], "--network: expected GBIT_S[,LATENCY_US]"),
    (["--gpu-throughput", "100", "--network", "50,-1"], "--network: expected GBIT_S"),
    (["--gpu-throughput", "100", "--network", "50", "--overlap", "1.5"], "--overlap: must be"),
    (["--gpu-throughput", "100", "--network", "50", "--intra-node", "640"],
     "--gpus-per-node: --intra-node needs GPUs per node"),
    (["--gpu-throughput", "100", "--network", "50", "--intra-node", "640",
      "--gpus-per-node", "3"], "--gpus-per-node: --intra-node needs GPUs per node"),
    (["--gpu-throughput", "100", "--network", "50", "--gpus-per-node", "8"],
     "--gpus-per-node: means the hierarchical exchange"),
])
def test_bad_options_name_the_option(capsys, argv, message):
    code, out, err = plan(capsys, GOYAL, *argv)
    assert code == 2 and out == ""
    assert err.startswith("hvd-largebatch plan: error: ") and message in err
