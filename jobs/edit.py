"""`psp edit TABLE OUTPUT` (bulk latent editing) and `psp direction TABLE` (fit a direction).

    psp edit TABLE OUTPUT --generator CKPT --direction FILE --strengths -3,0,3 [--ganspace-edit C,START,END]
    psp direction TABLE --labels FILE --label COLUMN -o direction.npy [--method logistic|mean_difference] [--shared]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from pipelines.edit import DirectionConfig, EditConfig
from pipelines.options import add_arguments, from_args


def register(subparsers: Any) -> None:
    """Add ``psp edit`` and ``psp direction`` to the `psp` CLI's subparsers (their options are
    `EditConfig`'s and `DirectionConfig`'s declarations)."""

    e = subparsers.add_parser(
        "edit",
        help="apply a latent direction to every ok W+ of an output table: edited W+ and images",
        description="One row per (ok input x strength): edited W+, image, the direction's name. "
                    "Directions: InterFaceGAN-style .pt ([1,512] or [1,n_styles,512]), GANSpace PCA "
                    "(.pt dict mean/comp/std or GANSpace .npz, with --ganspace-edit), .npy [512] or [n_styles,512].",
    )
    e.add_argument("table", metavar="TABLE", help="psp output table (what psp invert wrote)")
    e.add_argument("output", metavar="OUTPUT", help="where the edits table is written")
    add_arguments(e, EditConfig, scopes=("edit",))
    # `--strengths -3,0,3` as the docs write it: argparse takes "-3,0,3" for an option unless it
    # reads as a negative number, which by default means one number only.
    e._negative_number_matcher = re.compile(r"^-\d*\.?\d+([eE][-+]?\d+)?(,-?\d*\.?\d+([eE][-+]?\d+)?)*$")
    e.set_defaults(func=_main_edit)

    d = subparsers.add_parser(
        "direction",
        help="fit a linear direction on W+ against a boolean label (logistic regression or mean difference)",
    )
    d.add_argument("table", metavar="TABLE", help="psp output table")
    add_arguments(d, DirectionConfig, scopes=("direction",))
    d.set_defaults(func=_main_direction)


def _main_edit(args: argparse.Namespace) -> int:
    from pipelines.edit import run_edit

    summary = run_edit(from_args(EditConfig, args, table=args.table, output=args.output))
    print(summary.format())
    return 0 if set(summary.counts) <= {"ok"} else 3


def _main_direction(args: argparse.Namespace) -> int:
    import io

    import numpy as np

    from pipelines.edit import fit_direction_from_labels
    from psp_core.uris import open_uri

    c = from_args(DirectionConfig, args, table=args.table)
    direction, info = fit_direction_from_labels(
        c.table, c.labels, c.label, method=c.method, shared=c.shared, storage_options=c.storage_options,
    )
    buf = io.BytesIO()
    np.save(buf, direction)
    with open_uri(c.output, "wb", c.storage_options) as f:
        f.write(buf.getvalue())
    info["output"] = c.output
    print(json.dumps(info), file=sys.stdout)
    return 0
