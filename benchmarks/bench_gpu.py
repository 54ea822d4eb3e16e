"""GPU benchmark: LARS steps over the ResNet-50 parameter set, and ResNet-50 training throughput.

LARS (161 tensors, 25,557,032 fp32 values, gradients N(0, 1e-3)), milliseconds per optimizer step
(CUDA events, warm-up, then the median over ``--repeats`` samples of ``--steps`` steps, the
variants interleaved):

* ``FusedLARS`` and ``FusedLARS carry`` (``carry_weight_norms=True``);
* ``per-tensor loop``: LARS one tensor at a time, as timm's ``Lars`` optimizer is written (per
  tensor: d = g + wd w, two norms, a ``torch.where`` trust ratio, momentum, update: ~10 kernels);
* ``foreach LARS``: ``torch._foreach_*`` LARS (``bench_lars.ForeachLARS``);
* ``SGD fused``: ``torch.optim.SGD(fused=True)`` with momentum and weight decay (not LARS; for
  scale);
* ``floor``: the bytes a step must move (28 per fp32 value, 24 with carried weight norms; see
  ``bench_lars``) divided by the measured device copy bandwidth (``dst.copy_(src)``, read + write).

Each variant's kernel launches per step are counted with ``torch.profiler`` (CUDA kernel events;
memory copies and memsets are not kernels). With Horovod importable, the launches of
``hvd_largebatch.DistributedOptimizer(FusedLARS)`` on one rank are counted too.

Training: ResNet-50 on synthetic 224x224 images under bf16 autocast, images per second over
``--iters`` iterations after ``--warmup``, the two loops interleaved over ``--repeats`` samples
(median):

* ``package step``: what the trainer does per iteration with one micro-batch: loss = sum of the
  per-sample cross entropies (fp32 logits) / batch, backward, the top-1 count, then the step of
  ``FusedLARS`` over ``param_groups`` (through ``DistributedOptimizer`` when Horovod is
  importable), its lr held on the device and filled every iteration, as the trainer does;
* ``graphed optimizer``: the same with the optimizer step replayed from a CUDA graph
  (``train.cuda_graph: optimizer``, ``training/cuda_graph.py``);
* ``compiled model``: the package step with the model through ``torch.compile``
  (``train.compile``);
* ``plain loop``: the same model, mean cross entropy, ``torch.optim.SGD(fused=True)``.

Usage: ``python benchmarks/bench_gpu.py [--section lars|train|all] [--json FILE]`` (the figures
and the printed tables); on a machine
without a CUDA device it prints why and exits 0 (``make bench`` runs every benchmark).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench_lars import (BYTES_PER_ELEMENT, HYPER, WEIGHT_DECAY, _Copy, check_variants,
                        copy_bandwidth, copy_floor_ms, cpu_model, make_variant, time_steps)
from hvd_largebatch import FusedLARS, param_groups
from hvd_largebatch.models import build_model
from hvd_largebatch.training.cuda_graph import CapturedStep

#: the training loops compared (the first three are the package's)
TRAINING_KINDS = ("package step", "graphed optimizer", "compiled model", "plain loop")

LARS_KINDS = ["FusedLARS", "FusedLARS carry", "per-tensor loop", "foreach LARS", "SGD fused"]


class PerTensorLARS:
    """LARS as a per-parameter Python loop in the style of timm's ``Lars`` (written here): every
    tensor of every group in turn, trust ratio by ``torch.where`` on device scalars (no host
    synchronization), torch-style momentum u = m u + ratio d, w -= lr u."""

    def __init__(self, groups):
        self.groups = [dict(g, params=list(g["params"])) for g in groups]
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.groups:
            wd, m, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(p.grad)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    d.mul_(ratio)
                buf = self.state.get(p)
                if buf is None:
                    buf = self.state[p] = d
                else:
                    buf.mul_(m).add_(d)
                p.add_(buf, alpha=-lr)


def launches_per_step(kernel_names: list[str], steps: int) -> float:
    """Kernel launches per step from the CUDA event names a profiler recorded over ``steps``
    steps (memory copies and memsets are not kernel launches)."""
    kernels = [n for n in kernel_names if not n.lower().startswith(("memcpy", "memset"))]
    return len(kernels) / steps


def count_launches(step, steps: int = 3) -> float:
    """Profile ``steps`` calls of ``step()`` (after one warm-up call): kernel launches per call."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return launches_per_step(names, steps)


