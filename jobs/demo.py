"""`psp demo`: the whole pipeline on a laptop, from a fresh clone, with nothing to download.

Sample inputs are derived from `skimage.data.astronaut()` (crops, flips, resizes, small rotations,
grayscale, alpha, EXIF orientation; JPEG and PNG) plus broken files (truncated JPEG, zero bytes, a
text file named .jpg, a photo without a face). The checkpoint is a seeded random-weight pSp in the
official format, written on the fly: the pipeline is real, the weights are not.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.options import add_arguments, from_args, option

RELEASED_HINT = (
    "psp invert s3://bucket/faces/ out/ --checkpoint /path/to/psp_ffhq_encode.pt "
    "(the released checkpoints are linked from the pSp README: github.com/eladrich/pixel2style2pixel)"
)


@dataclass(frozen=True)
class SampleInput:
    """One generated input file and the status the pipeline should give it."""

    name: str
    expected_status: str


def _jpeg(img, quality: int = 90, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"exif": exif} if exif else {}
    img.save(buf, format="JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_files(n_good: int = 20) -> list[tuple[str, bytes, str]]:
    """(file name, bytes, expected status) for `n_good` astronaut-derived faces + 4 bad inputs.

    Every derived image keeps the astronaut's face (about 190 px wide) whole and upright enough for
    dlib's HOG detector. Bad inputs: 'bad_truncated.jpg' (decode_error), 'bad_empty.jpg'
    (decode_error), 'bad_text.jpg' (decode_error), 'bad_no_face.jpg' (no_face: skimage's coffee).
    """
    from PIL import Image, ImageEnhance, ImageOps
    from skimage import data

    face = Image.fromarray(data.astronaut())  # 512x512, face around x 130-320, y 15-200
    W = face.size[0]

    def rot(img, deg):
        return img.rotate(deg, resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are rotated 90 CCW
    variants = [
        ("face_full.jpg", _jpeg(face)),
        ("face_full.png", _png(face)),
        ("face_flip.jpg", _jpeg(ImageOps.mirror(face))),
        ("face_flip.png", _png(ImageOps.mirror(face))),
        ("face_384.jpg", _jpeg(face.resize((384, 384), Image.Resampling.LANCZOS))),
        ("face_640.jpg", _jpeg(face.resize((640, 640), Image.Resampling.LANCZOS))),
        # 400 px: a ~71 px box, above the default --min-face 64 (at 320 px the box is 63 px: no_face)
        ("face_400.png", _png(face.resize((400, 400), Image.Resampling.LANCZOS))),
        ("face_crop_wide.jpg", _jpeg(face.crop((40, 0, 430, 330)))),
        ("face_crop_tight.png", _png(face.crop((90, 0, 370, 260)))),
        ("face_rot_p5.jpg", _jpeg(rot(face, 5))),
        ("face_rot_m5.png", _png(rot(face, -5))),
        ("face_rot_p10.jpg", _jpeg(rot(face, 10))),
        ("face_gray.jpg", _jpeg(face.convert("L"))),
        ("face_rgba.png", _png(face.convert("RGBA"))),
        ("face_exif_rot.jpg", _jpeg(face.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())),
        ("face_dark.jpg", _jpeg(ImageEnhance.Brightness(face).enhance(0.6))),
        ("face_bright.png", _png(ImageEnhance.Brightness(face).enhance(1.3))),
        ("face_crop_flip.jpg", _jpeg(ImageOps.mirror(face.crop((40, 0, 430, 330))))),
        ("face_q40.jpg", _jpeg(face, quality=40)),
        ("face_448_rot_m10.png", _png(rot(face.resize((448, 448), Image.Resampling.LANCZOS), -10))),
        ("face_contrast.jpg", _jpeg(ImageEnhance.Contrast(face).enhance(1.4))),
        ("face_576.png", _png(face.resize((576, 576), Image.Resampling.LANCZOS))),
        ("face_crop_left.jpg", _jpeg(face.crop((0, 0, W - 150, 360)))),
        ("face_sharp.jpg", _jpeg(ImageEnhance.Sharpness(face).enhance(2.0))),
    ]
    if not 1 <= n_good <= len(variants):
        raise ValueError(f"n_good={n_good}: between 1 and {len(variants)} derived faces are available")
    files = [(name, blob, "ok") for name, blob in variants[:n_good]]
    good_jpeg = variants[0][1]
    files += [
        ("bad_truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "decode_error"),
        ("bad_empty.jpg", b"", "decode_error"),
        ("bad_text.jpg", b"this is a text file, not a JPEG\n", "decode_error"),
        ("bad_no_face.jpg", _jpeg(Image.fromarray(data.coffee())), "no_face"),
    ]
    return files


def make_sample_inputs(folder: str | os.PathLike, n_good: int = 20) -> list[SampleInput]:
    """Write `sample_files(n_good)` into `folder` (created if needed); returns name + expected status."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, blob, status in sample_files(n_good):
        (folder / name).write_bytes(blob)
        out.append(SampleInput(name, status))
    return out


def make_sample_tar(path: str | os.PathLike, n_good: int = 4) -> list[SampleInput]:
    """A WebDataset-style `.tar` shard of `sample_files(n_good)` (members `<key>.jpg`/`.png`)."""
    import tarfile
    import time

    out = []
    with tarfile.open(path, "w") as tar:
        for name, blob, status in sample_files(n_good):
            info = tarfile.TarInfo(name=name)
            info.size = len(blob)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(blob))
            out.append(SampleInput(name, status))
    return out


