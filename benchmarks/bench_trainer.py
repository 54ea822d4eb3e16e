"""Benchmark: the package's trainer against a plain Horovod loop, 2 ranks on the CPU.

Both train the same model (``small_resnet``, same seed) on input tensors of the same loader (the
``SyntheticLoader`` of the trainer's config: random 32x32 images), at the same global batch, with
momentum SGD:

* ``plain hvd``: what a Horovod user writes: ``hvd.DistributedOptimizer(torch.optim.SGD)``, the
  loss summed over the micro-batch and divided by the global batch, ``backward``, ``step``, on
  batches the same loader made before the timing (so the loader's cost shows as the trainer's);
* ``trainer``: :class:`hvd_largebatch.training.trainer.Trainer` as ``hvd-largebatch train`` builds
  it (``agreed_run``), iterating its loader, our ``DistributedOptimizer(FusedLARS(lars=False))``,
  metrics accumulated and flushed every ``log_every`` iterations.

Each variant runs ``--warmup`` iterations, then ``--iterations`` timed ones, alternating variants
``--repeats`` times (the machines are shared and noisy: the best repeat of each is compared).
Reported: images/s over all ranks for each, the ratio trainer / plain (target >= 0.95), and where
the trainer's time per iteration goes: loader (next micro-batch), forward + backward, optimizer
step (exchange + update), metrics flush, and the rest (Python around them), against the plain
loop's forward + backward and step.

Usage: ``python benchmarks/bench_trainer.py [--np 2] [--launcher gloo|mpirun] [--batch 64]
[--iterations 30] [--repeats 3]``; it launches itself (``--worker`` marks the per-rank run).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 0.95
MODEL = {"name": "small_resnet", "num_classes": 10, "options": {"width": 16, "blocks": 1}}


def config(out: str, global_batch: int, world: int, samples: int) -> dict:
    """The trainer's config: one epoch of synthetic data, no evaluation or checkpoint inside."""
    return {
        "model": MODEL,
        "data": {"source": "synthetic", "image_size": 32, "num_samples": samples,
                 "num_classes": 10, "val_samples": world},
        "schedule": {"epochs": 1, "batch": global_batch, "lr": 0.05, "momentum": 0.9},
        "optimizer": {"name": "sgd", "weight_decay": 5e-5},
        "train": {"max_per_rank_batch": global_batch // world, "log_every": 10,
                  "eval_every": 0, "checkpoint_every": 0, "device": "cpu", "seed": 0},
        "output": {"dir": out, "tensorboard": False, "plots": False, "progress": False},
    }


