"""`psp report OUTPUT [--html report.html]`: one self-contained HTML page about an output table."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pipelines.options import add_arguments, from_args, option, shared


@dataclass
class ReportOptions:
    """`psp report OUTPUT`'s options."""

    html: str = option("report.html", "where to write the page, a path or fsspec URI (default: report.html)",
                       scope="report")
    edits: str | None = option(None, "a psp edit OUTPUT whose images join the contact sheet", metavar="EDITS",
                               scope="report")
    sample: int = option(12, "rows in the contact sheet (default 12)", parse=int, minimum=0, scope="report")
    extremes: int = option(6, "rows in each worst/best list (default 6)", parse=int, minimum=0, scope="report")
    seed: int = option(0, "seed of the contact-sheet sample", parse=int, scope="report")
    no_inputs: bool = option(False, "do not read the original inputs for thumbnails", kind="flag", scope="report")
    storage_options: dict[str, Any] | None = shared("storage_options", scope="report")


def register(subparsers: Any) -> None:
    """Add ``psp report`` to the `psp` CLI's subparsers."""

    p = subparsers.add_parser(
        "report",
        help="write one self-contained HTML page (opens offline): statuses, runs, contact sheet, "
             "worst/best, histograms, W+ PCA, errors",
    )
    p.add_argument("output", metavar="OUTPUT", help="psp output table (what psp invert wrote)")
    add_arguments(p, ReportOptions, scopes=("report",))
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipelines.report import write_report

    o = from_args(ReportOptions, args)
    path = write_report(
        args.output, o.html, o.storage_options, sample=o.sample, n_extreme=o.extremes,
        edits=o.edits, seed=o.seed, read_inputs=not o.no_inputs,
    )
    print(f"wrote {path}")
    return 0
