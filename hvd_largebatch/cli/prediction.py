"""The time-to-train options of ``plan`` and ``launch``, and the prediction they print.

The model and its assumptions are in :mod:`hvd_largebatch.schedules.timing`; this module reads
the options into its inputs, counts the gradient's elements and formats the result. Options
(``--gpu-throughput`` turns the prediction on):

- ``--gpu-throughput IMG_PER_S``: images/s one GPU trains (forward + backward) at the job's
  precision; measure it on one GPU, or take a published figure.
- ``--network GBIT_S[,LATENCY_US]``: bandwidth (Gbit/s, one direction) and per-step latency
  (default 10 us: NCCL's tuning model, src/graph/tuning.cc, puts one network ring step of its
  Simple protocol, the one for large messages, at 6.6-14 us depending on the version) of each
  rank, or of each node with ``--intra-node``.
- ``--intra-node GBIT_S[,LATENCY_US]``: hierarchical exchange over the GPUs of a node
  (``--gpus-per-node``, which means nothing without it) on this link (default latency 3.4 us:
  the same model's NVLink ring step, Simple protocol).
- ``--overlap F``: fraction 0..1 of the replicated exchange hidden under backward (default 0:
  nothing hidden, an upper bound; NVIDIA's MLPerf ResNet-50 configs run "no NCCL and BWD
  overlap", training_results_v3.0 .../resnet/implementations/mxnet/config_DGXH100*.sh).
- ``--memory-bandwidth GB_S``: GPU memory bandwidth for the optimizer step (default 2,000 GB/s,
  about an A100 80 GB's 2,039 GB/s; H100 SXM 3,350, P100 732).
- ``--input-throughput IMG_PER_S``: images/s per GPU the input pipeline delivers (default:
  not a bound).
- ``--gradient-dtype fp32|bf16|fp16``: bytes per gradient element exchanged (default fp32: the
  trainer keeps fp32 parameters and gradients, also under bf16 autocast). Weights (the sharded
  mode's allgather) are fp32.
- ``--parameters N``: elements of the gradient; default: the config's ``model`` built on
  PyTorch's meta device (no memory, no weights), with ``model.num_classes``, else
  ``data.num_classes``, else 1000 classes.

The optimizer (``sgd`` or ``lars``) and the sharded mode come from the config's ``optimizer``
section.
"""
from __future__ import annotations

import argparse

from dataclasses import asdict

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.schedules.timing import (DTYPE_BYTES, OPTIMIZER_BYTES_PER_PARAMETER, Link,
                                             System, Topology, iteration_time)

DEFAULT_NETWORK_LATENCY_US = 10.0
DEFAULT_INTRA_NODE_LATENCY_US = 3.4
DEFAULT_MEMORY_GB_S = 2000.0
DEFAULT_CLASSES = 1000


