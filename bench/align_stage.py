"""CPU per photo of the align stage as the pipeline runs it, in one process: exact vs speed vs reuse.

    python bench/align_stage.py                   # 10 camera photos (1-3 MP), 3 repeats
    python bench/align_stage.py --photos 5 --repeats 1

What runs is `pipelines.align.AlignFaces` on a batch dict of JPEG bytes, with the ffhq_encode task
(so: `DecodeImages` + alignment + the model input's PIL part), one thread, CPU time of this process
(`time.process_time`, which other jobs disturb less than wall time). Settings:

- exact: the default (`--min-face 64`), and `--min-face 128`;
- speed: `--align-detect-size 512` (`psp_core.face_detection.WindowDetector`): a JPEG is decoded
  at 1/2, 1/4 or 1/8 scale (`psp_core.images.JpegDraft`, libjpeg's DCT scaling) where its face is
  large enough, and the face found, its landmarks predicted and its crop made from that decode;
- speed, every pixel decoded: the same aligner given fully decoded pixels (the speed mode before
  draft decoding, and what a PNG/WebP input or a JPEG with a small face still costs);
- reuse: the exact setting on rows that carry the stored alignment of the same photos
  (`pipelines.reuse.REUSE_COLUMNS`, what a rerun's plan attaches with `--reuse-alignment` /
  `--alignment-from`): decode, then the crop from the stored landmarks;
- decode only: `DecodeImages` alone, the floor every setting pays.

Photos: the same as bench/cpu_per_face.py (skimage's astronaut at 1.0-3.0 MP, square and 4:3,
mirrored every other one, JPEG q92). Printed: median CPU ms per photo over the repeats (each repeat
one batch of all photos) and the min..max, plus the speed mode's landmark deviation from the exact
mode (% of the inter-ocular distance). The whole-run cost (all processes, the pipeline's own
per-row work included) is bench/cpu_per_face.py's.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def batch_of(blobs: list[bytes]) -> dict:
    from pipelines.read import object_column

    n = len(blobs)
    return {
        "source_uri": object_column([f"photo_{i}.jpg" for i in range(n)]),
        "data": object_column(blobs),
        "source_sha256": object_column([hashlib.sha256(b).hexdigest() for b in blobs]),
        "status": object_column(["ok"] * n),
        "error": object_column([""] * n),
    }


def with_stored(batch: dict, out: dict) -> dict:
    """`batch` with the alignment an AlignFaces output `out` (one face row per input) holds for
    each input attached, as a rerun's plan attaches it (`pipelines.reuse.REUSE_COLUMNS`)."""
    from pipelines.read import object_column
    from pipelines.reuse import pack_faces

    faces = [b"" if out["status"][i] != "ok" else
             pack_faces(out["face_score"][i:i + 1], out["face_box"][i:i + 1], out["landmarks"][i:i + 1])
             for i in range(len(out["status"]))]
    return {**batch, "stored_sha256": object_column(list(out["source_sha256"])), "stored_faces": object_column(faces)}


def full_decode(stage):
    """An AlignFaces whose decode stage decodes every pixel (no JPEG drafts): the speed mode's
    aligner then gets full-resolution pixels, as for a non-JPEG input."""
    from pipelines.decode import DecodeImages

    stage.decode = DecodeImages()
    return stage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detect-size", type=int, default=512)
    args = ap.parse_args(argv)

    from bench.cpu_per_face import make_photos
    from pipelines.align import AlignFaces
    from pipelines.decode import DecodeImages

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        make_photos(folder, args.photos)
        blobs = [p.read_bytes() for p in sorted(folder.iterdir())]
    batch = batch_of(blobs)
    exact = AlignFaces(task="ffhq_encode", keep_aligned=False)
    reference = exact(batch)
    assert all(s == "ok" for s in reference["status"]), list(reference["error"])
    settings = {
        "decode only (DecodeImages)": DecodeImages(),
        "exact (min-face 64, the default)": exact,
        "exact (min-face 128)": AlignFaces(task="ffhq_encode", keep_aligned=False, min_face=128),
        f"speed (detect-size {args.detect_size})": AlignFaces(task="ffhq_encode", keep_aligned=False,
                                                              aligner_kwargs={"detect_size": args.detect_size}),
        "speed, every pixel decoded": full_decode(AlignFaces(task="ffhq_encode", keep_aligned=False,
                                                             aligner_kwargs={"detect_size": args.detect_size})),
        "reuse (stored alignment)": exact,
    }
    batches = {"reuse (stored alignment)": with_stored(batch, reference)}
    n = len(blobs)
    print(f"load: {os.getloadavg()[0]:.1f} (1 min average; the machine's other jobs)")
    print(f"align stage, CPU ms per photo ({n} photos 1-3 MP, one batch per repeat, {args.repeats} repeats, 1 thread)")
    outs = {}
    for name, stage in settings.items():
        times = []
        for _ in range(args.repeats):
            t = time.process_time()
            outs[name] = stage(batches.get(name, batch))
            times.append(1000 * (time.process_time() - t) / n)
        print(f"  {name:<36} {statistics.median(times):8.1f} ms  ({min(times):.1f}..{max(times):.1f})", flush=True)
    reuse = outs["reuse (stored alignment)"]
    same = np.array_equal(reuse["model_input"], reference["model_input"])
    print(f"reuse: model inputs identical to the fresh exact alignment's: {same}")
    speed = outs[f"speed (detect-size {args.detect_size})"]
    lm_e, lm_s = reference["landmarks"].astype(np.float64), speed["landmarks"].astype(np.float64)
    iod = np.linalg.norm(lm_e[:, 42:48].mean(1) - lm_e[:, 36:42].mean(1), axis=1)
    dev = 100 * np.linalg.norm(lm_e - lm_s, axis=2).mean(1) / iod
    print(f"speed mode landmarks vs exact: mean {dev.mean():.2f} % of the inter-ocular distance "
          f"(worst photo {dev.max():.2f} %); another face (> 25 %): {int((dev > 25).sum())}")
    diff = np.abs(speed["model_input"].astype(np.int16) - reference["model_input"].astype(np.int16))
    print(f"speed mode model inputs vs exact: mean {diff.mean():.2f} gray levels (worst photo "
          f"{diff.reshape(n, -1).mean(1).max():.2f})")
    full = outs["speed, every pixel decoded"]
    lm_f = full["landmarks"].astype(np.float64)
    dev_f = 100 * np.linalg.norm(lm_e - lm_f, axis=2).mean(1) / iod
    print(f"speed mode with every pixel decoded, landmarks vs exact: mean {dev_f.mean():.2f} % (worst photo "
          f"{dev_f.max():.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
