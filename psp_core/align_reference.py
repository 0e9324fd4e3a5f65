"""The original FFHQ alignment recipe, restated: the reference the exact mode is tested against.

`reference_align` re-states `scripts/align_all_parallel.py` of the original pSp (from NVlabs
ffhq-dataset; spec section 4): per image it builds the HOG detector, reads the file with
`dlib.load_rgb_image`, detects with upsample 1 on the full image (`detector(img, 1)`), keeps the
last detection, predicts 68 integer landmarks, re-opens the file with PIL and runs the shrink /
crop / pad / QUAD steps (ANTIALIAS = LANCZOS). It is deliberately the original's procedure, its
costs included (two decodes, the whole-image blur and median of the pad branch): tests and
bench/align.py compare `psp_core.align.FaceAligner` with it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["reference_align", "reference_pad_blend", "composite_photo", "group_photo"]


def reference_pad_blend(img, pad, qsize: float) -> np.ndarray:
    """The original's padding step on the whole image: reflect-pad by `pad` (left, top, right,
    bottom), blur towards the border and fade to the median; uint8 [H, W, 3]."""
    import scipy.ndimage

    pad = np.asarray(pad, dtype=np.int64)
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
    return np.uint8(np.clip(np.rint(a), 0, 255))


def composite_photo(seed: int, face: Image.Image, max_size: tuple[int, int] = (1800, 1500),
                    min_faces: int = 1) -> Image.Image:
    """A test photo: `face` (e.g. the astronaut's, 270 px) pasted `min_faces`-3 times at random
    scales (0.3-2.5), mirrored or not, some cut by the border, on a plain or coffee-photo background."""
    from skimage import data

    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(500, max_size[0])), int(rng.integers(400, max_size[1]))
    if seed % 2:
        canvas = Image.fromarray(data.coffee()).resize((width, height))
    else:
        canvas = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(60, 200, 3)))
    for _ in range(int(rng.integers(min_faces, 4))):
        s = float(rng.uniform(0.3, 2.5))
        tile = face.resize((int(270 * s), int(270 * s)), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = int(rng.integers(-tile.width // 4, max(width - tile.width * 3 // 4, 1)))
        y = int(rng.integers(-tile.height // 4, max(height - tile.height * 3 // 4, 1)))
        canvas.paste(tile, (x, y))
    return canvas


def group_photo(face: Image.Image) -> Image.Image:
    """A 1500x1080 group photo: `face` (the astronaut's 270 px crop) pasted at 2.2, 1.4, 1.0 and 0.8
    times on skimage's coffee photo. The best-scoring face (HOG) is the smallest one, a ~90 px box:
    a coarse scan at ~512 px sees only the largest faces (bench/align.py, tests/test_align.py)."""
    from skimage import data

    canvas = Image.fromarray(data.coffee()).resize((1500, 1080), Image.Resampling.BILINEAR)
    for scale, xy in ((2.2, (60, 200)), (1.4, (760, 120)), (1.0, (1150, 650)), (0.8, (800, 760))):
        canvas.paste(face.resize((int(270 * scale), int(270 * scale)), Image.Resampling.LANCZOS), xy)
    return canvas


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
        img = Image.fromarray(reference_pad_blend(img, pad, qsize), "RGB")
        quad += pad[:2]

    img = img.transform((transform_size, transform_size), Image.Transform.QUAD, (quad + 0.5).flatten(), Image.Resampling.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img, lm
