"""training/setup.py pieces that need no data: the rank's device."""
import pytest
import torch

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.training.setup import resolve_device


@pytest.fixture
def four_gpus(monkeypatch):
    """A node with 4 GPUs as torch.cuda reports it; records set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_the_local_ranks_gpu_is_made_current_once(four_gpus, name):
    device = resolve_device(name, local_rank=2)
    assert device == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", 2)]


def test_cpu_sets_no_device(four_gpus):
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    assert four_gpus == []


def test_more_ranks_than_gpus_names_the_key(four_gpus):
    with pytest.raises(ConfigError, match=r"train.device.*local rank 4 has no GPU: this node has 4"):
        resolve_device("auto", local_rank=4)
    assert four_gpus == []


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def test_deterministic_and_bn_group_keys_reach_torch_and_the_model(restore_determinism, tmp_path):
    import os

    from hvd_largebatch.models import GhostBatchNorm2d
    from hvd_largebatch.training.config import parse_config
    from hvd_largebatch.training.setup import setup_run

    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    cfg = parse_config({
        "model": {"name": "small_resnet", "options": {"width": 4}},
        "data": {"source": "synthetic", "num_samples": 64, "num_classes": 3, "image_size": 8},
        "schedule": {"epochs": 1, "batch": 16, "lr": 0.1},
        "train": {"deterministic": True, "bn_group": 4, "max_per_rank_batch": 8, "device": "cpu"},
        "output": {"dir": str(tmp_path)}})
    run = setup_run(cfg, resume=None, synthetic=False, world_size=2, rank=0, local_rank=0)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    norms = [m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(type(m) is GhostBatchNorm2d and m.group == 4 for m in norms)
    assert run.micro_batches == (1,)  # 16 / 2 ranks = 8 per rank: one micro-batch of 2 groups
    for bad, message in ((0, "must be >= 1, got 0"), (16, "16 is larger than train.max_per_rank_batch 8")):
        with pytest.raises(ConfigError, match=f"^train.bn_group: {message}"):
            parse_config({**cfg.to_dict(), "train": {"bn_group": bad, "max_per_rank_batch": 8}})
