"""``hvd-largebatch demo [--out DIR] [--np N] [--seeds S ...] [--schedules NAME ...]``: what
``make run`` runs; the runs, table and plot are ``hvd_largebatch.training.demo``'s."""
from __future__ import annotations

import argparse

from hvd_largebatch.training.demo import CONFIG, SCHEDULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    parser.add_argument("--data", default="data/digits",
                        help="where the digits image folder is written (default %(default)s)")
    parser.add_argument("--np", type=int, default=2, help="Horovod ranks (default %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds to run every schedule with (default: 0)")
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES),
                        metavar="NAME", help=f"subset of: {', '.join(SCHEDULES)}")
    parser.add_argument("--config", default=CONFIG, help="the decaying-lr config (default: ours)")



def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.training.demo import run_demo

    return run_demo(out=args.out, data=args.data, np=args.np, seeds=args.seeds,
                    schedules=args.schedules, config=args.config)
