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