def run_demo(output: str | None = None, inputs: str | None = None, n_good: int = 20, checkpoint: str | None = None) -> int:
    """The `psp demo` command: sample inputs + demo checkpoint -> local Ray -> the output Delta table; prints the
    summary, `psp inspect` of the output and how to use real weights. Returns an exit code."""
    from jobs.inspect import inspect_output
    from pipelines.config import InvertConfig
    from pipelines.dataflow import ensure_ray
    from pipelines.run import run_invert
    from psp_core.testing import random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="psp_demo_"))
    inputs_dir = Path(inputs) if inputs else work / "inputs"
    output_dir = Path(output) if output else work / "output"
    print(f"psp demo: writing sample inputs to {inputs_dir}")
    samples = make_sample_inputs(inputs_dir, n_good=n_good)
    bad = sum(s.expected_status != "ok" for s in samples)
    print(f"  {len(samples)} files: {len(samples) - bad} astronaut-derived faces, {bad} broken on purpose")
    if checkpoint is None:
        checkpoint = str(work / "psp_demo_random_64.pt")
        print(f"psp demo: writing a seeded RANDOM-weight demo checkpoint (64x64 output) to {checkpoint}")
        random_checkpoint(checkpoint, output_size=64, seed=0)

    ensure_ray()  # a private local cluster (token auth off, credentials redacted in worker logs)
    config = InvertConfig(input=str(inputs_dir), output=str(output_dir), checkpoint=checkpoint, align_actors=2)
    print(f"psp demo: psp invert {inputs_dir} {output_dir} --checkpoint {checkpoint}")
    summary = run_invert(config)
    print()
    print(summary.format())
    print()
    print(inspect_output(str(output_dir)))
    print()
    print(
        "NOTE: the demo checkpoint has RANDOM weights, so the W+ codes and images are noise; the "
        "pipeline around them (listing, decoding, alignment, per-row statuses, the Delta table) is real.\n"
        f"To invert faces for real, download a released pSp checkpoint and run:\n  {RELEASED_HINT}"
    )
    print(f"Output: {output_dir}")
    return 0


@dataclass
class DemoOptions:
    """`psp demo`'s options."""

    output: str | None = option(None, "output table (default: a temporary folder)", scope="demo")
    inputs: str | None = option(None, "where to write the sample inputs (default: temporary)", scope="demo")
    checkpoint: str | None = option(None, "use this checkpoint instead of the random demo one", scope="demo")
    photos: int = option(20, "how many astronaut-derived photos to generate (1-24), besides the broken files",
                         parse=int, minimum=1, maximum=24, metavar="N", scope="demo")


def register(subparsers) -> None:
    """Add `psp demo` to the `psp` CLI's subparsers."""
    p = subparsers.add_parser("demo", help="run the pipeline on generated samples with a random-weight checkpoint")
    add_arguments(p, DemoOptions, scopes=("demo",))
    p.set_defaults(func=_main)


def _main(args) -> int:
    o = from_args(DemoOptions, args)
    return run_demo(output=o.output, inputs=o.inputs, n_good=o.photos, checkpoint=o.checkpoint)
