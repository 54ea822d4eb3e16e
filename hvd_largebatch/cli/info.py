"""``hvd-largebatch info``: the native build and the Horovod build, as JSON."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-horovod", action="store_true",
                        help="skip the `horovodrun --check-build` probe")


def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.distributed.horovod_check import HorovodBuildError, check_horovod_build
    from hvd_largebatch.lars.native import build_info

    info = {"build": build_info()}
    status = 0
    if not args.no_horovod:
        try:
            info["horovod"] = check_horovod_build()
        except HorovodBuildError as exc:
            info["horovod_error"] = str(exc)
            status = 1
    print(json.dumps(info, indent=2))
    return status
