"""`psp train DATA... --run-dir DIR [weights] [options]`: train a pSp encoder on a Ray cluster
(Ray Train). The options are `pipelines.train.TrainConfig`'s declarations.

    psp train s3://faces/table --run-dir s3://runs/ffhq-1 --workers 8 --device cuda \\
        --stylegan-weights s3://w/stylegan2-ffhq-config-f.pt --ir-se50-weights s3://w/model_ir_se50.pth \\
        --alexnet-weights s3://w/alexnet.pth --lpips-weights s3://w/alex.pth \\
        --start-from-latent-avg --id-lambda 0.1 --w-norm-lambda 0.005 --batch-size 8
"""
from __future__ import annotations

import argparse
from typing import Any

from pipelines.options import add_arguments, from_args


def register(subparsers: Any) -> None:
    """Add `psp train` to the `psp` CLI's subparsers."""
    from pipelines.train import TrainConfig

    p = subparsers.add_parser(
        "train", help="train a pSp encoder with Ray Train (checkpoints psp invert loads)",
        description="pSp's training (the original's losses, optimizer and options) on N Ray Train workers: "
                    "global batch = --workers x --batch-size. Pretrained files are never downloaded: give each "
                    "the chosen losses need; a missing one is named before any work starts.",
    )
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="psp output table (its aligned faces: psp invert --save-aligned), folder / s3:// or gs:// "
                        "prefix / image / .tar shard / .parquet / .txt manifest (several allowed)")
    add_arguments(p, TrainConfig, scopes=("run",))
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace):
    from pipelines.train import TrainConfig

    data = args.data[0] if len(args.data) == 1 else list(args.data)
    return from_args(TrainConfig, args, data=data)


def main(args: argparse.Namespace) -> int:
    from pipelines.train import run_train

    print(run_train(config_from_args(args)).format())
    return 0
