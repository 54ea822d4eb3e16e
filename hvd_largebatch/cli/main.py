"""The ``hvd-largebatch`` command line: one sub-command per module.

Each entry of ``COMMANDS`` names a module that defines ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so that
``hvd-largebatch plan`` does not pay for importing Horovod or DALI. ``add_arguments``
is called for every command when the parser is built, so command modules keep heavy
imports (torch, horovod, nvidia.dali) inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib

# command name -> (module, one-line help)
COMMANDS = {
    "info": ("hvd_largebatch.cli.info", "print what was built and what Horovod supports"),
    "plan": ("hvd_largebatch.cli.plan", "print a schedule's phases, batches, lr, noise scale and updates"),
    "prepare-data": ("hvd_largebatch.cli.prepare_data", "write the scikit-learn digits set as an image folder"),
    "check-data": ("hvd_largebatch.cli.check_data", "name every unusable image of a data set (cached for training)"),
    "train": ("hvd_largebatch.cli.train", "train a model from a YAML config on the ranks of a Horovod job"),
    "demo": ("hvd_largebatch.cli.demo",
             "make run: Smith et al.'s schedules and the adaptive batch on digits, 2 ranks"),
    "launch": ("hvd_largebatch.cli.launch", "check, print or submit a job template (mpirun, horovodrun, elastic, slurm, pbs, mpijob)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvd-largebatch",
        description="Large-batch training over Horovod: FusedLARS, batch-size schedules, DALI.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)

