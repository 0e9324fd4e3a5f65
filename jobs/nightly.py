"""`psp nightly INPUT OUTPUT --checkpoint CKPT`: process only new or changed inputs, exactly once.

The command line only: parsing and printing. The run itself (list, plan, adopt, process, one
commit to the output table) is `pipelines.run.run_nightly`; its plan `pipelines.plan.NightlyPlanner`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from pipelines.config import InvertConfig
from pipelines.options import add_arguments, from_args, option
from pipelines.run import NightlyError, run_nightly


@dataclass
class NightlyOptions:
    """What `psp nightly` adds to the run options (`InvertConfig`, scopes run + nightly)."""

    reprocess_on_model_change: bool = option(False, "reprocess rows made by another checkpoint",
                                             kind="flag", scope="nightly")
    retry_failed: bool = option(
        False, "reprocess failed rows whose cause may be transient (read_error, decode_timeout, align_error, "
        "invert_error); never the permanent not_a_file/container_error/decode_error/no_face/too_small/too_large",
        kind="flag", scope="nightly")
    dry_run: bool = option(False, "print the plan, process nothing", kind="flag", scope="nightly")
    no_resume: bool = option(False, "do not adopt rows written by an earlier crashed run", kind="flag",
                             scope="nightly")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``psp nightly`` to the `psp` CLI's subparsers."""
    p = subparsers.add_parser(
        "nightly",
        help="process only new or changed inputs into the OUTPUT table, committed atomically",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("input", help="input URI (dir, prefix, tar or parquet; s3://, gs://, file://)")
    p.add_argument("output", help="the output table (Delta Lake; created by the first run)")
    add_arguments(p, NightlyOptions, scopes=("nightly",))
    add_arguments(p, InvertConfig, scopes=("run", "nightly"))  # the same run options as `psp invert`
    p.set_defaults(func=main)
    return p


def _config_from_args(args: argparse.Namespace):
    return from_args(InvertConfig, args, input=args.input, output=args.output)


def main(args: argparse.Namespace) -> int:
    """Run ``psp nightly`` from parsed arguments; prints the result as JSON; returns the exit code:
    0, 2 when nothing was committed (with the reason), 3 when some inputs got no row."""
    config = _config_from_args(args)
    nightly = from_args(NightlyOptions, args)
    try:
        result = run_nightly(
            config,
            reprocess_on_model_change=nightly.reprocess_on_model_change,
            retry_failed=nightly.retry_failed,
            dry_run=nightly.dry_run,
            resume=not nightly.no_resume,
        )
    except NightlyError as exc:
        print(f"psp nightly: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 3 if result.lost else 0
