"""Per-rank script: hvd_largebatch.DistributedOptimizer against one-process references.

Checks, each printing ``RANK r/W <CHECK> OK <detail>`` (any failure raises, exiting non-zero):

* ``TRAIN <variant>``: k steps of distributed LARS with global batch B equal k steps of
  ReferenceLARS (lars.reference, one process) on the same B samples, in replicated and sharded mode
  (reduce-scatter, or allreduce exchange), with op=Average (per-rank mean loss) and op=Sum
  (per-rank sum / B), 1 or 2 micro-batches (set with set_backward_passes_per_step), both
  trust-ratio denominators; the lr changes every step, set by hand or by a torch LambdaLR driving
  the wrapper. The reported trust ratios are those of the whole-batch gradient (formula on the
  reference's tensors). The model has 77 fp32 elements (odd, and not a multiple of 3) so shards cut
  through layers; ranks must end bitwise equal.
* ``MEMORY``: in sharded mode each rank holds momentum for exactly its shard (counted elements
  against ceil(n / W) arithmetic), and the ranks' counts add up to the model size.
* ``STATE``: hvd.broadcast_optimizer_state leaves the shards alone (one zero-gradient step, as for
  any fresh optimizer); the gathered sharded state equals the reference's momentum buffers; a full
  state loaded into a fresh sharded optimizer continues exactly; a shard state loads back on the
  same layout and is refused on another world size. ``--save`` / ``--load`` pass a checkpoint
  between launches of different world sizes.
* ``MIXED``: a model with an fp16 parameter (two flat buffers) trains the same in both modes.
* ``SGD``: one training function (broadcast_optimizer_state, synchronize + gradient clipping +
  skip_synchronize), run once with hvd.DistributedOptimizer and once with ours (the only
  difference), gives the same parameters with torch.optim.SGD.
* ``NOISE``: on synthetic per-sample gradients G + noise with known tr(Sigma) / |G|^2, the
  estimator recovers it in every mode, without reading any tensor on the host during step().
"""
import argparse
import copy
import math
import sys

import horovod.torch as hvd
import torch
from torch import nn

from hvd_largebatch import DistributedOptimizer, FusedLARS, param_groups
from hvd_largebatch.lars.reference import ReferenceLARS, trust_ratio

parser = argparse.ArgumentParser()
parser.add_argument("--save", default=None, help="write a sharded checkpoint (after TRAIN steps)")
parser.add_argument("--load", default=None, help="continue from a checkpoint of another world size")
args = parser.parse_args()

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
torch.set_num_threads(1)
STEPS, PER_RANK, WD = 4, 6, 1e-3
B = PER_RANK * SIZE


def report(check: str, detail: str = "") -> None:
    # one write per line: mpirun forwards each write as it comes, so print()'s separate newline
    # could land after another rank's line
    sys.stdout.write(f"RANK {RANK}/{SIZE} {check} OK {detail}\n")
    sys.stdout.flush()


