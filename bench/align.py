"""Aligned faces per second per core: psp_core.align.FaceAligner vs the original's procedure.

    python bench/align.py            # 3 repeats per photo, output 256 and 1024
    python bench/align.py --quick    # 1 repeat

The baseline (`reference_align`) re-states the original `scripts/align_all_parallel.py` procedure
(spec section 4): per image it builds the HOG detector, reads the file with `dlib.load_rgb_image`,
detects with upsample 1 on the full image, keeps the last detection, predicts 68 integer landmarks,
re-opens the file with PIL and runs the shrink / crop / pad / QUAD steps (ANTIALIAS = LANCZOS).
A second baseline builds the detector once ("hoisted"), to separate that cost from the rest.
Compared in the same run, one process, one thread (dlib's HOG scan is single-threaded):

- exact: FaceAligner(select="last") -- same detections and landmarks as the original;
- fast:  FaceAligner(select="last", detect_size=640) -- the HOG scan (upsample 1) is bounded to a
  640 px longest side: detection on a copy (320 px, upsampled once by dlib), the box mapped back,
  the 68 landmarks predicted at full resolution. It finds faces taller than ~12.5 % of the longest
  side (the original: faces down to ~40 px).

Photos: skimage's astronaut (512 px PNG) and photos derived from it at camera-like sizes (JPEG,
quality 95): 1024 and 2048 px upscales, a 1260 px face close-up (shrink branch at output 256), a
face cut by the image corner (pad branch). It also prints how far the fast mode's landmarks and
crops move from the exact mode's. Timings are medians of CPU seconds per photo (single-threaded: CPU seconds = seconds on one core,
and other jobs on a shared machine disturb them less than wall time); the ratios are measured in
this run.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def reference_align(
    path: str,
    predictor,
    output_size: int = 256,
    transform_size: int = 256,
    landmarks: np.ndarray | None = None,
    detector=None,
) -> tuple[Image.Image, np.ndarray]:
    """The original alignment procedure, restated: returns (aligned PIL image, int landmarks [68,2]).

    `landmarks` skips detection (to compare crops given the same landmarks); `detector` reuses a
    detector (the original builds one per image). Raises IndexError when no face is found (the
    original raised UnboundLocalError).
    """
    import dlib
    import scipy.ndimage

    if landmarks is None:
        detector = detector or dlib.get_frontal_face_detector()
        rgb = dlib.load_rgb_image(path)
        faces = list(detector(rgb, 1))
        shape = predictor(rgb, faces[-1])  # the original loops over all and keeps the last
        lm = np.array([[p.x, p.y] for p in shape.parts()])
    else:
        lm = np.asarray(landmarks).astype(np.int64)

    eye_l, eye_r = np.mean(lm[36:42], axis=0), np.mean(lm[42:48], axis=0)
    eye_avg, eye_to_eye = (eye_l + eye_r) * 0.5, eye_r - eye_l
    eye_to_mouth = (lm[48] + lm[54]) * 0.5 - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2

    img = Image.open(path)
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        img = img.resize(
            (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink))),
            Image.Resampling.LANCZOS,
        )
        quad /= shrink
        qsize /= shrink

    def bounds(q):
        return (
            int(np.floor(min(q[:, 0]))), int(np.floor(min(q[:, 1]))),
            int(np.ceil(max(q[:, 0]))), int(np.ceil(max(q[:, 1]))),
        )

    border = max(int(np.rint(qsize * 0.1)), 3)
    b = bounds(quad)
    crop = (max(b[0] - border, 0), max(b[1] - border, 0), min(b[2] + border, img.size[0]), min(b[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    b = bounds(quad)
    pad = (max(-b[0] + border, 0), max(-b[1] + border, 0), max(b[2] - img.size[0] + border, 0), max(b[3] - img.size[1] + border, 0))
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        a = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = a.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(
            1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
            1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]),
        )
        blur = qsize * 0.02
        a += (scipy.ndimage.gaussian_filter(a, [blur, blur, 0]) - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
        quad += pad[:2]

    img = img.transform((transform_size, transform_size), Image.Transform.QUAD, (quad + 0.5).flatten(), Image.Resampling.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img, lm


def make_photos(folder: str) -> list[tuple[str, str]]:
    """Write the benchmark photos; returns [(label, path)]."""
    from skimage import data

    a = Image.fromarray(data.astronaut())
    photos = {
        "astronaut 512 png": (a, "png"),
        "upscale 1024 jpg": (a.resize((1024, 1024), Image.Resampling.LANCZOS), "jpg"),
        "upscale 2048 jpg": (a.resize((2048, 2048), Image.Resampling.LANCZOS), "jpg"),
        "close-up 1260 jpg (shrink)": (a.crop((120, 20, 330, 230)).resize((1260, 1260), Image.Resampling.LANCZOS), "jpg"),
        "corner cut 322x422 jpg (pad)": (a.crop((190, 90, 512, 512)), "jpg"),
    }
    out = []
    for i, (label, (im, ext)) in enumerate(photos.items()):
        path = os.path.join(folder, f"photo{i}.{ext}")
        im.save(path, quality=95) if ext == "jpg" else im.save(path)
        out.append((label, path))
    return out


def _median_time(fn, repeats: int) -> float:
    # CPU seconds of this (single-threaded) process: "per core", and robust to other jobs on the box.
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat per photo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detect-size", type=int, default=640, help="the fast mode's detection size")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats

    import dlib

    from psp_core.align import FaceAligner, dlib_model_path

    predictor = dlib.shape_predictor(dlib_model_path("shape_predictor_68_face_landmarks.dat"))
    detector = dlib.get_frontal_face_detector()
    with tempfile.TemporaryDirectory() as folder:
        photos = make_photos(folder)
        print(f"photos: {', '.join(label for label, _ in photos)}; repeats={repeats}; 1 thread\n")
        summary = {}
        for output_size in (256, 1024):
            exact = FaceAligner(output_size, select="last")
            fast = FaceAligner(output_size, select="last", detect_size=args.detect_size)
            modes = {
                "original": lambda p: reference_align(p, predictor, output_size, output_size),
                "original, detector hoisted": lambda p: reference_align(p, predictor, output_size, output_size, detector=detector),
                "exact": exact,
                f"fast (detect_size={args.detect_size})": fast,
            }
            per_mode = {m: [] for m in modes}
            print(f"output {output_size}: median CPU seconds per photo")
            print(f"  {'photo':32s}" + "".join(f"{m:>30s}" for m in modes))
            for label, path in photos:
                for fn in modes.values():  # warm the file cache and lazy imports
                    fn(path)
                row = [_median_time(lambda: fn(path), repeats) for fn in modes.values()]
                for m, t in zip(modes, row):
                    per_mode[m].append(t)
                print(f"  {label:32s}" + "".join(f"{t:30.3f}" for t in row))
            base = sum(per_mode["original"])
            hoisted = sum(per_mode["original, detector hoisted"])
            print(f"  {'faces/s per core (all photos)':32s}" + "".join(f"{len(photos) / sum(v):30.2f}" for v in per_mode.values()))
            for m in list(modes)[2:]:
                ratio, ratio_h = base / sum(per_mode[m]), hoisted / sum(per_mode[m])
                summary[(output_size, m)] = (ratio, ratio_h)
                print(f"  {m}: {ratio:.2f}x the original, {ratio_h:.2f}x the original with its detector hoisted")
            print()

        print(f"fast mode (detect_size={args.detect_size}) vs exact mode, output 256:")
        exact, fast = FaceAligner(256, select="best"), FaceAligner(256, select="best", detect_size=args.detect_size)
        for label, path in photos:
            re, rf = exact(path), fast(path)
            if not (re.ok and rf.ok):
                print(f"  {label:32s} exact={re.status} fast={rf.status}")
                continue
            lm_e, lm_f = re.landmarks.astype(np.float64), rf.landmarks.astype(np.float64)
            iod = np.linalg.norm(lm_e[42:48].mean(0) - lm_e[36:42].mean(0))
            dev = np.linalg.norm(lm_e - lm_f, axis=1)
            crop = np.abs(np.asarray(re.image, np.int16) - np.asarray(rf.image, np.int16))
            print(
                f"  {label:32s} same face={dev.mean() < 0.25 * iod}"
                f" landmarks: mean {dev.mean():.2f} px, max {dev.max():.2f} px"
                f" ({100 * dev.mean() / iod:.2f}% of inter-ocular {iod:.0f} px);"
                f" crop: mean |diff| {crop.mean():.2f} gray levels"
            )
        print("\nsummary (ratio of aligned faces/s per core vs the original; vs the original with its detector hoisted):")
        for (size, m), (r, rh) in summary.items():
            print(f"  output {size:5d} {m:28s} {r:6.2f}x  {rh:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
