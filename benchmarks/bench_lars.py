"""Benchmark: one LARS step over the ResNet-50 parameter set (161 tensors, 25,557,032 fp32 values).

Variants, timed interleaved (every repeat runs each variant in turn, the order rotating), median
over repeats, milliseconds per optimizer step:

* ``FusedLARS``: the native multi-tensor step (norm pass + update pass).
* ``FusedLARS carry``: the same with ``carry_weight_norms=True`` (the norm pass reads only grads).
* ``reference loop``: ``ReferenceLARS``, one tensor at a time in plain PyTorch.
* ``foreach LARS``: LARS written with ``torch._foreach_*`` ops (norms, then d = g + wd w, scale by
  the trust ratio, momentum, update), no host synchronization: the best pure-PyTorch form.
* ``SGD foreach``: ``torch.optim.SGD(foreach=True)`` with momentum and weight decay (not LARS; for
  scale).
* ``floor``: the bytes a two-pass fused step must move (norm pass: read w, g; update pass: read w,
  g, u and write w, u: 28 bytes per fp32 element; 24 with carried weight norms) divided by the
  measured copy bandwidth (``dst.copy_(src)``, counting read + write). On a CPU the copy also reads
  each destination line before writing it (write-allocate) while the update writes lines it has
  just read, so the fused step can run below this floor.

Targets: CPU: FusedLARS within 1.25x of the floor and >= 1.3x faster than the best pure-PyTorch
LARS; GPU: >= 70% of the copy bandwidth and >= 10x faster than the per-tensor loop. Every variant
is checked against the reference after one step before anything is timed.

Usage: ``python benchmarks/bench_lars.py [--device cpu|cuda|all] [--repeats 7] [--steps 3]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from hvd_largebatch import FusedLARS, build_info, param_groups
from hvd_largebatch.lars.reference import ReferenceLARS
from hvd_largebatch.models import build_model

HYPER = dict(lr=3.2, momentum=0.9, trust_coefficient=0.001)
WEIGHT_DECAY = 5e-5
BYTES_PER_ELEMENT = {"fused": 28, "carry": 24}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo, None when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = {k.strip(): v.strip() for k, _, v in
                  (line.partition(":") for line in block.splitlines())}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or None


class ForeachLARS:
    """LARS with torch._foreach_* ops, groups as FusedLARS's (BN / bias group: lars False, wd 0)."""

    def __init__(self, groups):
        self.groups = [dict(g, params=list(g["params"])) for g in groups]
        self.buffers = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]

    @torch.no_grad()
    def step(self):
        for group, bufs in zip(self.groups, self.buffers):
            params = group["params"]
            grads = [p.grad for p in params]
            wd, m, lr = group["weight_decay"], group["momentum"], group["lr"]
            d = torch._foreach_add(grads, params, alpha=wd)  # new tensors: g + wd w
            if group["lars"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
                ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                torch._foreach_mul_(d, list(ratio.unbind()))
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-lr)


def make_variant(kind: str, device: str, seed_model, grads):
    model = build_model("resnet50", 1000).to(device)
    model.load_state_dict(seed_model.state_dict())
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(device)
    groups = param_groups(model, WEIGHT_DECAY)
    if kind == "FusedLARS":
        opt = FusedLARS(groups, **HYPER)
    elif kind == "FusedLARS carry":
        opt = FusedLARS(groups, carry_weight_norms=True, **HYPER)
    elif kind == "reference loop":
        opt = ReferenceLARS(groups, **HYPER)
    elif kind == "foreach LARS":
        for g in groups:
            g.setdefault("lars", True)
            g.update(HYPER)
        opt = ForeachLARS(groups)
    elif kind == "SGD foreach":
        opt = torch.optim.SGD(model.parameters(), lr=HYPER["lr"], momentum=HYPER["momentum"],
                              weight_decay=WEIGHT_DECAY, foreach=True)
    else:
        raise ValueError(kind)
    return model, opt


def check_variants(variants, reference: str = "reference loop",
                   not_lars: tuple[str, ...] = ("SGD foreach",)) -> None:
    """One step of every LARS variant from the same start must agree with ``reference``."""
    ref_model = variants[reference][0]
    for kind, (model, opt) in variants.items():
        opt.step()
    for kind, (model, _) in variants.items():
        if kind in not_lars or kind == reference:
            continue
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            scale = float(q.detach().abs().max()) + 1e-12
            err = float((p.detach() - q.detach()).abs().max()) / scale
            if err > 1e-5:
                sys.exit(f"{kind} disagrees with the reference on {name}: {err:.2e}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(opt, steps: int, device: str) -> float:
    """Milliseconds per step of `steps` back-to-back steps."""
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            opt.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) * 1e3 / steps