class Net(nn.Module):
    """77 fp32 elements: fc1 40, norm 10, fc2 15, head 12 (plus 3 fp16 with ``fp16_gain``)."""

    def __init__(self, fp16_gain: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(7, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3, bias=False)
        self.gain = nn.Parameter(torch.full((3,), 1.5, dtype=torch.float16)) if fp16_gain else None
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc2(torch.relu(self.norm(self.fc1(x))))
        if self.gain is not None:
            h = h * self.gain.float()
        return self.head(h)


def data(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def fresh_model(fp16_gain=False) -> nn.Module:
    torch.manual_seed(100 + RANK)  # differs on purpose: broadcast_parameters must fix it
    model = Net(fp16_gain)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model


def max_rel_err(model, ref_model) -> float:
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        err = float((p.detach().float() - q.detach().float()).abs().max()
                    / q.detach().float().abs().max().clamp(min=1e-12))
        worst = max(worst, err)
    return worst


def assert_ranks_equal(model, what: str) -> None:
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    gathered = hvd.allgather(flat.unsqueeze(0), name=f"equal.{what}")
    assert all(torch.equal(gathered[0], gathered[r]) for r in range(SIZE)), (RANK, what)


def warmup(step: int) -> float:
    return (step + 1) / (STEPS + 2)  # the lr changes every step


def global_trust_ratios(ref) -> torch.Tensor:
    """The trust ratios of the reference's coming step (whole-batch gradients), by the formula."""
    out = []
    for group in ref.param_groups:
        for p in group["params"]:
            w, g = p.detach().float(), p.grad.float()
            out.append(trust_ratio(w.pow(2).sum(), g.pow(2).sum(), (w * g).sum(),
                                   weight_decay=group["weight_decay"],
                                   trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                                   lars=group["lars"], denominator=group["denominator"]))
    return torch.stack(out)


def train_steps(model, opt, ref_model, ref, hyper, op, micro, first_step, steps, tol,
                scheduler=False):
    """Distributed steps on this rank's slice against reference steps on the whole batch; the lr
    is set by hand, or (``scheduler``) by a torch LambdaLR driving each optimizer."""
    denom = B if op == hvd.Sum else PER_RANK  # each micro-batch's loss: its samples' sum / denom
    if scheduler:
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in (opt, ref)]
    worst = 0.0
    for step in range(first_step, first_step + steps):
        x_all, y_all = data(1000 + step, B)
        rows = slice(RANK * PER_RANK, (RANK + 1) * PER_RANK)
        x, y = x_all[rows], y_all[rows]
        if not scheduler:
            for o in (opt, ref):
                for group in o.param_groups:
                    group["lr"] = hyper["lr"] * warmup(step)
        opt.zero_grad()
        for part_x, part_y in zip(x.chunk(micro), y.chunk(micro)):
            loss = nn.functional.cross_entropy(model(part_x), part_y, reduction="sum")
            loss.div(denom).backward()
        opt.step()
        assert not bool(opt.last_step_skipped())
        ref.zero_grad()
        nn.functional.cross_entropy(ref_model(x_all), y_all).backward()
        expected = global_trust_ratios(ref)
        ref.step()
        reported = opt.last_trust_ratios()
        assert torch.allclose(reported, expected, rtol=1e-4, atol=1e-7), (RANK, reported, expected)
        if scheduler:
            for sched in schedulers:
                sched.step()
            assert opt.optimizer.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        err = max_rel_err(model, ref_model)
        assert err < tol, (RANK, step, err)
        worst = max(worst, err)
    return worst


def build(model, hyper, shard, op, micro, **extra):
    opt = FusedLARS(param_groups(model, weight_decay=WD), **hyper)
    return DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=op,
                                backward_passes_per_step=micro, shard_optimizer_state=shard,
                                **extra)


def momentum_elements(opt) -> int:
    return sum(s["momentum_buffer"].numel() for s in opt.state.values() if "momentum_buffer" in s)


