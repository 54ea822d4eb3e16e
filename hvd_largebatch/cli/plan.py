"""``hvd-largebatch plan``: what a schedule will run, phase by phase, on a given world size.

Takes a preset name or a YAML config file (its ``schedule:`` section; other top-level sections
belong to other commands and are ignored) and prints, per phase: epochs, global and per-rank
batch, gradient accumulation, lr range, momentum, Smith et al.'s noise scale and updates, then
the totals. Two update counts are shown: the steps actually executed (following
``Schedule.epoch_batches``: with drop_last, floor(N / B) per epoch) and the papers' count
(epochs x N / B summed over phases), which is what papers report (Goyal 1 h: ~14,075).

An adaptive batch (``schedule.batch_increase.mode: adaptive``) is decided at run time: the plan
says so, shows the phases as if the batch never grew, and gives the bounds: the first batch,
the cap (rounded for the world size and ``--max-per-rank-batch``, else the config's
``train.max_per_rank_batch``), the most updates (it never grows) and the fewest (it grows at
every decision until the cap, :func:`hvd_largebatch.schedules.adaptive.update_bounds`), and the
predicted time for both.

With ``--gpu-throughput`` (and ``--network`` for more than one rank) it adds the predicted
seconds per iteration and time to train, per phase and in total
(:mod:`hvd_largebatch.cli.prediction`; the model and its assumptions:
:mod:`hvd_largebatch.schedules.timing`). The gradient's size comes from the config's ``model``
section (or ``--parameters``), the optimizer and the sharded mode from its ``optimizer``
section.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from hvd_largebatch.cli import prediction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="CONFIG_OR_PRESET",
                        help="a preset name (goyal_1h, smith_30min, lars_32k, smith_wrn_*) or a "
                             "YAML config file with a `schedule:` section")
    parser.add_argument("--world-size", type=int, default=None, metavar="W",
                        help="ranks (default: the recipe's `workers`, else 1)")
    parser.add_argument("--dataset-size", type=int, default=None, metavar="N",
                        help="training samples per epoch (default: the recipe's)")
    accumulation = parser.add_mutually_exclusive_group()
    accumulation.add_argument("--micro-batches", type=int, default=None, metavar="K",
                              help="split every per-rank batch into K micro-batches")
    accumulation.add_argument("--max-per-rank-batch", type=int, default=None, metavar="M",
                              help="largest batch one rank can hold: accumulate over the fewest "
                                   "equal micro-batches of at most M samples")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    prediction.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.errors import ConfigError

    try:
        schedule, document = _load(args.target)
        if args.dataset_size is not None:
            schedule = schedule.with_dataset_size(args.dataset_size)
        max_per_rank = args.max_per_rank_batch
        if max_per_rank is None and args.micro_batches is None and document is not None:
            max_per_rank = (document.get("train") or {}).get("max_per_rank_batch")
        plan = build_plan(schedule, args.world_size, args.micro_batches, max_per_rank)
        if args.gpus_per_node is not None and args.intra_node is None:
            raise ConfigError("--gpus-per-node", "means the hierarchical exchange: give the "
                              "link between a node's GPUs with --intra-node GBIT_S[,LATENCY_US]")
        system = prediction.system_from_args(args, plan["world_size"], args.gpus_per_node)
        if system is not None:
            plan["prediction"] = _predict(plan, system, document, args.parameters)
    except (ConfigError, OSError) as exc:
        print(f"hvd-largebatch plan: error: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(plan, indent=2))
    else:
        print(format_table(plan))
        if "prediction" in plan:
            print(prediction.format_prediction(plan["prediction"]))
    return 0


def _predict(plan: dict, system, document: dict | None, parameters: int | None) -> dict:
    """The prediction for ``plan``; the gradient's size, the optimizer and the sharded mode
    from the config ``document`` (None for a preset, which names no model)."""
    from hvd_largebatch.errors import ConfigError

    document = document or {}
    optimizer = document.get("optimizer") or {}
    name = optimizer.get("name", "sgd")
    if name not in ("sgd", "lars"):
        raise ConfigError("optimizer.name", f"must be sgd or lars, got {name!r}")
    if parameters is None:
        model = document.get("model")
        if not isinstance(model, dict) or "name" not in model:
            raise ConfigError("--parameters", f"{plan['name'] or 'the schedule'} names no "
                              f"model (a preset, or a config without model.name): give the "
                              f"gradient's element count")
        classes = model.get("num_classes") or (document.get("data") or {}).get("num_classes")
        parameters = prediction.model_parameters(model["name"], model.get("options"), classes)
    return prediction.predict(plan, system, parameters, name,
                              bool(optimizer.get("shard_optimizer_state", False)))


def _load(target: str):
    """(schedule, config document) for a YAML file's ``schedule:`` section, (schedule, None)
    for a preset."""
    import yaml

    from hvd_largebatch.errors import ConfigError
    from hvd_largebatch.schedules import PRESETS, from_config, preset

    if target in PRESETS:
        return preset(target), None
    if not os.path.isfile(target):
        raise ConfigError("schedule.preset", f"{target!r} is neither a preset "
                          f"({', '.join(sorted(PRESETS))}) nor a config file")
    with open(target, encoding="utf-8") as handle:
        try:
            document = yaml.safe_load(handle)
        except yaml.YAMLError as exc:
            raise ConfigError("schedule", f"{target}: not valid YAML ({exc})") from None
    if not isinstance(document, dict) or document.get("schedule") is None:
        raise ConfigError("schedule", f"{target} has no `schedule:` section")
    return from_config(document["schedule"]), document


def build_plan(schedule, world_size: int | None = None, micro_batches: int | None = None,
               max_per_rank_batch: int | None = None) -> dict:
    """The plan as a JSON-ready dict: totals and one entry per phase (batches are global
    unless named per-rank; epochs are floats; noise scale at the phase's start and end lr).

    Raises ``ConfigError`` when a global batch does not split over the ranks (and micro-batches).
    An adaptive batch adds ``adaptive``: its bounds, and the phases of the fewest updates.
    """
    world = world_size if world_size is not None else (schedule.workers or 1)
    schedule.validate(world, micro_batches or 1)
    plan = {
        "name": schedule.name, "source": schedule.source, "dataset_size": schedule.dataset_size,
        "drop_last": schedule.drop_last, "epochs": schedule.epochs, "nesterov": schedule.nesterov,
        "workers": schedule.workers, "world_size": world,
        "total_updates": schedule.total_updates, "nominal_updates": schedule.nominal_updates,
        "phases": _phases(schedule, world, micro_batches, max_per_rank_batch),
    }
    if schedule.adaptive is not None:
        plan["adaptive"] = _adaptive(schedule, world, micro_batches, max_per_rank_batch)
    return plan


def _adaptive(schedule, world: int, micro_batches: int | None,
              max_per_rank_batch: int | None) -> dict:
    """The bounds of an adaptive batch (see the module docstring); the rounding assumes
    ``max_per_rank_batch`` (or ``micro_batches`` micro-batches of the cap, or none)."""
    from hvd_largebatch.schedules.adaptive import grown_batch, update_bounds

    rule = schedule.adaptive
    if max_per_rank_batch is None:
        max_per_rank_batch = -(-rule.max_batch // (world * (micro_batches or 1)))
    fewest, most, fastest = update_bounds(schedule, world, max_per_rank_batch)
    cap = first = schedule.phases[0].global_batch
    while (grown := grown_batch(cap, rule, world, max_per_rank_batch)) > cap:
        cap = grown
    return {"first_batch": first, "max_batch": rule.max_batch, "reachable_batch": cap,
            "factor": rule.factor, "threshold": rule.threshold, "interval": rule.interval,
            "start_epoch": rule.start_epoch, "smoothing": rule.smoothing,
            "fewest_updates": fewest, "most_updates": most,
            "fewest_phases": _phases(fastest, world, micro_batches, max_per_rank_batch)}


def _phases(schedule, world: int, micro_batches: int | None,
            max_per_rank_batch: int | None) -> list[dict]:
    """One entry per phase of ``schedule`` (see ``build_plan``)."""
    from hvd_largebatch.schedules import accumulation_steps, noise_scale

    n = schedule.dataset_size
    phases = []
    for k, p in enumerate(schedule.phases):
        per_rank = p.global_batch // world
        if max_per_rank_batch is not None:
            micro = accumulation_steps(per_rank, max_per_rank_batch)
        else:
            micro = micro_batches or 1
        phases.append({
            "start_epoch": p.start_epoch, "end_epoch": p.end_epoch,
            "global_batch": p.global_batch, "per_rank_batch": per_rank,
            "micro_batches": micro, "micro_batch": per_rank // micro,
            "lr_start": p.lr_start, "lr_end": p.lr_end, "lr_shape": p.shape,
            "momentum": p.momentum,
            "noise_scale": noise_scale(p.lr_start, p.global_batch, p.momentum, n),
            "noise_scale_end": noise_scale(p.lr_end, p.global_batch, p.momentum, n),
            "updates": schedule.phase_updates[k],
            "nominal_updates": schedule.phase_nominal_updates[k],
        })
    return phases


def format_table(plan: dict) -> str:
    """The plan as a human-readable table."""
    assumed = f" (recipe assumes {plan['workers']})" if plan["workers"] else ""
    lines = [
        f"{plan['name'] or 'schedule'}" + (f": {plan['source']}" if plan["source"] else ""),
        f"N = {plan['dataset_size']:,} samples, {plan['epochs']:g} epochs, drop_last="
        f"{plan['drop_last']}, nesterov={plan['nesterov']}, world size {plan['world_size']}"
        f"{assumed}",
        "",
    ]
    header = ("phase", "epochs", "global B", "per-rank", "accum", "lr", "momentum",
              "noise scale", "updates", "epochs*N/B")
    rows = []
    for k, p in enumerate(plan["phases"]):
        lr = f"{p['lr_start']:.4g}"
        noise = f"{p['noise_scale']:.4g}"
        if p["lr_shape"] != "constant":
            lr += f" -> {p['lr_end']:.4g} ({p['lr_shape']})"
            noise += f" -> {p['noise_scale_end']:.4g}"
        rows.append((str(k), f"{p['start_epoch']:g}-{p['end_epoch']:g}", f"{p['global_batch']:,}",
                     f"{p['per_rank_batch']:,}", f"{p['micro_batches']} x {p['micro_batch']}",
                     lr, f"{p['momentum']:g}", noise, f"{p['updates']:,}",
                     f"{p['nominal_updates']:,.1f}"))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    adaptive = plan.get("adaptive")
    if adaptive is not None:
        a = adaptive
        cap = (f"cap {a['max_batch']:,}" if a["reachable_batch"] == a["max_batch"] else
               f"cap {a['max_batch']:,}, {a['reachable_batch']:,} after rounding for "
               f"{plan['world_size']} ranks")
        lines += [
            "",
            "global batch: decided at run time (schedule.batch_increase, mode adaptive); the "
            "phases above are the run if it never grows",
            f"  first batch {a['first_batch']:,}, {cap}; x{a['factor']:g} when the measured "
            f"B_simple >= {a['threshold']:g} x the batch, decided every {a['interval']:,} "
            f"updates from epoch {a['start_epoch']:g}",
            f"  updates: between {a['fewest_updates']:,} (grows at every decision) and "
            f"{a['most_updates']:,} (never grows)",
        ]
    lines += [
        "",
        f"updates executed: {plan['total_updates']:,} (what the trainer runs"
        + (": each epoch's last partial batch is dropped)" if plan["drop_last"] else ")"),
        f"updates in the papers' count (epochs x N / B): {round(plan['nominal_updates']):,} "
        f"({plan['nominal_updates']:,.1f})",
        "accum: micro-batches per rank x micro-batch size (gradient accumulation steps)",
    ]
    return "\n".join(lines)
