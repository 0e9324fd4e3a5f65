"""`psp invert INPUT... OUTPUT --checkpoint CKPT` (and its alias `psp frontalize`): every input ->
one row of the output table. The options are `pipelines.config.InvertConfig`'s declarations."""
from __future__ import annotations

import argparse
from typing import Any

from pipelines.config import InvertConfig
from pipelines.options import add_arguments, from_args


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a pipeline run (model, task, alignment, resources, outputs, storage), shared
    by `psp invert`, `psp frontalize` and `psp nightly`: generated from `InvertConfig`."""
    add_arguments(p, InvertConfig, scopes=("run",))


def run_config(args: argparse.Namespace, input: Any, output: str, **extra: Any) -> InvertConfig:
    """Parsed options (see `add_run_options`) plus `extra` InvertConfig fields -> InvertConfig."""
    return from_args(InvertConfig, args, input=input, output=output, **extra)


def config_from_args(args: argparse.Namespace) -> InvertConfig:
    """argparse namespace of `invert`/`frontalize` -> InvertConfig."""
    if len(args.input) < 2:
        raise SystemExit("psp invert: give INPUT and OUTPUT (e.g. psp invert s3://bucket/raw/ out/ --checkpoint CKPT)")
    *inputs, output = args.input
    return run_config(args, inputs[0] if len(inputs) == 1 else inputs, output)


def register(subparsers: Any) -> None:
    """Add `psp invert` and `psp frontalize` to the `psp` CLI's subparsers."""
    for name, text in (("invert", "images in object storage -> W+ and reconstructions in the output table"),
                       ("frontalize", "alias of invert (pass the frontalization checkpoint)")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("input", nargs="+", metavar="INPUT",
                       help="folder / s3:// or gs:// prefix / image / .tar shard / .parquet / .txt manifest "
                            "(several allowed; the last positional argument is OUTPUT)")
        add_arguments(p, InvertConfig, scopes=("run", "invert"))
        p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipelines.run import run_invert

    print(run_invert(config_from_args(args)).format())
    return 0
