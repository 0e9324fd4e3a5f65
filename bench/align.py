"""CPU per aligned face: the original recipe vs the exact mode vs the speed mode, on real photos.

    python bench/align.py                 # 2 repeats, 12 composites for the identity check
    python bench/align.py --quick         # 1 repeat, 4 composites

Modes, compared in the same run, one process, one thread (dlib's HOG scan is single-threaded),
each given the photo's file bytes:

- original: `psp_core.align_reference.reference_align`, the original `align_all_parallel.py`
  restated: detector built per image, `dlib.load_rgb_image`, `detector(img, 1)`, last detection,
  a second decode with PIL, whole-image blur/median in the pad branch;
- exact: `FaceAligner(min_face=M)` (the pipeline's default, M = 64; also 100 and 128): one decode,
  detection without the pyramid levels that only hold faces under M px
  (`psp_core.face_detection.PyramidDetector`), the pad blend computed only where its weight is
  non-zero (bit-identical);
- speed: `FaceAligner(min_face=64, detect_size=D)` (`--align-detect-size D`, default 512): a JPEG
  is decoded at 1/2-1/8 scale (`Image.draft`) where its face allows, a coarse scan of a copy of
  about D px; one clear face is re-detected in a window on the original's pyramid grid, everything
  else takes the exact path on a full decode (`WindowDetector`; the path each image took is
  printed). The comparison with the exact mode gives both modes each image as JPEG bytes (q92).

Photos: skimage's astronaut upscaled to 1, 2 and 3 MP (JPEG q92; the quad crosses the top border,
so the pad branch runs) and a group photo (astronaut faces of 90-300 px pasted on skimage's coffee,
~1.6 MP). Printed: median CPU ms per photo (one face aligned per photo, so ms/face) and the ratio
to the original; then the identity check of the exact mode against the original on the photos and
on random composites (every face of at least M px: box, score, 68 landmarks and the 256 px crop
given the same landmarks), and the speed mode's landmark deviation from the exact mode as a
percentage of the inter-ocular distance (mean / max) and whether it ever aligned another face.
Timings are CPU seconds of this process (time.process_time: other jobs on a shared machine disturb
them less than wall time); ratios are measured in this run.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def group_photo() -> Image.Image:
    """Astronaut faces of several sizes on a photo background (~1.6 MP); the best one is ~90 px."""
    from skimage import data

    from psp_core.align_reference import group_photo as make

    return make(Image.fromarray(data.astronaut()).crop((90, 0, 360, 270)))


def composite(seed: int) -> Image.Image:
    """Astronaut faces at random scales / places (some cut by the border) on a plain or photo background."""
    from skimage import data

    from psp_core.align_reference import composite_photo

    return composite_photo(seed, Image.fromarray(data.astronaut()).crop((90, 0, 360, 270)))


def make_photos(folder: str) -> list[tuple[str, str]]:
    from skimage import data

    a = Image.fromarray(data.astronaut())
    photos = {f"astronaut {mp} MP": a.resize((s, s), Image.Resampling.LANCZOS) for mp, s in ((1, 1000), (2, 1414), (3, 1732))}
    photos["group photo 1.6 MP"] = group_photo()
    out = []
    for i, (label, im) in enumerate(photos.items()):
        path = os.path.join(folder, f"photo{i}.jpg")
        Path(path).write_bytes(_jpeg(im))
        out.append((label, path))
    return out


def _median_cpu(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def _iod(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0)))


def steps(base, blob: bytes, detect_size: int, repeats: int) -> None:
    """CPU ms of each step of one photo's alignment (exact at min-face 64 and the speed mode)."""
    import dlib

    from psp_core.align import alignment_quad, extract_aligned, load_image
    from psp_core.face_detection import PyramidDetector, WindowDetector

    def ms(fn):
        return 1000 * _median_cpu(fn, max(repeats, 3))

    pil = load_image(blob)
    arr = np.asarray(pil)
    h, w = arr.shape[:2]
    exact = PyramidDetector(base.detector, 64)
    up = dlib.resize_image(arr, 2 * h + 1, 2 * w + 2)
    pyr = dlib.pyramid_down(6)

    def chain():
        img = up
        for _ in range(exact.levels):
            img = pyr(img)
        return img

    level = chain()
    window = WindowDetector(base.detector, exact, detect_size)
    box = exact.run(arr)[0].box
    lm = base.landmarks(arr, box)
    quad, qsize = alignment_quad(lm)
    out = extract_aligned(arr, quad, qsize, 256)
    parts = {
        "decode (bytes -> RGB)": ms(lambda: np.asarray(load_image(blob))),
        "exact: 2x upsample": ms(lambda: dlib.resize_image(arr, 2 * h + 1, 2 * w + 2)),
        f"exact: pyramid_down x{exact.levels}": ms(chain),
        "exact: HOG scan from that level": ms(lambda: base.detector.run(level, 0, 0.0)),
        f"speed: reduce to ~{detect_size} px": ms(lambda: pil.reduce(int(round(max(h, w) / detect_size)))),
        f"speed: whole detection ({window.run(arr) and window.last_path})": ms(lambda: window.run(arr)),
        "68 landmarks": ms(lambda: base.landmarks(arr, box)),
        "crop to 256 (extract_aligned)": ms(lambda: extract_aligned(arr, quad, qsize, 256)),
        "256 PNG (Pillow, level 1)": ms(lambda: out.save(io.BytesIO(), format="PNG", compress_level=1)),
    }
    print(f"  steps on one {w}x{h} photo (CPU ms): " + "; ".join(f"{k} {v:.1f}" for k, v in parts.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, 4 composites")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--composites", type=int, default=12, help="random composites for the identity check")
    ap.add_argument("--detect-size", type=int, default=512, help="the speed mode's coarse scan size")
    args = ap.parse_args(argv)
    repeats, n_comp = (1, 4) if args.quick else (args.repeats, args.composites)

    from psp_core.align import FaceAligner, alignment_quad, extract_aligned, load_image
    from psp_core.align_reference import reference_align
    from psp_core.face_detection import box_side

    base = FaceAligner(select="best")
    predictor = base.predictor
    with tempfile.TemporaryDirectory() as folder:
        photos = make_photos(folder)
        blobs = {p: Path(p).read_bytes() for _, p in photos}
        aligners = {
            "exact (min-face 64)": base.replace(min_face=64),
            "exact (min-face 100)": base.replace(min_face=100),
            "exact (min-face 128)": base.replace(min_face=128),
            f"speed (detect-size {args.detect_size})": base.replace(min_face=64, detect_size=args.detect_size),
        }
        modes = {"original": lambda p: reference_align(p, predictor, 256, 256)}
        modes.update({m: (lambda p, a=a: a(blobs[p])) for m, a in aligners.items()})
        print(f"median CPU ms per photo (one face aligned per photo = ms/face); repeats={repeats}; 1 thread")
        print(f"  {'photo':22s}" + "".join(f"{m:>26s}" for m in modes))
        per_mode: dict[str, list[float]] = {m: [] for m in modes}
        for label, path in photos:
            row = []
            for m, fn in modes.items():
                fn(path)  # warm the file cache and lazy imports
                row.append(_median_cpu(lambda: fn(path), repeats))
                per_mode[m].append(row[-1])
            print(f"  {label:22s}" + "".join(f"{1000 * t:26.0f}" for t in row))
        steps(base, blobs[photos[1][1]], args.detect_size, repeats)
        orig = statistics.mean(per_mode["original"])
        print(f"  {'mean ms/face':22s}" + "".join(f"{1000 * statistics.mean(v):26.0f}" for v in per_mode.values()))
        print(f"  {'vs the original':22s}" + "".join(f"{orig / statistics.mean(v):25.2f}x" for v in per_mode.values()))

        # -- exact mode == the original, for every face it keeps --------------------------------
        cases = [(label, np.asarray(Image.open(path).convert("RGB")), path) for label, path in photos]
        for seed in range(n_comp):
            path = os.path.join(folder, f"comp{seed}.png")
            composite(seed).save(path)
            cases.append((f"composite {seed}", np.asarray(Image.open(path).convert("RGB")), path))
        faces = identical = crops_same = faces64 = 0
        for min_face in (64, 100, 128):
            exact = base.replace(select="all", min_face=min_face)
            for label, arr, path in cases:
                rects, scores, _ = base.detector.run(arr, 1, 0.0)
                expected = [((r.left(), r.top(), r.right(), r.bottom()), s) for r, s in zip(rects, scores)]
                expected = [d for d in expected if box_side(d[0]) >= min_face]
                found = exact(arr)
                found = [r for r in found if r.ok]
                same = [(tuple(int(v) for v in r.box), r.score) for r in found] == expected
                for r, (box, _) in zip(found, expected):
                    faces += 1
                    lm = np.array([[p.x, p.y] for p in predictor(arr, base._dlib.rectangle(*box)).parts()], np.float32)
                    same_face = same and np.array_equal(r.landmarks, lm)
                    identical += same_face
                    if min_face == 64:  # the crop, given the same landmarks, vs the original's PIL steps
                        faces64 += 1
                        ref, _ = reference_align(path, None, 256, 256, landmarks=lm)
                        crops_same += int(np.abs(np.asarray(ref, np.int16) - np.asarray(r.image, np.int16)).max() <= 1)
                if not same:
                    print(f"  DIFFERENT: {label} min-face {min_face}: {expected} vs {[(tuple(r.box), r.score) for r in found]}")
        print(f"\nexact mode vs detector(img, 1): {identical} of {faces} kept faces identical (box, score, 68 landmarks) "
              f"over {len(cases)} images x min-face 64/100/128; crops at min-face 64 within 1 gray level of the "
              f"original's steps: {crops_same} of {faces64}")

        # -- speed mode vs exact -------------------------------------------------------------------
        exact = base.replace(min_face=64)
        speed = base.replace(min_face=64, detect_size=args.detect_size)
        devs, other, other_photos, compared, pad_diffs, crop_diffs = [], 0, 0, 0, [], []
        photo_labels = {label for label, _ in photos}
        paths: dict[str, int] = {}
        for label, arr, path in cases:
            # as JPEG bytes (q92), the speed mode's usual input: decoded at 1/2-1/8 scale where the
            # face allows (`FaceAligner.last_path` says which); the exact mode decodes every pixel
            blob = blobs[path] if path in blobs else _jpeg(Image.fromarray(arr))
            arr = np.asarray(load_image(blob))
            re, rs = exact(blob), speed(blob)
            paths[speed.last_path] = paths.get(speed.last_path, 0) + 1
            if not re.ok or not rs.ok:
                if re.ok != rs.ok:
                    other += 1
                    other_photos += label in photo_labels
                    print(f"  speed mode: {label}: exact={re.status} speed={rs.status}")
                continue
            compared += 1
            iod = _iod(re.landmarks.astype(np.float64))
            dev = np.linalg.norm(re.landmarks.astype(np.float64) - rs.landmarks, axis=1)
            if dev.mean() > 0.25 * iod:
                other += 1
                other_photos += label in photo_labels
                print(f"  speed mode: {label}: ANOTHER FACE (exact box {tuple(int(v) for v in re.box)}, speed box {tuple(int(v) for v in rs.box)})")
                continue
            devs.append((label in photo_labels, 100 * dev.mean() / iod, 100 * dev.max() / iod))
            # the crop given the speed mode's landmarks from every pixel with the exact pad blend vs
            # the speed mode's (from a reduced decode, approximate pad blend)
            exact_crop = extract_aligned(arr, *alignment_quad(rs.landmarks), 256)
            diff = np.abs(np.asarray(exact_crop, np.int16) - np.asarray(rs.image, np.int16))
            pad_diffs.append((int(diff.max()), float(diff.mean())))
            full = np.abs(np.asarray(re.image, np.int16) - np.asarray(rs.image, np.int16))
            crop_diffs.append(float(full.mean()))
        photo_devs = [d for d in devs if d[0]] or [(True, float("nan"), float("nan"))]
        print(f"speed mode (detect-size {args.detect_size}) vs exact, landmarks in % of the inter-ocular distance: "
              f"bench photos mean {np.mean([d[1] for d in photo_devs]):.2f} % (worst point "
              f"{np.max([d[2] for d in photo_devs]):.2f} %); all {compared} images with a face mean "
              f"{np.mean([d[1] for d in devs]):.2f} % (worst point {np.max([d[2] for d in devs]):.2f} %); "
              f"another face: {other_photos} on the bench photos, {other} on all images (a face smaller than "
              f"the coarse scan sees, ranked first by the exact mode)")
        print("speed mode paths: " + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())))
        print(f"speed mode crops vs the exact steps (every pixel, exact pad blend) given the same landmarks: max "
              f"{max(d[0] for d in pad_diffs)} gray levels, mean {np.mean([d[1] for d in pad_diffs]):.3f} over "
              f"{len(pad_diffs)} crops; vs the exact mode's crops: mean {np.mean(crop_diffs):.2f} gray levels "
              f"(worst crop {np.max(crop_diffs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