def _lars_variant(kind: str, seed_model, grads):
    if kind in ("FusedLARS", "FusedLARS carry", "foreach LARS", "reference loop"):
        return make_variant(kind, "cuda", seed_model, grads)
    model = build_model("resnet50", 1000).cuda()
    model.load_state_dict(seed_model.state_dict())
    for p, g in zip(model.parameters(), grads):
        p.grad = g.cuda()
    if kind == "per-tensor loop":
        groups = param_groups(model, WEIGHT_DECAY)
        for g in groups:
            g.setdefault("lars", True)
            g.update(HYPER)
        return model, PerTensorLARS(groups)
    if kind == "SGD fused":
        return model, torch.optim.SGD(model.parameters(), lr=HYPER["lr"],
                                      momentum=HYPER["momentum"], weight_decay=WEIGHT_DECAY,
                                      fused=True)
    raise ValueError(kind)


def _distributed_launches(seed_model, grads) -> float | None:
    """Launches per step of DistributedOptimizer(FusedLARS) on one Horovod rank (the exchange of
    every gradient, which ``step()`` starts when no backward did, then the LARS step); None
    without Horovod."""
    try:
        import horovod.torch as hvd
    except ImportError:
        return None
    from hvd_largebatch import DistributedOptimizer

    hvd.init()
    model = build_model("resnet50", 1000).cuda()
    model.load_state_dict(seed_model.state_dict())
    for p, g in zip(model.parameters(), grads):
        p.grad = g.cuda()
    opt = DistributedOptimizer(FusedLARS(param_groups(model, WEIGHT_DECAY), **HYPER),
                               named_parameters=model.named_parameters())
    return count_launches(opt.step)


def bench_lars(repeats: int = 7, steps: int = 5) -> dict:
    """LARS figures on the current CUDA device (see the module docstring)."""
    torch.manual_seed(0)
    seed_model = build_model("resnet50", 1000)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in seed_model.parameters()]
    numel = sum(p.numel() for p in seed_model.parameters())
    check = {k: _lars_variant(k, seed_model, grads)
             for k in ["reference loop", "FusedLARS", "FusedLARS carry", "per-tensor loop",
                       "foreach LARS"]}
    check_variants(check)  # every LARS variant agrees with ReferenceLARS after one step
    del check
    variants = {k: _lars_variant(k, seed_model, grads) for k in LARS_KINDS}
    copy = _Copy("cuda", numel)
    for _, opt in [*variants.values(), (None, copy)]:
        opt.step()
    samples = {k: [] for k in LARS_KINDS}
    bw_samples = []
    for r in range(repeats):
        for k in LARS_KINDS[r % len(LARS_KINDS):] + LARS_KINDS[:r % len(LARS_KINDS)]:
            samples[k].append(time_steps(variants[k][1], steps, "cuda"))
        bw_samples.append(copy_bandwidth(copy, "cuda"))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    bandwidth = statistics.median(bw_samples)
    floor = {v: copy_floor_ms(numel, BYTES_PER_ELEMENT[v], bandwidth) for v in BYTES_PER_ELEMENT}
    launches = {k: count_launches(variants[k][1].step) for k in LARS_KINDS}
    del variants
    torch.cuda.empty_cache()
    return {"tensors": len(grads), "numel": numel, "bandwidth_gbs": bandwidth / 1e9,
            "floor_ms": floor, "ms": ms, "launches": launches,
            "distributed_launches": _distributed_launches(seed_model, grads)}


def lars_table(res: dict) -> list[str]:
    """The LARS figures as text lines: ms/step, % of copy bandwidth, launches, x FusedLARS."""
    fused = res["ms"]["FusedLARS"]
    lines = [f"ResNet-50 parameter set: {res['tensors']} tensors, {res['numel']:,} fp32 values; "
             f"copy bandwidth {res['bandwidth_gbs']:.0f} GB/s (read + write)",
             f"{'variant':<18}{'ms/step':>9}{'% copy bw':>11}{'launches':>10}{'x FusedLARS':>13}"]
    for k, v in res["ms"].items():
        floor = res["floor_ms"]["carry" if "carry" in k else "fused"]
        lines.append(f"{k:<18}{v:>9.3f}{100 * floor / v:>10.0f}%{res['launches'][k]:>10.1f}"
                     f"{v / fused:>13.2f}")
    lines.append(f"{'floor (28 B/value)':<18}{res['floor_ms']['fused']:>9.3f}")
    lines.append(f"{'floor (24 B/value)':<18}{res['floor_ms']['carry']:>9.3f}")
    dist = res.get("distributed_launches")
    lines.append("DistributedOptimizer(FusedLARS), 1 rank: " + (
        f"{dist:.1f} launches per step" if dist is not None else "not measured (no Horovod)"))
    return lines


