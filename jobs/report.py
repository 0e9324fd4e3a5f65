"""`psp report OUTPUT [--html report.html]`: one self-contained HTML page about an output table."""
from __future__ import annotations

import argparse
from typing import Any

from pipelines.options import parse_json_object


def register(subparsers: Any) -> None:
    """Add ``psp report`` to the `psp` CLI's subparsers."""

    p = subparsers.add_parser(
        "report",
        help="write one self-contained HTML page (opens offline): statuses, runs, contact sheet, "
             "worst/best, histograms, W+ PCA, errors",
    )
    p.add_argument("output", metavar="OUTPUT", help="psp output table (what psp invert wrote)")
    p.add_argument("--html", default="report.html", help="where to write the page (default: report.html)")
    p.add_argument("--edits", default=None, metavar="EDITS", help="a psp edit OUTPUT whose images join the contact sheet")
    p.add_argument("--sample", type=int, default=12, help="rows in the contact sheet (default 12)")
    p.add_argument("--extremes", type=int, default=6, help="rows in each worst/best list (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the contact-sheet sample")
    p.add_argument("--no-inputs", action="store_true", help="do not read the original inputs for thumbnails")
    p.add_argument("--storage-options", type=parse_json_object, default=None)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipelines.report import write_report

    path = write_report(
        args.output, args.html, args.storage_options, sample=args.sample, n_extreme=args.extremes,
        edits=args.edits, seed=args.seed, read_inputs=not args.no_inputs,
    )
    print(f"wrote {path}")
    return 0
