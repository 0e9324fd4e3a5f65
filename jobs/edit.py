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

from pipelines.options import parse_json_object


def register(subparsers: Any) -> None:
    """Add ``psp edit`` and ``psp direction`` to the `psp` CLI's subparsers."""

    e = subparsers.add_parser(
        "edit",
        help="apply a latent direction to every ok W+ of an output table: edited W+ and images",
        description="One row per (ok input x strength): edited W+, image, the direction's name. "
                    "Directions: InterFaceGAN-style .pt ([1,512] or [1,n_styles,512]), GANSpace PCA "
                    "(.pt dict mean/comp/std or GANSpace .npz, with --ganspace-edit), .npy [512] or [n_styles,512].",
    )
    e.add_argument("table", metavar="TABLE", help="psp output table (what psp invert wrote)")
    e.add_argument("output", metavar="OUTPUT", help="where the edits table is written")
    e.add_argument("--generator", required=True,
                   help="pSp checkpoint (its decoder is used) or rosinality StyleGAN2 file (g_ema)")
    e.add_argument("--direction", required=True, help="direction file (.pt, .npy, .npz), path or fsspec URI")
    e.add_argument("--strengths", default="-3,0,3", help="comma-separated strengths, one row each (default -3,0,3)")
    e.add_argument("--ganspace-edit", default=None, metavar="C,START,END",
                   help="GANSpace PCA files: component and styles START..END-1 (END exclusive, e4e's "
                        "tuples without the strength), e.g. 54,7,8")
    e.add_argument("--name", default=None, help="direction name recorded on rows (default: file name)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--batch-size", type=int, default=None, help="rows per decode batch (default 32 GPU / 8 CPU)")
    e.add_argument("--gpus", type=int, default=None, help="at most this many GPU actors (default: all GPUs)")
    e.add_argument("--images", choices=("png", "jpeg", "none"), default="png")
    e.add_argument("--image-size", choices=("256", "full"), default="256")
    e.add_argument("--limit", type=int, default=None, help="edit at most the first N ok latents")
    e.add_argument("--run-id", default=None)
    e.add_argument("--storage-options", type=parse_json_object, default=None)
    # `--strengths -3,0,3` as the docs write it: argparse takes "-3,0,3" for an option unless it
    # reads as a negative number, which by default means one number only.
    e._negative_number_matcher = re.compile(r"^-\d*\.?\d+([eE][-+]?\d+)?(,-?\d*\.?\d+([eE][-+]?\d+)?)*$")
    e.set_defaults(func=_main_edit)

    d = subparsers.add_parser(
        "direction",
        help="fit a linear direction on W+ against a boolean label (logistic regression or mean difference)",
    )
    d.add_argument("table", metavar="TABLE", help="psp output table")
    d.add_argument("--labels", required=True, help="Parquet or CSV with image_id (or source_uri) and the label column")
    d.add_argument("--label", default="label", metavar="COLUMN", help="the boolean column (default: label)")
    d.add_argument("-o", "--output", required=True, help="where to write the direction (.npy)")
    d.add_argument("--method", choices=("logistic", "mean_difference"), default="logistic")
    d.add_argument("--shared", action="store_true",
                   help="one [512] offset for every style (fit on the mean over styles); default [n_styles, 512]")
    d.add_argument("--storage-options", type=parse_json_object, default=None)
    d.set_defaults(func=_main_direction)


def _main_edit(args: argparse.Namespace) -> int:
    from pipelines.edit import EditConfig, run_edit

    summary = run_edit(EditConfig(
        table=args.table, output=args.output, generator=args.generator, direction=args.direction,
        strengths=args.strengths, ganspace_edit=args.ganspace_edit, direction_name=args.name,
        device=args.device, batch_size=args.batch_size, gpus=args.gpus, images=args.images,
        image_size=args.image_size, limit=args.limit, storage_options=args.storage_options, run_id=args.run_id,
    ))
    print(summary.format())
    return 0 if set(summary.counts) <= {"ok"} else 3


def _main_direction(args: argparse.Namespace) -> int:
    import io

    import fsspec
    import numpy as np

    from pipelines.edit import fit_direction_from_labels

    direction, info = fit_direction_from_labels(
        args.table, args.labels, args.label, method=args.method, shared=args.shared,
        storage_options=args.storage_options,
    )
    buf = io.BytesIO()
    np.save(buf, direction)
    with fsspec.open(args.output, "wb", **dict(args.storage_options or {})) as f:
        f.write(buf.getvalue())
    info["output"] = args.output
    print(json.dumps(info), file=sys.stdout)
    return 0