def add_arguments(parser: argparse.ArgumentParser, gpus_per_node: bool = True) -> None:
    """The options of the module docstring; ``gpus_per_node=False`` where the command already
    has ``--gpus-per-node`` (launch)."""
    group = parser.add_argument_group("predicted time to train (hvd_largebatch.schedules.timing)")
    group.add_argument("--gpu-throughput", type=float, metavar="IMG_PER_S",
                       help="images/s one GPU trains; turns the prediction on")
    group.add_argument("--network", metavar="GBIT_S[,LATENCY_US]",
                       help=f"per-rank (per-node with --intra-node) bandwidth in Gbit/s and ring "
                            f"step latency in us (default {DEFAULT_NETWORK_LATENCY_US:g})")
    group.add_argument("--intra-node", metavar="GBIT_S[,LATENCY_US]",
                       help=f"hierarchical exchange: the link between the GPUs of a node "
                            f"(default latency {DEFAULT_INTRA_NODE_LATENCY_US:g} us)")
    if gpus_per_node:
        group.add_argument("--gpus-per-node", type=int, metavar="G",
                           help="GPUs per node, with --intra-node")
    group.add_argument("--overlap", type=float, default=0.0, metavar="F",
                       help="fraction of the exchange hidden under backward (default 0)")
    group.add_argument("--memory-bandwidth", type=float, default=DEFAULT_MEMORY_GB_S,
                       metavar="GB_S", help=f"GPU memory bandwidth for the optimizer step "
                                            f"(default {DEFAULT_MEMORY_GB_S:g})")
    group.add_argument("--input-throughput", type=float, metavar="IMG_PER_S",
                       help="images/s per GPU the input pipeline delivers (default: no bound)")
    group.add_argument("--gradient-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                       help="dtype of the exchanged gradients (default fp32)")
    group.add_argument("--parameters", type=int, metavar="N",
                       help="gradient elements (default: counted from the config's model)")


def parse_link(option: str, text: str, default_latency_us: float):
    """A ``Link`` from ``GBIT_S[,LATENCY_US]``; ConfigError naming ``option`` otherwise."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not values[0] > 0 or (len(values) == 2 and not values[1] >= 0):
        raise ConfigError(option, f"expected GBIT_S[,LATENCY_US] with a bandwidth > 0 and a "
                          f"latency >= 0, got {text!r}")
    return Link(values[0], values[1] if len(values) == 2 else default_latency_us)


def system_from_args(args: argparse.Namespace, world_size: int, gpus_per_node: int | None):
    """The model's ``System`` from the options, or None without ``--gpu-throughput``.
    ConfigError naming the first bad option."""
    if args.gpu_throughput is None:
        for option in ("network", "intra_node", "input_throughput", "parameters"):
            if getattr(args, option) is not None:
                raise ConfigError("--gpu-throughput", f"--{option.replace('_', '-')} is an input "
                                  f"of the predicted time to train, which needs --gpu-throughput")
        return None
    for option, value in (("--gpu-throughput", args.gpu_throughput),
                          ("--memory-bandwidth", args.memory_bandwidth),
                          ("--input-throughput", args.input_throughput),
                          ("--parameters", args.parameters)):
        if value is not None and not value > 0:
            raise ConfigError(option, f"must be > 0, got {value:g}")
    if not 0.0 <= args.overlap <= 1.0:
        raise ConfigError("--overlap", f"must be a fraction in [0, 1], got {args.overlap:g}")
    if args.network is None:
        if world_size > 1:
            raise ConfigError("--network", f"needed for {world_size} ranks (GBIT_S[,LATENCY_US])")
        network = Link(1.0, 0.0)  # one rank exchanges nothing
    else:
        network = parse_link("--network", args.network, DEFAULT_NETWORK_LATENCY_US)
    if args.intra_node is None:
        topology = Topology(world_size, network)
    else:
        intra = parse_link("--intra-node", args.intra_node, DEFAULT_INTRA_NODE_LATENCY_US)
        if gpus_per_node is None or gpus_per_node < 1 or world_size % gpus_per_node:
            raise ConfigError("--gpus-per-node", f"--intra-node needs GPUs per node dividing "
                              f"the world size {world_size}, got {gpus_per_node}")
        topology = Topology(world_size, network, gpus_per_node, intra)
    return System(args.gpu_throughput, topology, args.overlap, args.memory_bandwidth,
                  args.input_throughput, DTYPE_BYTES[args.gradient_dtype], DTYPE_BYTES["fp32"])


def model_parameters(name: str, options: dict | None, num_classes: int | None) -> int:
    """Trainable elements of model ``name`` (``hvd_largebatch.models``), built on the meta
    device: shapes only, no memory and no initialization cost."""
    import torch

    from hvd_largebatch.models import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(name, num_classes or DEFAULT_CLASSES, options))


def predict(plan: dict, system, parameters: int, optimizer: str, sharded: bool) -> dict:
    """The prediction as a JSON-ready dict: inputs, per phase the seconds per iteration and
    its parts (``schedules.timing.IterationTime``) and the phase's seconds (executed updates x
    seconds per iteration), and the total seconds; for an adaptive batch also ``fewest``: the
    same for the run that grows at every decision."""
    phases = []
    if "adaptive" in plan:
        fewest = predict({"phases": plan["adaptive"]["fewest_phases"]}, system, parameters,
                         optimizer, sharded)
    for p in plan["phases"]:
        it = iteration_time(p["per_rank_batch"], p["micro_batches"], parameters, system,
                            optimizer, sharded)
        phases.append({"per_rank_batch": p["per_rank_batch"], "micro_batches": p["micro_batches"],
                       **asdict(it), "updates": p["updates"],
                       "seconds": p["updates"] * it.iteration_s})
    return {
        "inputs": {**asdict(system), "parameters": parameters, "optimizer": optimizer,
                   "sharded": sharded},
        "gradient_bytes": parameters * system.gradient_bytes,
        "phases": phases,
        "total_seconds": sum(p["seconds"] for p in phases),
        **({"fewest": {"updates": plan["adaptive"]["fewest_updates"],
                       "total_seconds": fewest["total_seconds"]}} if "adaptive" in plan else {}),
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def format_prediction(prediction: dict) -> str:
    """The prediction as text: the inputs, one row per phase, the total."""
    i = prediction["inputs"]
    topo = i["topology"]
    net = topo["network"]
    if topo["intra_node"] is None:
        links = (f"flat ring over {topo['ranks']} ranks, {net['gbit_per_s']:g} Gbit/s and "
                 f"{net['latency_us']:g} us per rank")
    else:
        intra = topo["intra_node"]
        links = (f"hierarchical, {topo['ranks'] // topo['gpus_per_node']} nodes x "
                 f"{topo['gpus_per_node']} GPUs: {intra['gbit_per_s']:g} Gbit/s and "
                 f"{intra['latency_us']:g} us in a node, {net['gbit_per_s']:g} Gbit/s and "
                 f"{net['latency_us']:g} us per node")
    mode = ("sharded: reduce-scatter + norm table + allgather, none of it under backward"
            if i["sharded"] else f"replicated allreduce, {i['overlap']:g} of it under backward")
    loading = (f"{i['input_throughput']:g} img/s per GPU" if i["input_throughput"]
               else "not a bound (no --input-throughput)")
    lines = [
        "",
        "predicted time to train (model and assumptions: hvd_largebatch/schedules/timing.py)",
        f"  compute: per-GPU batch / {i['gpu_throughput']:g} img/s per GPU; accumulation over "
        f"(K x) micro-batches runs at the same img/s, one exchange per update",
        f"  exchange: {i['parameters']:,} parameters x {i['gradient_bytes']} bytes = "
        f"{prediction['gradient_bytes'] / 1e6:.1f} MB; {mode}; {links}",
        f"  optimizer step: {i['optimizer']}, {OPTIMIZER_BYTES_PER_PARAMETER[i['optimizer']]} "
        f"bytes per parameter at {i['memory_gb_s']:g} GB/s",
        f"  input pipeline: {loading}",
    ]
    header = ("phase", "per GPU", "s/iter", "compute ms", "exchange ms", "exposed ms", "step ms",
              "bound", "updates", "time")
    rows = [(str(k), f"{p['per_rank_batch']:,} ({p['micro_batches']}x)", f"{p['iteration_s']:.4g}",
             _ms(p["compute_s"]), _ms(p["exchange_s"]),
             _ms(p["exposed_exchange_s"]), _ms(p["optimizer_s"]), p["bound"],
             f"{p['updates']:,}", _duration(p["seconds"]))
            for k, p in enumerate(prediction["phases"])]
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.append(f"predicted time to train: {_duration(prediction['total_seconds'])} "
                 f"({prediction['total_seconds']:,.0f} s; evaluation and start-up not counted)")
    if "fewest" in prediction:
        f = prediction["fewest"]
        lines.append(f"  adaptive batch: the table is the run that never grows; one that grows "
                     f"at every decision ({f['updates']:,} updates) takes "
                     f"{_duration(f['total_seconds'])} ({f['total_seconds']:,.0f} s)")
    return "\n".join(lines)
