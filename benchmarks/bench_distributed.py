"""Benchmark: one distributed optimizer step on the ResNet-50 parameter set, 2 Horovod ranks on CPU.

The ResNet-50 parameters (161 tensors, 25,557,032 fp32 values; ``hvd_largebatch.models``, no
torchvision) get random gradients on each rank; then every variant times back-to-back
``optimizer.step()`` calls. No backward runs, so each step is the whole exchange (started in
``synchronize()``) plus norms plus update, with nothing to overlap it with:

* ``hvd exchange only``: ``hvd.DistributedOptimizer`` around an optimizer whose step does nothing
  (the replicated exchange).
* ``hvd rs+ag only``: the sharded exchange alone, Horovod collectives on buffers of the same sizes:
  reduce-scatter of the flat gradient, allgather of the weight shard, copy into the flat weights.
  ``hvd ar+ag only``: the same with an in-place allreduce instead of the reduce-scatter.
* ``hvd SGD``: ``hvd.DistributedOptimizer(torch.optim.SGD)`` (momentum 0.9, weight decay).
* ``ours SGD``: ``hvd_largebatch.DistributedOptimizer(torch.optim.SGD)`` (wrapper overhead).
* ``ours LARS``: ``DistributedOptimizer(FusedLARS)``, replicated: allreduce, ``||w||^2`` during
  the exchange, ``||g||^2`` of the averaged gradients, fused update.
* ``ours LARS +noise``: the same while measuring the gradient noise scale (local-norm pass and a
  one-element allreduce).
* ``ours LARS sharded-rs``: ``shard_optimizer_state=True, sharded_exchange="reducescatter"``:
  reduce-scatter, layer-sums allreduce, update of 1 / world size of the parameters, allgather.
  ``ours LARS sharded-ar``: the same with ``sharded_exchange="allreduce"`` (what ``"auto"`` picks
  for CPU tensors under Gloo).

Variants are timed interleaved (the order rotates every repeat); each variant's figure is its best
repeat (the one least disturbed by other load on a shared machine; medians are printed too),
averaged over the ranks. The *LARS-specific overhead* of a mode is its step time minus its exchange
minus what an SGD update of the same parameters costs (``hvd SGD - hvd exchange only``, times the
fraction of the parameters the rank updates: 1, or 1 / world size when sharded), as a fraction of
the step; for the replicated mode that is ``(ours LARS - hvd SGD) / ours LARS``. Target: under 15%.

Usage: ``python benchmarks/bench_distributed.py [--np 2] [--launcher gloo|mpirun] [--repeats 10]
[--steps 1]``; it launches itself (``--worker`` marks the per-rank run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 0.15
VARIANTS = ["hvd exchange only", "hvd rs+ag only", "hvd ar+ag only", "hvd SGD", "ours SGD",
            "ours LARS", "ours LARS +noise", "ours LARS sharded-rs", "ours LARS sharded-ar"]


def launch(args) -> int:
    """Driver: run the workers under the launcher, relay rank 0's report (benchmarks/ranks.py)."""
    sys.path.insert(0, str(HERE))
    from ranks import run_workers

    return run_workers(__file__, ["--repeats", str(args.repeats), "--steps", str(args.steps)],
                       args.np, args.launcher)


