"""The `psp` command line: invert (and its alias frontalize), demo, inspect.

    psp invert INPUT OUTPUT --checkpoint CKPT [--task T] [--align dlib|none] [--device auto|cpu|cuda]
               [--batch-size N] [--gpus N] [--align-actors N] [--images png|jpeg|none]
               [--image-size 256|full] [--metrics] [--mix N --latent-mask 8-17 --mix-alpha A --seed S]
               [--resize-factor F] [--precision fp32|tf32|bf16|fp16] [--output-actors N]
               [--limit N] [--storage-options JSON]
    psp demo [--output DIR]
    psp inspect OUTPUT [--as-of VERSION|TIMESTAMP] [--storage-options JSON]
    psp vacuum OUTPUT [--retention-hours H] [--no-compact] [--dry-run] [--storage-options JSON]

Misconfiguration exits with status 2 and a message that says what to do, before Ray does any work.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobs import edit, nightly, report, submit, vacuum
from pipelines.config import InvertConfig
from pipelines.options import add_arguments, from_args, parse_json_object


def _add_invert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="+", metavar="INPUT",
                   help="folder / s3:// or gs:// prefix / image / .tar shard / .parquet / .txt manifest "
                        "(several allowed; the last positional argument is OUTPUT)")
    add_arguments(p, InvertConfig, scopes=("run", "invert"))


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a pipeline run (model, task, alignment, resources, outputs, storage), shared
    by `psp invert`, `psp frontalize` and `psp nightly`: generated from `InvertConfig`."""
    add_arguments(p, InvertConfig, scopes=("run",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psp", description="pSp face inversion at scale, on Ray Data")
    sub = parser.add_subparsers(dest="command", required=True)
    inv = sub.add_parser("invert", help="images in object storage -> W+ and reconstructions as Parquet")
    _add_invert_args(inv)
    front = sub.add_parser("frontalize", help="alias of invert (pass the frontalization checkpoint)")
    _add_invert_args(front)
    demo = sub.add_parser("demo", help="run the pipeline on generated samples with a random-weight checkpoint")
    demo.add_argument("--output", default=None, help="output folder (default: a temporary folder)")
    demo.add_argument("--inputs", default=None, help="where to write the sample inputs (default: temporary)")
    demo.add_argument("--checkpoint", default=None, help="use this checkpoint instead of the random demo one")
    demo.add_argument("--faces", type=int, default=20, help="how many astronaut-derived faces to generate (1-24)")
    ins = sub.add_parser("inspect", help="counts per status, runs, schema, a few rows of an output table")
    ins.add_argument("output", metavar="OUTPUT")
    ins.add_argument("--rows", type=int, default=3)
    ins.add_argument("--as-of", default=None, metavar="VERSION|TIMESTAMP",
                     help="inspect an earlier version of the table (a number, or e.g. 2026-11-27T02:00:00Z)")
    ins.add_argument("--storage-options", type=parse_json_object, default=None,
                     help="JSON object passed to fsspec")
    for module in (nightly, submit, edit, report, vacuum):
        module.register(sub)
    return parser


def run_config(args: argparse.Namespace, input, output: str, **extra) -> InvertConfig:
    """Parsed options (see `add_run_options`) plus `extra` InvertConfig fields -> InvertConfig."""
    return from_args(InvertConfig, args, input=input, output=output, **extra)


def config_from_args(args: argparse.Namespace) -> InvertConfig:
    """argparse namespace of `invert`/`frontalize` -> InvertConfig."""
    if len(args.input) < 2:
        raise SystemExit("psp invert: give INPUT and OUTPUT (e.g. psp invert s3://bucket/raw/ out/ --checkpoint CKPT)")
    *inputs, output = args.input
    return run_config(args, inputs[0] if len(inputs) == 1 else inputs, output)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `psp` console script; returns the exit code.

    Everything it prints, logs or lets escape is redacted (`pipelines.secrets`), and `env:NAME`
    values in --storage-options are resolved here, where the command runs.
    """
    from pipelines import secrets

    secrets.install_log_redaction()
    sys.excepthook = secrets.redacting_excepthook
    with secrets.redacted_output():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipelines import secrets
    from pipelines.config import ConfigError
    from pipelines.sources import InputError
    from pipelines.table import ConcurrentRunError

    try:
        if getattr(args, "storage_options", None):
            args.storage_options = secrets.resolve_env_refs(args.storage_options)
            secrets.remember(args.storage_options)
        if args.command in ("invert", "frontalize"):
            from pipelines.graph import run_invert

            summary = run_invert(config_from_args(args))
            print(summary.format())
            return 0
        if args.command == "demo":
            from jobs.demo import run_demo

            return run_demo(output=args.output, inputs=args.inputs, n_good=args.faces, checkpoint=args.checkpoint)
        if args.command == "inspect":
            from jobs.inspect import inspect_output

            print(inspect_output(args.output, args.storage_options, n_rows=args.rows, as_of=args.as_of))
            return 0
        if hasattr(args, "func"):  # subcommands registered by other modules
            return int(args.func(args) or 0)
    except (ConfigError, InputError) as e:
        print(f"psp {args.command}: {secrets.redact(str(e))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConcurrentRunError) as e:
        print(f"psp {args.command}: {secrets.redact(str(e))}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
