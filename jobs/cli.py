"""The `psp` command line: invert (and its alias frontalize), demo, inspect.

    psp invert INPUT OUTPUT --checkpoint CKPT [--task T] [--align dlib|none] [--device auto|cpu|cuda]
               [--batch-size N] [--gpus N] [--align-actors N] [--images png|jpeg|none]
               [--image-size 256|full] [--metrics] [--mix N --latent-mask 8-17 --mix-alpha A --seed S]
               [--resize-factor F] [--limit N] [--storage-options JSON]
    psp demo [--output DIR]
    psp inspect OUTPUT [--as-of VERSION|TIMESTAMP] [--storage-options JSON]
    psp vacuum OUTPUT [--retention-hours H] [--no-compact] [--dry-run] [--storage-options JSON]

Misconfiguration exits with status 2 and a message that says what to do, before Ray does any work.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"--storage-options is not valid JSON ({e}): e.g. "
            '\'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\''
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    return value


def _add_invert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="+", metavar="INPUT",
                   help="folder / s3:// or gs:// prefix / image / .tar shard / .parquet / .txt manifest "
                        "(several allowed; the last positional argument is OUTPUT)")
    add_run_options(p)
    p.add_argument("--limit", type=int, default=None, help="process at most N new inputs")
    p.add_argument("--run-id", default=None, help="recorded on every row (default: time + random)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="force progress bars")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a pipeline run (model, task, alignment, resources, outputs, storage), shared
    by `psp invert`, `psp frontalize` and `psp nightly`; `run_config` turns them into a config."""
    p.add_argument("--checkpoint", required=True, help="pSp checkpoint (.pt), a path or fsspec URI")
    p.add_argument("--task", default=None,
                   help="dataset_type (default: the checkpoint's): ffhq_encode, ffhq_frontalize, "
                        "celebs_sketch_to_face, celebs_seg_to_face, celebs_super_resolution")
    p.add_argument("--align", choices=("dlib", "none"), default=None,
                   help="dlib FFHQ alignment, or none for sketches, seg maps and pre-aligned faces "
                        "(default: dlib for face photos, none for sketch/seg tasks)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="rows per invert batch (default 32 GPU / 8 CPU)")
    p.add_argument("--gpus", type=int, default=None, help="at most this many GPU invert actors (default: all GPUs)")
    p.add_argument("--align-actors", type=int, default=2, help="at most this many alignment actors")
    p.add_argument("--align-detect-size", type=int, default=None, metavar="PX",
                   help="opt-in fast alignment: detect faces on a copy at most PX on its longest side "
                        "(e.g. 1024; landmarks stay full resolution; not bit-identical to the original)")
    p.add_argument("--images", choices=("png", "jpeg", "none"), default="png", help="output image encoding")
    p.add_argument("--image-size", choices=("256", "full"), default="256",
                   help="256 (pSp's resized output) or full (the generator's size, e.g. 1024)")
    p.add_argument("--metrics", action="store_true", help="mse/psnr/ssim/identity of reconstruction vs input")
    p.add_argument("--mix", type=int, default=0, metavar="N", help="N style-mixed outputs per input (multi-modal)")
    p.add_argument("--latent-mask", default=None, help="styles to mix, e.g. 8-17 or 8,9,10")
    p.add_argument("--mix-alpha", type=float, default=None, help="blend weight of the injected styles")
    p.add_argument("--seed", type=int, default=0, help="base seed (per-row seeds derive from it and the image id)")
    p.add_argument("--resize-factor", type=int, default=None, help="super-resolution downsampling factor")
    p.add_argument("--image-column", default=None, help="Parquet inputs: the image-bytes column")
    p.add_argument("--save-aligned", action="store_true", help="also store the aligned input crop (PNG)")
    p.add_argument("--storage-options", type=_storage_options, default=None,
                   help="JSON passed to fsspec for input, output and checkpoint")


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
    ins.add_argument("--storage-options", type=_storage_options, default=None)
    for module in ("jobs.nightly", "jobs.submit", "jobs.vacuum"):  # engineer E's subcommands, when present
        try:
            register = __import__(module, fromlist=["register"]).register
        except (ImportError, AttributeError):
            continue
        register(sub)
    return parser


def run_config(args: argparse.Namespace, input, output: str, **extra):
    """The options added by `add_run_options` (plus `extra` InvertConfig fields) -> InvertConfig."""
    from pipelines.config import InvertConfig

    return InvertConfig(
        input=input,
        output=output,
        checkpoint=args.checkpoint,
        task=args.task,
        align=args.align,
        device=args.device,
        batch_size=args.batch_size,
        gpus=args.gpus,
        align_actors=args.align_actors,
        align_detect_size=args.align_detect_size,
        images=args.images,
        image_size=args.image_size,
        metrics=args.metrics,
        mix=args.mix,
        latent_mask=args.latent_mask,
        mix_alpha=args.mix_alpha,
        seed=args.seed,
        resize_factor=args.resize_factor,
        storage_options=args.storage_options,
        image_column=args.image_column,
        save_aligned=args.save_aligned,
        **extra,
    )


def config_from_args(args: argparse.Namespace):
    """argparse namespace of `invert`/`frontalize` -> InvertConfig."""
    if len(args.input) < 2:
        raise SystemExit("psp invert: give INPUT and OUTPUT (e.g. psp invert s3://bucket/raw/ out/ --checkpoint CKPT)")
    *inputs, output = args.input
    return run_config(
        args,
        inputs[0] if len(inputs) == 1 else inputs,
        output,
        limit=args.limit,
        run_id=args.run_id,
        progress=args.progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `psp` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipelines.config import ConfigError
    from pipelines.sources import InputError
    from pipelines.table import ConcurrentRunError

    try:
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
        print(f"psp {args.command}: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConcurrentRunError) as e:
        print(f"psp {args.command}: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
