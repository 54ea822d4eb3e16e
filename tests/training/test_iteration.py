"""The training iteration at GPU speed, checked on the CPU: no host synchronization inside an
iteration, the schedule held on the device, fp16 with loss scaling, channels-last, torch.compile."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from hvd_largebatch.training.config import parse_config
from hvd_largebatch.training.setup import memory_format, setup_run
from launch import CLI, MP, run_ranks

pytest.importorskip("horovod.torch")


def config(out: Path, **train) -> dict:
    """Synthetic 16x16 images, a small ResNet, 2 phases (the batch and the momentum change
    mid-run, the lr every iteration), 12 iterations on 2 ranks."""
    return {
        "model": {"name": "small_resnet", "num_classes": 10, "options": {"width": 4}},
        "data": {"source": "synthetic", "image_size": 16, "num_samples": 256, "num_classes": 10,
                 "val_samples": 32},
        "schedule": {"dataset_size": 256, "phases": [
            {"end_epoch": 0.5, "global_batch": 16, "momentum": 0.9, "lr_start": 0.01,
             "lr_end": 0.1, "shape": "linear"},
            {"end_epoch": 1.0, "global_batch": 32, "momentum": 0.8, "lr_start": 0.1}]},
        "optimizer": {"name": "lars", "weight_decay": 1e-4, "trust_coefficient": 0.02},
        "train": {"max_per_rank_batch": 8, "log_every": 4, **train},
        "output": {"dir": str(out), "progress": False, "plots": False, "tensorboard": False},
    }


def write(tmp_path: Path, **train) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "out", **train)))
    return path


@pytest.mark.parametrize("launcher,extra", [
    ("gloo", []),
    ("mpirun", ["optimizer.shard_optimizer_state=true", "train.precision=fp16",
                "train.channels_last=true"]),
], ids=["replicated-fp32", "sharded-fp16-nhwc"])
def test_no_host_synchronization_inside_an_iteration(tmp_path, launcher, extra):
    proc = run_ranks(MP / "train_no_sync.py", write(tmp_path), *extra, np=2, launcher=launcher,
                     timeout=150)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("NO SYNC OK 12") == 2, proc.stdout  # 8 + 4 iterations


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("extra", [[], ["train.precision=fp16", "train.cuda_graph=optimizer"]],
                         ids=["bf16-eager", "fp16-graphed"])
def test_no_cuda_synchronization_inside_an_iteration(tmp_path, extra):
    """On a GPU (make check-gpu): the same count, with torch's sync debug mode raising."""
    extra = ["train.device=cuda", "train.precision=bf16", *extra]
    proc = run_ranks(MP / "train_no_sync.py", write(tmp_path), *extra, np=1, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "NO SYNC OK 12" in proc.stdout, proc.stdout


def test_fp16_run_keeps_its_loss_scale_in_the_checkpoint(tmp_path):
    proc = run_ranks(*CLI, "train", str(write(tmp_path, precision="fp16")), np=2, timeout=150)
    assert proc.returncode == 0, proc.stdout
    state = load_checkpoint(str(tmp_path / "out" / CHECKPOINT_NAME))
    scale = state["loss_scale"]
    # no overflow in 12 clean steps of a 2000-step growth interval: the initial 2^16, 12 counted
    assert scale["scale"].item() == 2.0 ** 16 and scale["growth_tracker"].item() == 12
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_compiled_model_trains_and_saves_plain_weights(tmp_path):
    proc = run_ranks(*CLI, "train", str(write(tmp_path, compile=True)), np=1, timeout=300)
    assert proc.returncode == 0, proc.stdout
    state = load_checkpoint(str(tmp_path / "out" / CHECKPOINT_NAME))
    assert not any(k.startswith("_orig_mod.") for k in state["model"])


@pytest.mark.parametrize("setting,device,expected", [
    (None, "cuda", torch.channels_last), (None, "cpu", torch.contiguous_format),
    (True, "cpu", torch.channels_last), (False, "cuda", torch.contiguous_format)])
def test_channels_last_default_follows_the_device(tmp_path, setting, device, expected):
    cfg = parse_config(config(tmp_path, channels_last=setting))
    assert memory_format(cfg, torch.device(device)) == expected


def test_channels_last_model_has_nhwc_weights(tmp_path):
    cfg = parse_config(config(tmp_path, channels_last=True, device="cpu"))
    run = setup_run(cfg, resume=None, synthetic=False, world_size=2, rank=0, local_rank=0)
    convs = [m.weight for m in run.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # (1x1 kernels are both)


def test_captured_optimizer_step_equals_the_normal_step(tmp_path):
    """train.cuda_graph's flow (exchange outside, the wrapped step captured and replayed on
    static gradients, schedule on the device) ends bitwise where the normal trainer does."""
    normal, captured = tmp_path / "normal", tmp_path / "captured"
    normal.mkdir()
    captured.mkdir()
    assert run_ranks(*CLI, "train", str(write(normal)), np=2, timeout=150).returncode == 0
    proc = run_ranks(MP / "train_captured.py", write(captured), np=2, timeout=150)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("CAPTURED OK 9") == 2, proc.stdout  # 12 steps, 3 of them warm-up
    ours = load_checkpoint(str(captured / "out" / CHECKPOINT_NAME))
    theirs = load_checkpoint(str(normal / "out" / CHECKPOINT_NAME))
    for name, tensor in theirs["model"].items():
        if not name.endswith(("running_mean", "running_var")):  # (averaged at checkpoints)
            assert torch.equal(ours["model"][name], tensor), name
    for key, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][key]["momentum_buffer"],
                           state["momentum_buffer"])


def test_cuda_graph_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.cuda_graph: captures CUDA work: it needs"):
        parse_config(config(tmp_path, cuda_graph="optimizer", device="cpu"))
    if not torch.cuda.is_available():  # auto: decided on the rank, when it has no GPU
        cfg = parse_config(config(tmp_path, cuda_graph="optimizer"))
        with pytest.raises(ConfigError, match="captures CUDA work, but this rank runs on cpu"):
            setup_run(cfg, resume=None, synthetic=False, world_size=1, rank=0, local_rank=0)


def test_cuda_graph_with_sharded_state_is_refused(tmp_path):
    mapping = config(tmp_path, cuda_graph="optimizer")
    mapping["optimizer"]["shard_optimizer_state"] = True
    with pytest.raises(ConfigError, match="train.cuda_graph: needs optimizer.shard_optimizer_state"):
        parse_config(mapping)