class _Copy:
    """dst.copy_(src) with a step() method, timed like an optimizer."""

    def __init__(self, device: str, numel: int):
        self.src = torch.randn(numel, device=device)
        self.dst = torch.empty_like(self.src)

    def step(self):
        self.dst.copy_(self.src)


def copy_floor_ms(numel: int, bytes_per_element: int, bandwidth: float) -> float:
    """Milliseconds a step that moves ``bytes_per_element`` bytes for each of ``numel`` values
    needs at ``bandwidth`` bytes per second (read + write counted)."""
    return bytes_per_element * numel / bandwidth * 1e3


def copy_bandwidth(copy: _Copy, device: str) -> float:
    """Bytes per second of dst.copy_(src), counting the read and the write."""
    return 2 * 4 * copy.src.numel() / (time_steps(copy, 3, device) / 1e3)


def bench_device(device: str, repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    seed_model = build_model("resnet50", 1000)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in seed_model.parameters()]
    numel = sum(p.numel() for p in seed_model.parameters())
    kinds = ["FusedLARS", "FusedLARS carry", "reference loop", "foreach LARS", "SGD foreach"]
    variants = {k: make_variant(k, device, seed_model, grads) for k in kinds}
    check_variants(variants)
    copy = _Copy(device, numel)
    for _, opt in [*variants.values(), (None, copy)]:  # warm up caches, tables, allocators
        opt.step()
    samples = {k: [] for k in kinds}
    bw_samples = []
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            samples[k].append(time_steps(variants[k][1], steps, device))
        bw_samples.append(copy_bandwidth(copy, device))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    bw = statistics.median(bw_samples)
    floor = {v: copy_floor_ms(numel, BYTES_PER_ELEMENT[v], bw) for v in BYTES_PER_ELEMENT}
    return {"ms": ms, "bandwidth": bw, "floor": floor, "numel": numel,
            "tensors": len(grads)}


def report(device: str, res: dict) -> list[str]:
    ms, floor, bw = res["ms"], res["floor"], res["bandwidth"]
    fused = ms["FusedLARS"]
    best_torch = min(ms["reference loop"], ms["foreach LARS"])
    print(f"\n[{device}] ResNet-50 parameter set: {res['tensors']} tensors, {res['numel']:,} fp32 "
          f"values; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'variant':<18}{'ms/step':>10}{'x floor':>10}{'x FusedLARS':>13}{'GB/s eff.':>11}")
    for k, v in ms.items():
        nbytes = BYTES_PER_ELEMENT["carry" if "carry" in k else "fused"] * res["numel"]
        print(f"{k:<18}{v:>10.2f}{v / floor['fused']:>10.2f}{v / fused:>13.2f}"
              f"{nbytes / v / 1e6:>11.1f}")
    print(f"{'floor (28 B/elem)':<18}{floor['fused']:>10.2f}")
    print(f"{'floor (24 B/elem)':<18}{floor['carry']:>10.2f}")
    lines = []
    if device == "cpu":
        lines.append(f"CPU: FusedLARS / floor = {fused / floor['fused']:.2f} (target <= 1.25): "
                     f"{'met' if fused <= 1.25 * floor['fused'] else 'MISSED'}")
        lines.append(f"CPU: best pure-PyTorch LARS / FusedLARS = {best_torch / fused:.2f} "
                     f"(target >= 1.3): {'met' if best_torch >= 1.3 * fused else 'MISSED'}")
    else:
        frac = floor["fused"] / fused
        lines.append(f"GPU: FusedLARS at {100 * frac:.0f}% of copy bandwidth (target >= 70%): "
                     f"{'met' if frac >= 0.7 else 'MISSED'}")
        speedup = ms["reference loop"] / fused
        lines.append(f"GPU: per-tensor loop / FusedLARS = {speedup:.1f} (target >= 10): "
                     f"{'met' if speedup >= 10 else 'MISSED'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: the CPU, and the GPU when there is one")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per sample")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every variant (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    info = build_info()
    print(f"machine: {cpu_model()}; {physical_cores()} physical cores, {os.cpu_count()} logical; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); native: "
          f"{info['cpu']['simd']}, OpenMP {info['cpu']['openmp']}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    summary = []
    for device in devices:
        summary += report(device, bench_device(device, args.repeats, args.steps))
    print()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