class Timers:
    """Seconds spent per named part, summed over the timed iterations."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.on = False

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def worker(args) -> int:
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    from hvd_largebatch.data import GlobalSampler
    from hvd_largebatch.models import build_model
    from hvd_largebatch.training.config import parse_config
    from hvd_largebatch.training.setup import agreed_run, train_loader
    from hvd_largebatch.training.trainer import Trainer

    hvd.init()
    torch.set_num_threads(1)
    world = hvd.size()
    iterations = args.warmup + args.iterations
    samples = args.batch * iterations * (args.repeats + 1)
    out = tempfile.mkdtemp(prefix="bench-trainer-")
    cfg = parse_config(config(out, args.batch, world, samples))

    # -- the trainer, as `hvd-largebatch train` builds it -------------------------------------
    trainer = Trainer(agreed_run(cfg, hvd, resume=None, synthetic=False), hvd)
    timers = Timers()
    trainer._micro_step = timers.wrap("forward + backward", trainer._micro_step)
    trainer.optimizer.step = timers.wrap("optimizer step", trainer.optimizer.step)
    trainer._flush_window = timers.wrap("metrics flush", trainer._flush_window)
    loader_next = timers.wrap("loader", next)

    no_bar = type("NoBar", (), {"update": lambda *a, **k: None})()
    real_micro_batches = trainer._micro_batches

    class TimedBatches:
        def __init__(self, batches):
            self.batches = batches

        def __next__(self):
            return loader_next(self.batches)

    trainer._micro_batches = lambda epoch, k: TimedBatches(real_micro_batches(epoch, k))

    def trainer_iterations(n: int) -> None:
        for _ in range(n):
            trainer._iteration(0, no_bar)

    # -- the plain Horovod loop on the same input tensors ----------------------------------------
    torch.manual_seed(cfg.train.seed)
    model = build_model(MODEL["name"], 10, MODEL["options"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    plain_opt = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                         op=hvd.Sum)
    sampler = GlobalSampler(trainer.schedule.dataset_size, trainer.schedule, world, hvd.rank(),
                            seed=cfg.train.seed)
    loader = train_loader(cfg, trainer.run.data, sampler, micro_batches=1,
                          device=torch.device("cpu"), dtype="float32", seed=cfg.train.seed)
    inputs = [b for b, _ in zip(loader.epoch(0), range(iterations))]  # built before timing
    plain_timers = Timers()

    def plain_iterations(n: int) -> None:
        for i in range(n):
            images, labels = inputs[i % len(inputs)]
            plain_opt.zero_grad()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(images), labels, reduction="sum") / args.batch
            loss.backward()
            t1 = time.perf_counter()
            plain_opt.step()
            if plain_timers.on:
                plain_timers.seconds["forward + backward"] += t1 - t0
                plain_timers.seconds["optimizer step"] += time.perf_counter() - t1

    best = {"plain hvd": float("inf"), "trainer": float("inf")}
    parts = {}
    for _ in range(args.repeats):
        for name, run, t in (("plain hvd", plain_iterations, plain_timers),
                             ("trainer", trainer_iterations, timers)):
            run(args.warmup)
            hvd.allreduce(torch.zeros(1), name=f"sync.{name}")  # start together
            t.on, t.seconds = True, defaultdict(float)
            t0 = time.perf_counter()
            run(args.iterations)
            elapsed = time.perf_counter() - t0
            t.on = False
            elapsed = hvd.allreduce(torch.tensor(elapsed), op=hvd.Max, name=f"t.{name}").item()
            if elapsed < best[name]:
                best[name] = elapsed
                parts[name] = {k: v / args.iterations for k, v in t.seconds.items()}
                parts[name]["total"] = elapsed / args.iterations
    if hvd.rank() == 0:
        report(best, parts, args)
    trainer.release()
    return 0


def report(best: dict, parts: dict, args) -> None:
    def out(line: str = "") -> None:
        print("BENCH " + line, flush=True)

    rate = {k: args.batch * args.iterations / v for k, v in best.items()}
    ratio = rate["trainer"] / rate["plain hvd"]
    out(f"small_resnet (width 16) on 32x32 synthetic images, global batch {args.batch} over "
        f"{args.np} ranks, momentum SGD; best of {args.repeats} x {args.iterations} iterations")
    out("| variant | images/s | ms / iteration |")
    out("|---|---|---|")
    for name in ("plain hvd", "trainer"):
        out(f"| {name} | {rate[name]:.0f} | {1e3 * parts[name]['total']:.1f} |")
    verdict = "met" if ratio >= TARGET else "MISSED"
    out(f"trainer / plain: {ratio:.3f}x (target >= {TARGET}: {verdict})")
    out("")
    out("where an iteration's time goes (ms, rank 0):")
    out("| part | plain hvd | trainer |")
    out("|---|---|---|")
    names = ["loader", "forward + backward", "optimizer step", "metrics flush"]
    for name in names:
        out(f"| {name} | {1e3 * parts['plain hvd'].get(name, 0.0):.2f} | "
            f"{1e3 * parts['trainer'].get(name, 0.0):.2f} |")
    for variant in ("plain hvd", "trainer"):
        rest = parts[variant]["total"] - sum(parts[variant].get(n, 0.0) for n in names)
        parts[variant]["rest"] = rest
    out(f"| rest (Python around them) | {1e3 * parts['plain hvd']['rest']:.2f} | "
        f"{1e3 * parts['trainer']['rest']:.2f} |")
    extra = parts["trainer"]["total"] - parts["plain hvd"]["total"]
    out(f"trainer extra per iteration: {1e3 * extra:.2f} ms "
        f"({100 * extra / parts['plain hvd']['total']:.1f}% of the plain loop's)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2, help="Horovod ranks")
    parser.add_argument("--launcher", choices=["gloo", "mpirun"], default="gloo")
    parser.add_argument("--batch", type=int, default=64, help="global batch (all ranks)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per repeat")
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(HERE))
    from ranks import run_workers

    return run_workers(__file__, [f"--{k}={getattr(args, k)}" for k in
                                  ("np", "batch", "warmup", "iterations", "repeats")],
                       args.np, args.launcher)


if __name__ == "__main__":
    sys.exit(main())