def owned(n: int, rank: int) -> int:
    """Elements of an n-element buffer in rank's shard (shards of ceil(n / W), padding last)."""
    s = -(-n // SIZE)
    return max(0, min(n, (rank + 1) * s) - rank * s)


VARIANTS = [  # (label, shard, op, micro-batches, denominator)
    ("replicated-avg", False, hvd.Average, 1, "separate"),
    ("replicated-sum-micro2-combined", False, hvd.Sum, 2, "combined"),
    ("sharded-sum-combined", True, hvd.Sum, 1, "combined"),
    ("sharded-allreduce-avg-micro2", True, hvd.Average, 2, "separate"),
]


def exchange_of(label: str) -> dict:
    """Explicit, so both exchanges are tested ("auto" depends on the device and controller)."""
    if not label.startswith("sharded"):
        return {}
    return {"sharded_exchange": "allreduce" if "-allreduce" in label else "reducescatter"}


for label, shard, op, micro, denominator in VARIANTS:
    hyper = dict(lr=0.8, momentum=0.9, nesterov="micro2" in label, trust_coefficient=0.02,
                 denominator=denominator)
    model = fresh_model()
    ref_model = copy.deepcopy(model)
    opt = build(model, hyper, shard, op, 1, **exchange_of(label))
    opt.set_backward_passes_per_step(micro)  # as the trainer does when a phase changes it
    ref = ReferenceLARS(param_groups(ref_model, weight_decay=WD), **hyper)
    with_scheduler = label.startswith("sharded-allreduce")
    worst = train_steps(model, opt, ref_model, ref, hyper, op, micro, 0, STEPS, 2e-5,
                        scheduler=with_scheduler)
    assert_ranks_equal(model, label)
    report("TRAIN", f"{label} {worst:.2e}{' lr by LambdaLR' if with_scheduler else ''}")

    if not shard:
        continue
    n = sum(p.numel() for p in model.parameters())
    mine = momentum_elements(opt)
    assert mine == owned(n, RANK), (RANK, mine, owned(n, RANK))
    assert mine <= -(-n // SIZE)
    total = hvd.allreduce(torch.tensor([mine]), op=hvd.Sum, name=f"count.{label}").item()
    assert total == n == 77, (total, n)
    report("MEMORY", f"{label} {mine}/{n}")

    # Horovod's broadcast_optimizer_state must not copy rank 0's shard over the others': it finds
    # no whole-parameter state, so it only takes its usual zero-gradient step (the reference too)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert momentum_elements(opt) == mine
    for q in ref_model.parameters():
        q.grad = torch.zeros_like(q)
    ref.step()
    assert max_rel_err(model, ref_model) < 2e-5
    # the gathered state is the reference's (a replicated run's) state
    gathered = opt.gathered_state_dict()
    ref_params = [q for group in ref.param_groups for q in group["params"]]
    for index, entry in gathered["state"].items():
        expected = ref.state[ref_params[index]]["momentum_buffer"]
        assert torch.allclose(entry["momentum_buffer"], expected, rtol=1e-4, atol=1e-6), index
    assert len(gathered["state"]) == len(ref_params)
    # a shard state loads back on the same layout, and is refused elsewhere
    own = opt.state_dict()
    assert own["state"] == {} and len(own["shard"]["state"]) == len(opt.state)
    opt.load_state_dict(own)
    own["shard"] = dict(own["shard"], world_size=SIZE + 1)
    try:
        opt.load_state_dict(own)
        raise AssertionError("a shard of another world size was accepted")
    except ValueError as exc:
        assert "world_size" in str(exc), exc
    # a full state loads into a fresh sharded optimizer (and its model copy) and continues exactly
    model2 = copy.deepcopy(model)
    opt2 = build(model2, hyper, True, op, micro, **exchange_of(label))
    opt2.load_state_dict(gathered)
    worst = train_steps(model2, opt2, ref_model, ref, hyper, op, micro, STEPS, 2, 2e-5)
    assert_ranks_equal(model2, label + ".resumed")
    report("STATE", f"{label} {worst:.2e}")
    if args.save and label == "sharded-sum-combined":  # (collective: all ranks gather)
        if RANK == 0:
            torch.save({"model": model2.state_dict(), "optimizer": opt2.gathered_state_dict(),
                        "ref_model": ref_model.state_dict(), "ref": ref.state_dict()}, args.save)
        else:
            opt2.gathered_state_dict()  # collective
    if args.load and label == "sharded-sum-combined":
        saved = torch.load(args.load, weights_only=False)
        model3 = fresh_model()
        model3.load_state_dict(saved["model"])
        opt3 = build(model3, hyper, True, op, micro)  # sharded_exchange="auto"
        opt3.load_state_dict(saved["optimizer"])
        ref_model3 = fresh_model()
        ref_model3.load_state_dict(saved["ref_model"])
        ref3 = ReferenceLARS(param_groups(ref_model3, weight_decay=WD), **hyper)
        ref3.load_state_dict(saved["ref"])
        worst = train_steps(model3, opt3, ref_model3, ref3, hyper, op, micro, STEPS + 2, 2, 2e-5)
        report("STATE", f"resumed a checkpoint of another world size {worst:.2e}")

# two flat buffers (fp32 and fp16): both modes agree, and stay close to the fp32 reference
hyper = dict(lr=0.5, momentum=0.9, trust_coefficient=0.02)
results = []
for shard in (False, True):
    model = fresh_model(fp16_gain=True)
    ref_model = copy.deepcopy(model)
    opt = build(model, hyper, shard, hvd.Sum, 1, **exchange_of("sharded" if shard else ""))
    ref = ReferenceLARS(param_groups(ref_model, weight_decay=WD), **hyper)
    train_steps(model, opt, ref_model, ref, hyper, hvd.Sum, 1, 0, STEPS, 2e-2)
    results.append([p.detach().clone() for p in model.parameters()])
    assert_ranks_equal(model, f"mixed.{shard}")
for a, b in zip(*results):
    assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
report("MIXED", "fp32 + fp16 buffers")


def sgd_training(wrap):
    """A Horovod training loop; ``wrap`` is the only thing that differs between the runs."""
    torch.manual_seed(5 + RANK)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    optimizer = wrap(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    for step in range(STEPS):
        x, y = data(2000 + 10 * step + RANK, PER_RANK)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.synchronize()  # Horovod's gradient-clipping pattern
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        with optimizer.skip_synchronize():
            optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


theirs, ours = sgd_training(hvd.DistributedOptimizer), sgd_training(DistributedOptimizer)
for a, b in zip(theirs, ours):
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (RANK, (a - b).abs().max())
difference = max(float((a - b).abs().max()) for a, b in zip(theirs, ours))
report("SGD", f"same parameters as hvd.DistributedOptimizer {difference:.1e}")


class NoHostReads:
    """Makes reading a tensor on the host an error (a host synchronization on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(*_args, **_kwargs):
            raise AssertionError("a tensor was read on the host during step()")

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


# gradient noise scale: per-sample gradient of <w, x_i> is x_i = G + noise, Sigma = diag(v)
DIM, NOISE_STEPS, PER_RANK_NOISE = 1 << 15, 80, 4
B_NOISE = PER_RANK_NOISE * SIZE
gen = torch.Generator().manual_seed(42)  # same G and Sigma on every rank
G = torch.randn(DIM, generator=gen)
G /= G.norm()  # |G|^2 = 1
variances = torch.rand(DIM, generator=gen) + 0.5
TRACE = 24.0
variances *= TRACE / variances.sum()  # tr(Sigma) = 24, so B_simple = 24
for mode in ("replicated", "sharded", "sharded-allreduce"):
    shard = mode != "replicated"
    w = nn.Parameter(torch.zeros(DIM))
    inner = FusedLARS([w], lr=0.0, momentum=0.0) if shard else torch.optim.SGD([w], lr=0.0)
    opt = DistributedOptimizer(inner, named_parameters=[("w", w)], op=hvd.Sum,
                               shard_optimizer_state=shard, global_batch=B_NOISE,
                               noise_scale_decay=0.97, **exchange_of(mode))
    samples = torch.Generator().manual_seed(7 + 31 * RANK + 1000 * len(mode))
    for step in range(NOISE_STEPS):
        x = G + torch.randn(PER_RANK_NOISE, DIM, generator=samples) * variances.sqrt()
        opt.zero_grad()
        (w * x).sum().div(B_NOISE).backward()  # this rank's samples' sum / global batch
        with NoHostReads():
            opt.step()
    stats = opt.noise_scale_stats()
    value = opt.noise_scale()
    assert stats["steps"] == NOISE_STEPS
    assert abs(value - TRACE) < 0.05 * TRACE, (RANK, shard, value)
    assert abs(float(stats["grad_sq"]) - 1.0) < 0.05, (RANK, float(stats["grad_sq"]))
    assert abs(float(stats["trace"]) - TRACE) < 0.05 * TRACE, (RANK, float(stats["trace"]))
    values = hvd.allgather_object(value, name=f"noise.{mode}")
    assert all(v == values[0] for v in values), values
    assert math.isfinite(value)
    report("NOISE", f"{mode} B_simple {value:.4f} (true {TRACE:g})")