def worker(args) -> int:
    import horovod.torch as hvd
    import torch

    from hvd_largebatch import DistributedOptimizer, FusedLARS, param_groups
    from hvd_largebatch.models import build_model

    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    lr, momentum, wd = 0.1, 0.9, 5e-5

    class NoUpdate(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            return None

    class ShardedCollectives:
        """What the sharded mode exchanges per step, on buffers of the same size, and no more."""

        def __init__(self, numel: int, reduce: str):
            self.reduce = reduce
            shard = -(-numel // size)
            self.grads = torch.randn(shard * size)
            self.weights = torch.randn(shard * size)
            self.shard = slice(rank * shard, (rank + 1) * shard)

        def step(self):
            if self.reduce == "allreduce":
                hvd.synchronize(hvd.allreduce_async_(self.grads, name="bench.ar"))
            else:
                hvd.synchronize(hvd.reducescatter_async(self.grads, name="bench.rs"))
            gathered = hvd.synchronize(hvd.allgather_async(self.weights[self.shard],
                                                           name="bench.ag"))
            self.weights.copy_(gathered)

    def model_with_grads():
        torch.manual_seed(0)
        model = build_model("resnet50", 1000)
        gen = torch.Generator().manual_seed(1 + rank)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return model

    def make(kind: str):
        model = model_with_grads()
        named = model.named_parameters()
        sgd = dict(lr=lr, momentum=momentum, weight_decay=wd)
        lars = dict(lr=lr, momentum=momentum, trust_coefficient=0.001)
        if kind == "hvd exchange only":
            return hvd.DistributedOptimizer(NoUpdate(model.parameters(), lr=lr),
                                            named_parameters=named)
        if kind in ("hvd rs+ag only", "hvd ar+ag only"):
            return ShardedCollectives(sum(p.numel() for p in model.parameters()),
                                      "allreduce" if kind == "hvd ar+ag only" else "reducescatter")
        if kind == "hvd SGD":
            return hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), **sgd),
                                            named_parameters=named)
        if kind == "ours SGD":
            return DistributedOptimizer(torch.optim.SGD(model.parameters(), **sgd),
                                        named_parameters=named)
        inner = FusedLARS(param_groups(model, wd), **lars)
        if kind == "ours LARS":
            return DistributedOptimizer(inner, named_parameters=named)
        if kind == "ours LARS +noise":
            return DistributedOptimizer(inner, named_parameters=named, global_batch=256 * size)
        exchange = "allreduce" if kind == "ours LARS sharded-ar" else "reducescatter"
        return DistributedOptimizer(inner, named_parameters=named, shard_optimizer_state=True,
                                    sharded_exchange=exchange)

    optimizers = {kind: make(kind) for kind in VARIANTS}
    first = optimizers["hvd SGD"]
    tensors = sum(len(g["params"]) for g in first.param_groups)
    numel = sum(p.numel() for g in first.param_groups for p in g["params"])
    for opt in optimizers.values():  # warm up: tables, buffers, Horovod's fusion buffer
        opt.step()
    barrier = torch.zeros(1)
    samples = {kind: [] for kind in VARIANTS}
    for r in range(args.repeats):
        for kind in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            hvd.allreduce(barrier, name="bench.barrier")
            t0 = time.perf_counter()
            for _ in range(args.steps):
                optimizers[kind].step()
            samples[kind].append((time.perf_counter() - t0) * 1e3 / args.steps)
    local = torch.tensor([[min(samples[k]) for k in VARIANTS],
                          [statistics.median(samples[k]) for k in VARIANTS]], dtype=torch.float64)
    best, median = hvd.allreduce(local, op=hvd.Average, name="bench.result").tolist()
    ms, ms_median = dict(zip(VARIANTS, best)), dict(zip(VARIANTS, median))
    momentum_elements = sum(s["momentum_buffer"].numel()
                            for s in optimizers["ours LARS sharded-ar"].state.values())
    if rank == 0:
        report(ms, ms_median, tensors, numel, size, momentum_elements, torch.__version__)
    return 0


def report(ms: dict, ms_median: dict, tensors: int, numel: int, size: int,
           momentum_elements: int, version: str):
    def out(line: str = "") -> None:
        print("BENCH " + line, flush=True)

    exchange, sharded_exchange = ms["hvd exchange only"], ms["hvd rs+ag only"]
    hvd_sgd, lars, sharded = ms["hvd SGD"], ms["ours LARS"], ms["ours LARS sharded-rs"]
    sgd_update = hvd_sgd - exchange
    out(f"ResNet-50 parameter set: {tensors} tensors, {numel:,} fp32 values; {size} ranks; "
        f"torch {version}")
    out(f"{'variant':<22}{'ms/step':>9}{'x hvd SGD':>11}{'median ms':>11}")
    for kind in VARIANTS:
        out(f"{kind:<22}{ms[kind]:>9.1f}{ms[kind] / hvd_sgd:>11.2f}{ms_median[kind]:>11.1f}")
    out(f"SGD update (hvd SGD - hvd exchange only): {sgd_update:.1f} ms")
    for mode, step, exch, share in (
            ("replicated", lars, exchange, 1.0),
            ("sharded-rs", sharded, sharded_exchange, 1.0 / size),
            ("sharded-ar", ms["ours LARS sharded-ar"], ms["hvd ar+ag only"], 1.0 / size)):
        overhead = (step - exch - share * sgd_update) / step
        out(f"{mode}: exchange {exch:.1f} ms = {100 * exch / step:.0f}% of the step; norms + "
            f"update {step - exch:.1f} ms; LARS-specific overhead {100 * overhead:.1f}% "
            f"(target < {100 * TARGET:.0f}%): {'met' if overhead < TARGET else 'MISSED'}")
    out(f"noise-scale measurement: {ms['ours LARS +noise'] - lars:+.1f} ms/step; wrapper overhead "
        f"with SGD (ours SGD - hvd SGD): {ms['ours SGD'] - hvd_sgd:+.1f} ms/step")
    out(f"sharded / replicated step time: {sharded / lars:.2f} (reduce-scatter), "
        f"{ms['ours LARS sharded-ar'] / lars:.2f} (allreduce); momentum held by rank 0: "
        f"{momentum_elements:,} of {numel:,} values ({momentum_elements / numel:.3f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2, help="Horovod ranks")
    parser.add_argument("--launcher", choices=["gloo", "mpirun"], default="gloo",
                        help="horovodrun --gloo, or mpirun (Horovod's MPI controller)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per sample")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    sys.exit(main())