# -- training throughput ------------------------------------------------------------------------
class _Loop:
    """One training loop: model, optimizer and ``iteration(x, y)``. The package's kinds build the
    optimizer as the trainer does (lr and momentum held on the device, filled every iteration);
    ``graphed optimizer`` replays its step from a CUDA graph (``train.cuda_graph: optimizer``),
    ``compiled model`` runs the model through ``torch.compile`` (``train.compile``)."""

    def __init__(self, kind: str, seed_model, channels_last: bool, distributed):
        self.kind = kind
        self.model = build_model("resnet50", 1000).cuda()
        self.model.load_state_dict(seed_model.state_dict())
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if kind == "compiled model" else self.model
        self.package = kind != "plain loop"
        self.captured = None
        if self.package:
            self.lr = torch.tensor(HYPER["lr"], device="cuda")
            hyper = {**HYPER, "lr": self.lr}
            opt = FusedLARS(param_groups(self.model, WEIGHT_DECAY), weight_decay=WEIGHT_DECAY,
                            **hyper)
            if kind == "graphed optimizer":
                self.captured = CapturedStep(opt.step)
            if distributed is not None:
                opt = distributed(opt, named_parameters=self.model.named_parameters())
            self.window = torch.zeros(2, dtype=torch.float64, device="cuda")
        else:
            opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                                  weight_decay=WEIGHT_DECAY, fused=True)
        self.opt = opt

    def iteration(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=self.captured is None)
        if self.package:
            self.lr.fill_(HYPER["lr"])  # the trainer's per-iteration schedule update
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.forward(x)
        if self.package:  # as Trainer._micro_step, one micro-batch
            loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
            (loss_sum * (1.0 / len(y))).backward()
            with torch.no_grad():
                correct = (logits.argmax(1) == y).sum()
                self.window += torch.stack([loss_sum.detach().double(), correct.double()])
        else:
            F.cross_entropy(logits, y).backward()
        if self.captured is None:
            self.opt.step()
        elif hasattr(self.opt, "step_after_exchange"):
            self.opt.step_after_exchange(self.captured)
        else:
            self.captured()


def bench_training(batch: int = 128, warmup: int = 10, iters: int = 20, repeats: int = 3,
                   channels_last: bool = True) -> dict:
    """Images per second of the package's training step and of a plain PyTorch loop."""
    try:
        import horovod.torch as hvd
        from hvd_largebatch import DistributedOptimizer

        hvd.init()
    except ImportError:
        DistributedOptimizer = None
    torch.manual_seed(0)
    seed_model = build_model("resnet50", 1000)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device="cuda", generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    loops = [_Loop(k, seed_model, channels_last, DistributedOptimizer) for k in TRAINING_KINDS]
    for loop in loops:
        for _ in range(warmup):
            loop.iteration(x, y)
    torch.cuda.synchronize()
    rates = {loop.kind: [] for loop in loops}
    for r in range(repeats):
        for loop in (loops if r % 2 == 0 else loops[::-1]):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                loop.iteration(x, y)
            torch.cuda.synchronize()
            rates[loop.kind].append(batch * iters / (time.perf_counter() - t0))
    images_per_s = {k: statistics.median(v) for k, v in rates.items()}
    return {"batch": batch, "iters": iters, "repeats": repeats, "channels_last": channels_last,
            "precision": "bf16 autocast", "images_per_s": images_per_s,
            "optimizer": "DistributedOptimizer(FusedLARS), 1 rank" if DistributedOptimizer
            else "FusedLARS (no Horovod)",
            "ratio": images_per_s["package step"] / images_per_s["plain loop"],
            "ratios": {k: v / images_per_s["plain loop"] for k, v in images_per_s.items()}}


def training_table(res: dict) -> list[str]:
    ips = res["images_per_s"]
    return [f"ResNet-50 training, batch {res['batch']}, {res['precision']}, channels_last "
            f"{res['channels_last']}; package step uses {res['optimizer']}",
            *(f"{k:<18}{v:>10.0f} images/s  {res['ratios'][k]:.3f}x the plain loop"
              for k, v in ips.items())]


def machine() -> dict:
    """The GPU, its CUDA capability, torch and the host CPU."""
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "capability": "%d.%d" % (props.major, props.minor),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cpu": cpu_model()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["lars", "train", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=7, help="LARS timing samples")
    parser.add_argument("--steps", type=int, default=5, help="LARS steps per sample")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20, help="timed training iterations")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_gpu: skipped, no CUDA device (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False)")
        return 0
    out = {"machine": machine(), "tables": {}}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in out["machine"].items()))
    if args.section in ("lars", "all"):
        out["lars"] = bench_lars(args.repeats, args.steps)
        out["tables"]["LARS step"] = lars_table(out["lars"])
        print("\n".join(out["tables"]["LARS step"]))
    if args.section in ("train", "all"):
        out["training"] = bench_training(args.batch, iters=args.iters,
                                         channels_last=not args.no_channels_last)
        out["tables"]["Training throughput"] = training_table(out["training"])
        print("\n".join(out["tables"]["Training throughput"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
