"""hvd_largebatch.DistributedOptimizer: real Horovod ranks against one-process references, plus the
argument checks and the rank-agreement messages (single process)."""
import re

import pytest
import torch

from hvd_largebatch.distributed.consistency import describe_optimizer, first_difference, mismatch_message
from hvd_largebatch.errors import ConfigError
from launch import MP, run_ranks

CHECKS = {"TRAIN": 4, "MEMORY": 2, "STATE": 2, "MIXED": 1, "SGD": 1, "NOISE": 3}


def _oks(output: str, size: int) -> dict:
    """check name -> {rank: [detail, ...]} from the ``RANK r/W CHECK OK detail`` lines."""
    found: dict = {}
    pattern = r"RANK (\d+)/(\d+) (\w+) OK ((?:(?!RANK \d).)*)"
    for rank, world, check, detail in re.findall(pattern, output):
        assert int(world) == size
        found.setdefault(check, {}).setdefault(int(rank), []).append(detail.strip())
    return found


@pytest.mark.multiprocess
def test_training_matches_one_process_reference_in_both_modes_and_world_sizes(tmp_path):
    """2 ranks (horovodrun --gloo), then 3 ranks (mpirun) resuming the 2-rank sharded checkpoint."""
    pytest.importorskip("horovod.torch")
    checkpoint = tmp_path / "sharded.pt"
    for size, launcher, extra in ((2, "gloo", ["--save", checkpoint]),
                                  (3, "mpirun", ["--load", checkpoint])):
        proc = run_ranks(MP / "distributed_training.py", *extra, np=size, launcher=launcher,
                         timeout=240)
        assert proc.returncode == 0, proc.stdout
        found = _oks(proc.stdout, size)
        for check, per_rank in CHECKS.items():
            expected = per_rank + (1 if check == "STATE" and size == 3 else 0)
            assert sorted(found.get(check, {})) == list(range(size)), (check, proc.stdout)
            assert all(len(v) == expected for v in found[check].values()), (check, proc.stdout)
        assert checkpoint.exists()
        # both modes' parameter errors against the one-process reference are at rounding level
        errors = [float(d.split()[1]) for d in found["TRAIN"][0]]
        assert max(errors) < 2e-5, found["TRAIN"][0]


@pytest.mark.multiprocess
def test_ranks_that_disagree_fail_with_the_first_difference_not_a_hang():
    pytest.importorskip("horovod.torch")
    proc = run_ranks(MP / "distributed_mismatch.py", np=2, launcher="mpirun", timeout=90)
    out = proc.stdout
    caught = re.findall(r"RANK (\d) CAUGHT .*ranks disagree on param_groups\[0\]\.lr: "
                        r"rank 0 has 0\.1, rank 1 has 0\.2; "
                        r"ranks that differ from rank 0: \[1\]", out)
    assert sorted(caught) == ["0", "1"], out
    assert proc.returncode != 0, out
    assert "NOT REACHED" not in out
    assert re.search(r"DistributedMismatchError: DistributedOptimizer: ranks disagree on "
                     r"params\[4\] \(parameter 'extra\.weight'\): rank 0 has '<absent>', "
                     r"rank 1 has", out), out


# -- single process: argument checks -------------------------------------------------------------


@pytest.fixture
def hvd():
    return pytest.importorskip("horovod.torch")


def _lars():
    from hvd_largebatch import FusedLARS

    return FusedLARS([torch.nn.Parameter(torch.ones(3, 2))], lr=0.1)


@pytest.mark.parametrize("kwargs, key, words", [
    ({"op": "adasum"}, "op", ["Adasum", "local gradient", "#2914"]),
    ({"backward_passes_per_step": 0}, "backward_passes_per_step", ["> 0"]),
    ({"gradient_predivide_factor": 2.0, "op": "sum"}, "gradient_predivide_factor", ["Average"]),
    ({"groups": 2}, "groups", ["not supported"]),
    ({"sharded_exchange": "ring"}, "sharded_exchange", ["'reducescatter' or 'allreduce'"]),
    ({"global_batch": 0}, "global_batch", ["positive int"]),
    ({"noise_scale_decay": 1.0}, "noise_scale_decay", ["[0, 1)"]),
    ({"shard_optimizer_state": True, "inner": "sgd"}, "shard_optimizer_state",
     ["FusedLARS", "SGD"]),
])
def test_unsupported_arguments_are_config_errors_before_any_collective(hvd, kwargs, key, words):
    from hvd_largebatch import DistributedOptimizer

    kwargs = dict(kwargs)
    inner = kwargs.pop("inner", "lars")
    if "op" in kwargs:
        kwargs["op"] = {"adasum": hvd.Adasum, "sum": hvd.Sum}[kwargs["op"]]
    if inner == "sgd":
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    else:
        opt = _lars()
    # hvd.init() was never called: the check must come before anything that needs Horovod running
    with pytest.raises(ConfigError) as info:
        DistributedOptimizer(opt, **kwargs)
    assert info.value.key == key
    assert all(w in str(info.value) for w in words), str(info.value)


def test_import_does_not_load_horovod():
    import subprocess
    import sys

    code = ("import sys, hvd_largebatch; assert 'horovod' not in sys.modules; "
            "hvd_largebatch.DistributedOptimizer; assert 'horovod.torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- single process: what ranks must agree on ----------------------------------------------------


def _description(lr=0.1, extra=False, dtype=torch.float32, shard=False):
    from hvd_largebatch import FusedLARS

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    if extra:
        model.add_module("extra", torch.nn.Linear(2, 1))
    model.to(dtype)
    names = {p: n for n, p in model.named_parameters()}
    opt = FusedLARS(model.parameters(), lr=lr)
    return describe_optimizer(opt, names, {"shard_optimizer_state": shard, "op": "Average"})


def test_agreeing_ranks_produce_no_message():
    assert mismatch_message([_description(), _description(), _description()]) is None


def test_first_difference_names_path_values_and_all_differing_ranks():
    message = mismatch_message([_description(), _description(), _description(lr=0.5),
                                _description(shard=True)])
    # rank 2 is the lowest differing rank: its difference (the lr) is named, rank 3's is not
    assert message.startswith("ranks disagree on param_groups[0].lr: rank 0 has 0.1, "
                              "rank 2 has 0.5")
    assert message.endswith("ranks that differ from rank 0: [2, 3]")


def test_dtype_and_extra_parameter_differences_name_the_parameter():
    message = mismatch_message([_description(), _description(dtype=torch.float16)])
    assert message.startswith("ranks disagree on params[0].dtype (parameter '0.weight'): rank 0 "
                              "has 'torch.float32', rank 1 has 'torch.float16'")
    message = mismatch_message([_description(extra=True), _description()])
    assert message.startswith("ranks disagree on params[4] (parameter 'extra.weight'): rank 0 has "
                              "{'name': 'extra.weight'")
    assert "rank 1 has '<absent>'" in message


def test_first_difference_walks_in_order_and_treats_nan_as_equal():
    assert first_difference({"a": [1, 2], "b": 3}, {"a": [1, 5], "b": 4}) == ("a[1]", 2, 5)
    assert first_difference({"a": 1}, {"a": 1, "z": 2}) == ("z", "<absent>", 2)
    assert first_difference({"x": float("nan")}, {"x": float("nan")}) is None
    assert first_difference([1, 2], [1, 2, 3]) == ("[2]", "<absent>", 3)
