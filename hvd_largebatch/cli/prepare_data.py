"""``hvd-largebatch prepare-data``: write scikit-learn's digits as an ImageNet-style folder."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/digits",
                        help="folder to write (train/, val/, train.txt, val.txt); default %(default)s")
    parser.add_argument("--size", type=int, default=32,
                        help="side of the written images in pixels (bilinear upscaling of 8x8)")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of every class put in val/ (deterministic, stratified)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a digits set written with other parameters")


def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.data.digits import write_digits_folder

    summary = write_digits_folder(args.out, size=args.size, image_format=args.format,
                                  val_fraction=args.val_fraction, seed=args.seed,
                                  overwrite=args.overwrite)
    print(f"digits in {args.out}: {summary['train']} train, {summary['val']} val images, "
          f"{args.size}x{args.size} {args.format}")
    return 0
