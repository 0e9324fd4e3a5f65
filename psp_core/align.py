"""FFHQ face alignment (dlib 68 landmarks -> oriented square crop).

pSp only works on faces aligned the way FFHQ was aligned. This module re-states the alignment of
the original `scripts/align_all_parallel.py` (from NVlabs ffhq-dataset, spec section 4) with its
failure modes fixed:

- the face is chosen by a policy (`select`): "best" (highest HOG score, default), "largest",
  "last" (the original's choice: the last, lowest-score detection) or "all";
- no face, undecodable files, decompression bombs and tiny images are statuses, not exceptions;
- grayscale, palette, alpha, CMYK, 16-bit images and EXIF orientation are normalised to upright RGB
  before detection;
- Pillow >= 10 (`ANTIALIAS` is `LANCZOS`).

Given the same landmarks the crop equals the original's (the same float64 geometry, Pillow resize,
crop, reflect-pad + blur + median blend and QUAD transform). The pad branch is computed only where
its weights are non-zero and is bit-identical to the original's (`pad_blend`); the shrink resamples
only the region the crop keeps (within one gray level of resizing the whole image first).

The 68-point predictor and the HOG detector are loaded once per `FaceAligner`. The model files come
from the `face-recognition-models` wheel, located without importing it (its `__init__` imports
`pkg_resources`, which recent setuptools no longer ships).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np
from PIL import Image

# Decoding lives in psp_core.images; its public names stay importable from here.
from psp_core.images import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    ImageDecodeError,
    JpegDraft,
    _array_to_rgb,
    _check_size,
    _label,
    load_image,
    normalize_image,
    open_jpeg_draft,
)

__all__ = [
    "AlignResult",
    "FaceAligner",
    "ImageDecodeError",
    "DEFAULT_MAX_PIXELS",
    "MIN_SIDE",
    "AlignmentPlan",
    "alignment_quad",
    "plan_alignment",
    "extract_aligned",
    "load_image",
    "normalize_image",
    "dlib_model_path",
]

Select = Literal["best", "largest", "last", "all"]
ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, np.ndarray, JpegDraft]

#: The speed mode aligns a JPEG from its 1/scale decode only where the face's detection box is at
#: least this many px there (and a third of transform_size): the 68 landmarks, predicted on the
#: face's region resampled back to full scale, then stay within ~1 % of the inter-ocular distance of
#: the full decode's (bench/align_stage.py prints it).
DRAFT_MIN_BOX = 80


def draft_scale(size: tuple[int, int], detect_size: int) -> int:
    """The speed mode's JPEG decode scale for a photo of `size`: the largest of 1, 2, 4, 8 that is at
    most 1.1 x (longest side / detect_size), the coarse copy's reduction, so a face the coarse scan
    sees clearly (>= 87 coarse px) is >= ~80 px in the decode (a smaller one is decoded again finer)."""
    factor = 1.1 * max(size) / detect_size
    return max(s for s in JpegDraft.SCALES if s <= max(factor, 1))


# ---------------------------------------------------------------------------------------------
# model files


def dlib_model_path(filename: str) -> str:
    """Path of a model file shipped by the `face-recognition-models` wheel, found without importing it.

    `filename` is e.g. "shape_predictor_68_face_landmarks.dat",
    "shape_predictor_5_face_landmarks.dat" or "dlib_face_recognition_resnet_model_v1.dat".
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"dlib model {filename!r}: the 'face-recognition-models' package is not installed; "
            "install it with `pip install face-recognition-models==0.3.0`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"dlib model {filename!r} not found at {path}: reinstall face-recognition-models==0.3.0"
        )
    return path


# ---------------------------------------------------------------------------------------------
# geometry and image steps (spec section 4)


def alignment_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """FFHQ crop rectangle from 68 iBUG landmarks.

    landmarks: [68,2] (x, y) in source pixels; the original passes dlib's integer points.
    Returns (quad float64 [4,2]: corners top-left, bottom-left, bottom-right, top-right in source
    pixels; qsize: the side length in pixels).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"alignment_quad: expected landmarks of shape (68, 2), got {lm.shape}")
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    # x: the crop's horizontal half-axis, perpendicular blend of the eye line and the eye-mouth axis.
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = float(np.hypot(*x) * 2)
    return quad, qsize


def _bounds(quad: np.ndarray) -> tuple[int, int, int, int]:
    return (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )


@dataclass
class AlignmentPlan:
    """Which image steps `extract_aligned` takes for a quad (for tests and diagnostics).

    shrink: integer downscale factor (1 = none); shrunk_size: (w, h) after it; crop: (left, top,
    right, bottom) kept, in shrunk pixels; pad: (left, top, right, bottom) reflect padding or None;
    quad: float64 [4,2] in the cropped image; qsize: side in shrunk pixels.
    """

    shrink: int
    shrunk_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    pad: tuple[int, int, int, int] | None
    quad: np.ndarray
    qsize: float


def plan_alignment(
    size: tuple[int, int], quad: np.ndarray, qsize: float, output_size: int = 256, enable_padding: bool = True
) -> AlignmentPlan:
    """The original's shrink / crop / pad decisions for an image of `size` (w, h) and a quad."""
    width, height = size
    quad = np.array(quad, dtype=np.float64)  # a copy: modified below
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rw, rh = int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink))
        quad /= shrink
        qsize /= shrink
    else:
        shrink, rw, rh = 1, width, height

    border = max(int(np.rint(qsize * 0.1)), 3)
    b = _bounds(quad)
    crop = (max(b[0] - border, 0), max(b[1] - border, 0), min(b[2] + border, rw), min(b[3] + border, rh))
    if crop[2] - crop[0] < rw or crop[3] - crop[1] < rh:
        quad -= crop[0:2]
    else:
        crop = (0, 0, rw, rh)

    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    b = _bounds(quad)
    pad = (max(-b[0] + border, 0), max(-b[1] + border, 0), max(b[2] - cw + border, 0), max(b[3] - ch + border, 0))
    if enable_padding and max(pad) > border - 4:
        p = int(np.rint(qsize * 0.3))
        padded: tuple[int, int, int, int] | None = tuple(max(int(v), p) for v in pad)  # type: ignore[assignment]
    else:
        padded = None
    return AlignmentPlan(shrink, (rw, rh), crop, padded, quad, float(qsize))


def _active(n: int, pad_lo: np.int64, pad_hi: np.int64) -> tuple[int, int]:
    """(lo, hi): along an axis of n padded px, the blur weight of the pad blend's edge term
    `1 - min(i/pad_lo, (n-1-i)/pad_hi)` (clip(edge*3+1)) is non-zero exactly for i < lo or i >= hi
    (computed with the blend's own dtypes)."""
    i = np.arange(n)
    edge = 1.0 - np.minimum(np.float32(i) / pad_lo, np.float32(n - 1 - i) / pad_hi)
    inside = np.flatnonzero(~(edge * 3.0 + 1.0 > 0.0))
    if inside.size == 0:
        return n, n
    return int(inside[0]), int(inside[-1]) + 1


def _strips(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int]):
    """Non-overlapping (row slice, col slice) strips covering the border outside rows x cols."""
    top, bottom = rows
    left, right = cols
    out = [(slice(0, h), slice(0, left)), (slice(0, h), slice(right, w))]
    if right > left:
        out += [(slice(0, top), slice(left, right)), (slice(bottom, h), slice(left, right))]
    return [(r, c) for r, c in out if r.stop > r.start and c.stop > c.start]


def _first_pass(padded: np.ndarray, sigma: float, radius: int, rows: tuple[int, int],
                cols: tuple[int, int]) -> np.ndarray:
    """The first pass (axis 0) of the original's gaussian_filter(a, [sigma, sigma, 0]) on the
    padded uint8 image, as float32 [h, w, 3], computed only where `pad_blend`'s second pass reads
    it: every row of the columns within `radius` of the side bands (outside `cols`), the band rows
    (outside `rows`) of the others; elsewhere the array is left unset.

    The lines run along the rows of the transposed image (the same lines, the same arithmetic;
    scipy reads strided columns ~1.5x slower). A column's band rows are filtered on the run of rows
    they read (from the column's own end, where "reflect" applies as on the whole column, to
    `radius` past the band), so each output sees the same neighbours in the same order:
    bit-identical to filtering the whole image."""
    import scipy.ndimage

    h, w, _ = padded.shape
    (top, bottom), (left, right) = rows, cols
    out = np.empty((h, w, 3), dtype=np.float32)

    def run(cs: slice, r0: int, r1: int, keep: slice) -> None:
        """out[keep, cs] from padded[r0:r1, cs] (keep within r0:r1)."""
        if cs.stop <= cs.start:
            return
        lines = np.ascontiguousarray(padded[r0:r1, cs].transpose(1, 0, 2), dtype=np.float32)
        done = scipy.ndimage.gaussian_filter1d(lines, sigma, axis=1)
        out[keep, cs] = done[:, keep.start - r0 : keep.stop - r0].transpose(1, 0, 2)

    inner = slice(min(left + radius, w), max(right - radius, 0))  # columns the side bands never read
    if inner.stop - inner.start <= 0 or bottom - top <= 2 * radius:
        run(slice(0, w), 0, h, slice(0, h))
        return out
    run(slice(0, inner.start), 0, h, slice(0, h))
    run(slice(inner.stop, w), 0, h, slice(0, h))
    if top > 0:
        run(inner, 0, top + radius, slice(0, top))
    if bottom < h:
        run(inner, bottom - radius, h, slice(bottom, h))
    return out


def pad_blend(img: np.ndarray, pad, qsize: float) -> np.ndarray:
    """The original's pad branch on an HxWx3 uint8 crop: reflect pad, blur towards the edge, fade
    to the median. Returns the padded uint8 image.

    Bit-identical to the whole-image version (`psp_core.align_reference`), computing only what has
    a non-zero weight: the band of rows at the top and bottom and of columns at the left and right
    where the blur's weight clip(mask*3+1) is non-zero (`_active`), the interior keeping its pixels
    (its weights are exactly 0). The Gaussian's first pass (axis 0) runs only where the second
    reads it (`_first_pass`); its second pass (axis 1) only on the bands' rows and, in the rows between,
    on the side bands plus the kernel's radius (each output pixel sees the same neighbours and the
    same arithmetic: scipy filters each line on its own). The median of the whole blended image is
    found from the interior's histogram and the bands' values (`_median_of_parts`).
    """
    import scipy.ndimage

    pad = np.asarray(pad, dtype=np.int64)  # int64 like the original's np.maximum(pad, ...)
    padded = np.pad(img, ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
    h, w, _ = padded.shape
    sigma = qsize * 0.02
    radius = int(4.0 * sigma + 0.5)  # scipy's kernel radius for truncate=4.0
    top, bottom = _active(h, pad[1], pad[3])
    left, right = _active(w, pad[0], pad[2])
    rows_blurred = _first_pass(padded, sigma, radius, (top, bottom), (left, right))

    def blur_of(rs: slice, cs: slice) -> np.ndarray:
        """The blur on padded[rs, cs]: the second pass on the columns cs +- radius (inside the
        image, where "reflect" then applies as on the whole image)."""
        c0, c1 = max(cs.start - radius, 0), min(cs.stop + radius, w)
        out = scipy.ndimage.gaussian_filter1d(rows_blurred[rs, c0:c1], sigma, axis=1)
        return out[:, cs.start - c0 : cs.stop - c0]

    def mask_of(rs: slice, cs: slice) -> np.ndarray:
        yy, xx, _ = np.ogrid[rs, cs, :1]
        return np.maximum(
            1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
            1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]),
        )

    parts = [(slice(0, top), slice(0, w)), (slice(bottom, h), slice(0, w)),
             (slice(top, bottom), slice(0, left)), (slice(top, bottom), slice(right, w))]
    parts = [(rs, cs) for rs, cs in parts if rs.stop > rs.start and cs.stop > cs.start]
    blended = []
    for rs, cs in parts:
        a = np.float32(padded[rs, cs])
        mask = mask_of(rs, cs)
        a += (blur_of(rs, cs) - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        blended.append((rs, cs, a, mask))

    interior = padded[top:bottom, left:right]
    median = _median_of_parts(interior, h * w, [b[2] for b in blended])
    out = padded
    for rs, cs, a, mask in blended:
        a += (median - a) * np.clip(mask, 0.0, 1.0)
        out[rs, cs] = np.uint8(np.clip(np.rint(a), 0, 255))
    return out


def _median_of_parts(interior: np.ndarray, n_total: int, parts: list[np.ndarray]) -> np.ndarray:
    """`np.median(a, axis=(0, 1))` (float32 [3]) of an image of `n_total` pixels made of `interior`
    (uint8 [.., .., 3]: gray levels) and the float32 [.., .., 3] `parts`, in O(n): values are
    counted in unit bins (bin b + 1 holds [b, b+1), an interior level v lands in bin v + 1 ahead of
    any part value in it), and only the bin that holds a middle element is ordered."""
    values = [p.reshape(-1, 3) for p in parts]
    mid = n_total // 2
    middles = (mid - 1, mid) if n_total % 2 == 0 else (mid,)
    result = np.empty(3, dtype=np.float32)
    for ch in range(3):
        levels = np.bincount(interior[..., ch].ravel(), minlength=256) if interior.size else np.zeros(256, np.int64)
        bins = [np.clip(np.floor(v[:, ch]), -1, 256).astype(np.int16) + 1 for v in values]
        counts = sum((np.bincount(b, minlength=258) for b in bins), np.zeros(258, np.int64))
        counts[1:257] += levels
        cum = np.cumsum(counts)
        picked = []
        for k in middles:
            b = int(np.searchsorted(cum, k, side="right"))  # the bin holding the k-th smallest (0-based)
            rank = k - (int(cum[b - 1]) if b else 0)
            n_level = int(levels[b - 1]) if 1 <= b <= 256 else 0
            if rank < n_level:
                picked.append(np.float32(b - 1))
            else:
                inbin = np.concatenate([v[:, ch][bb == b] for v, bb in zip(values, bins)])
                picked.append(np.partition(inbin, rank - n_level)[rank - n_level])
        # numpy: the middle value, or the mean of the two middle values in float32
        result[ch] = picked[0] if len(picked) == 1 else np.median(np.array(picked, dtype=np.float32))
    return result


def pad_blend_fast(img: np.ndarray, pad, qsize: float, keep: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The pad branch approximated (the speed mode's): as `pad_blend`, but the blur towards the edge
    is computed on a copy box-reduced by ~sigma/3 (sigma is 2 % of qsize, 10-20 px: a very smooth
    kernel) and resized back, and the median is that of the blend rounded to gray levels. The
    padded image differs from the exact one by a few gray levels at most (3 on the test photo, the
    256 px crops by 1: bench/align.py prints it), in the border only; 4-8x cheaper than the exact
    blur (a ~100-tap filter over most of the padded image when the face is near the border).

    keep: (left, top, right, bottom) of the padded image that is used (the region the QUAD
    transform samples); the border is blended only there (elsewhere it stays reflect-padded), and
    the median counts the border's blend on every third pixel each way (about a third of the work
    when the face is near one edge: the pad runs on every side)."""
    import scipy.ndimage

    pad = np.asarray(pad, dtype=np.int64)
    padded = np.pad(img, ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
    h, w, _ = padded.shape
    sigma = qsize * 0.02
    f = max(1, int(sigma / 3), round(sigma / 3))  # >= 2 from sigma 4.5 (a crop from a reduced decode)
    small = np.float32(Image.fromarray(padded, "RGB").reduce(f))
    small = scipy.ndimage.gaussian_filter(small, [sigma / f, sigma / f, 0])
    chans = [Image.fromarray(np.ascontiguousarray(small[..., c]), "F") for c in range(3)]
    rows, cols = _active(h, pad[1], pad[3]), _active(w, pad[0], pad[2])
    interior = padded[rows[0] : rows[1], cols[0] : cols[1]].reshape(-1, 3)
    counts = [np.bincount(interior[:, c], minlength=256).astype(np.float64) for c in range(3)]
    p = np.float32(pad)

    def blend(rs: slice, cs: slice, step: int = 1):
        """The blurred blend of padded[rs, cs] (every `step`-th pixel) and its median weight."""
        rr, cc = np.arange(rs.start, rs.stop, step), np.arange(cs.start, cs.stop, step)
        # the small copy's pixel j covers [j*f, (j+1)*f) of the padded image
        box = (cs.start / f, rs.start / f, (cc[-1] + 1) / f, (rr[-1] + 1) / f)
        blur = np.stack([np.asarray(ch.resize((len(cc), len(rr)), Image.Resampling.BILINEAR, box=box))
                         for ch in chans], axis=2)
        yy, xx = np.float32(rr)[:, None], np.float32(cc)[None, :]
        mask = np.maximum(1 - np.minimum(xx / p[0], (w - 1 - xx) / p[2]), 1 - np.minimum(yy / p[1], (h - 1 - yy) / p[3]))
        a = np.float32(padded[rr[:, None], cc[None, :]] if step > 1 else padded[rs, cs])
        a += (blur - a) * np.clip(mask * 3 + 1, 0, 1)[..., None]
        return a, np.clip(mask, 0, 1)[..., None]

    blended = []
    for rs, cs in _strips(h, w, rows, cols):
        step = 1 if keep is None else 3
        a, weight = blend(rs, cs, step)
        levels = np.clip(np.rint(a), 0, 255).astype(np.uint8).reshape(-1, 3)
        for c in range(3):
            counts[c] += np.bincount(levels[:, c], minlength=256) * float(step * step)
        if keep is not None:  # only the part the transform samples is written
            rs = slice(max(rs.start, keep[1]), min(rs.stop, keep[3]))
            cs = slice(max(cs.start, keep[0]), min(cs.stop, keep[2]))
            if rs.stop <= rs.start or cs.stop <= cs.start:
                continue
            a, weight = blend(rs, cs)
        blended.append((rs, cs, a, weight))
    total = np.cumsum(counts, axis=1)
    # the exact count's middle element; with `keep`, the middle of the sampled counts
    middle = [(h * w + 1) // 2] * 3 if keep is None else [total[c][-1] / 2 for c in range(3)]
    median = np.array([np.searchsorted(total[c], middle[c]) for c in range(3)], np.float32)
    for rs, cs, a, weight in blended:
        a += (median - a) * weight
        padded[rs, cs] = np.uint8(np.clip(np.rint(a), 0, 255))
    return padded


def extract_aligned(
    image: Image.Image | np.ndarray,
    quad: np.ndarray,
    qsize: float,
    output_size: int = 256,
    transform_size: int | None = None,
    enable_padding: bool = True,
    fast_pad: bool = False,
) -> Image.Image:
    """Cut the FFHQ-aligned square out of an RGB image: shrink, crop, pad, QUAD transform, resize.

    image: PIL RGB or HxWx3 uint8 array (source pixels). quad: float64 [4,2] and qsize from
    `alignment_quad`. Returns a PIL RGB image of output_size x output_size. The steps are the
    original's (spec section 4): a LANCZOS shrink by floor(qsize/output_size/2) when that is > 1,
    a crop to the quad +- border, a reflect pad with blur and median blend where the quad leaves
    the image, a bilinear QUAD transform to transform_size, then a LANCZOS resize to output_size.
    The shrink only resamples the region kept by the crop (same filter and sample positions as
    resizing the whole image first). fast_pad: the speed mode's approximate pad blend
    (`pad_blend_fast`) instead of the original's.
    """
    transform_size = transform_size or output_size
    if isinstance(image, np.ndarray):
        arr: np.ndarray | None = image
        width, height = image.shape[1], image.shape[0]
    else:
        arr = None
        width, height = image.size
    plan = plan_alignment((width, height), quad, qsize, output_size, enable_padding)
    shrink, crop, quad, qsize = plan.shrink, plan.crop, plan.quad.copy(), plan.qsize
    rw, rh = plan.shrunk_size

    if shrink > 1:
        pil = image if arr is None else Image.fromarray(arr, "RGB")
        sx, sy = width / rw, height / rh
        box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
        img = pil.resize((crop[2] - crop[0], crop[3] - crop[1]), Image.Resampling.LANCZOS, box=box)
    elif arr is not None:
        img = Image.fromarray(np.ascontiguousarray(arr[crop[1] : crop[3], crop[0] : crop[2]]), "RGB")
    elif crop != (0, 0, rw, rh):
        img = image.crop(crop)
    else:
        img = image

    # Pad where the quad (+ border) leaves the image: reflect, blur towards the edge, fade to median.
    if plan.pad is not None:
        pad = np.asarray(plan.pad, dtype=np.int64)
        arr_in = np.asarray(img, dtype=np.uint8)
        quad += pad[:2]
        if fast_pad:  # blended only where the transform samples (+2 px for the bilinear taps)
            b = _bounds(quad)
            keep = (max(b[0] - 2, 0), max(b[1] - 2, 0), b[2] + 3, b[3] + 3)
            img = Image.fromarray(pad_blend_fast(arr_in, pad, qsize, keep), "RGB")
        else:
            img = Image.fromarray(pad_blend(arr_in, pad, qsize), "RGB")

    img = img.transform(
        (transform_size, transform_size),
        Image.Transform.QUAD,
        tuple((quad + 0.5).flatten()),
        Image.Resampling.BILINEAR,
    )
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img


# ---------------------------------------------------------------------------------------------
# the aligner


@dataclass
class AlignResult:
    """One aligned face (or why there is none).

    status: "ok" | "no_face" | "decode_error" | "too_large" | "too_small" (| "read_error" for a path
    that cannot be read); error: message or None.
    image: PIL RGB output_size x output_size (None unless ok). landmarks: float32 [68,2] (x, y) in
    source pixels of the upright RGB image. quad: float32 [4,2] crop corners in source pixels
    (top-left, bottom-left, bottom-right, top-right). score: HOG detector score of the chosen face.
    n_faces: number of detections in the image. box: int32 [4] detection box (left, top, right,
    bottom) in source pixels. source_size: (width, height) of the upright image, None if undecodable.
    """

    status: str
    error: str | None = None
    image: Image.Image | None = None
    landmarks: np.ndarray | None = None
    quad: np.ndarray | None = None
    score: float | None = None
    n_faces: int = 0
    box: np.ndarray | None = None
    source_size: tuple[int, int] | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def check_detect_size(detect_size: int) -> int:
    """FaceAligner's `detect_size`: an integer of at least the 80 px HOG window; returns it."""
    if isinstance(detect_size, bool) or not isinstance(detect_size, int):
        raise ValueError(f"detect_size must be an integer number of pixels, got {detect_size!r}")
    if detect_size < 80:
        raise ValueError(f"detect_size={detect_size} is below the 80 px HOG window (use e.g. 1024)")
    return detect_size


class FaceAligner:
    """dlib HOG detection + 68 landmarks + FFHQ crop, with the models loaded once.

    aligner = FaceAligner(); result = aligner(image)  # bytes, path, PIL image or HxWxC uint8 array

    output_size: side of the returned crop. transform_size: side of the QUAD transform before the
    final LANCZOS resize (default output_size; output_size=1024, transform_size=4096 gives FFHQ-style
    dataset crops). detector_upsample: dlib pyramid upsamplings (the original uses 1: faces down to
    about 40 px). select: which detection to align: "best" (highest score), "largest" (largest box),
    "last" (the original's choice: dlib lists detections by descending score and the original keeps
    the last one), "all" (a list of results, best first; a one-element list on failure).
    max_pixels / min_side: decode guards (statuses "too_large" / "too_small"). enable_padding:
    the original's reflect-pad branch (True, as the original). `replace(**changes)` derives an
    aligner with other options that shares the loaded models.

    min_face: the smallest face kept, as its detection box's shorter side in px (0: every face,
    the original's behaviour). Detection skips the pyramid levels that can only hold smaller faces
    (`psp_core.face_detection.PyramidDetector`): for every face it keeps, the box, score and
    landmarks are the original `detector(img, 1)`'s, at about a third of its cost at min_face 64.

    detect_size (opt-in speed mode, default None = exact): `WindowDetector`: a coarse HOG scan of a
    copy box-reduced to about detect_size px on its longest side (e.g. 512), and, where it shows one
    clear face, that face re-detected in a small window resampled on the geometry of the original's
    pyramid levels (so its box usually equals the original's); no face, several faces, a weak or
    floor-sized face, or a close choice take the exact path. Landmarks: bench/align.py prints the
    deviation (mean 0.1 % of the inter-ocular distance on its photos, no other face chosen on its
    group photo and composites). A face under ~2/3 of the size of the one clear face the coarse scan
    sees is not looked for. The speed mode also blends the padded border approximately
    (`pad_blend_fast`: a few gray levels off in the border at most, 4-8x cheaper). A JPEG given as
    bytes (or a `JpegDraft`) is decoded once at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) where
    the photo is at least ~1.5x detect_size, and where the window path finds its face large enough
    there (DRAFT_MIN_BOX) the landmarks and crop come from that decode (`_align_draft`; landmarks
    within ~1 % of the inter-ocular distance of the full decode's on average, bench/align_stage.py);
    otherwise it is decoded fully. `last_path` names the path the last such JPEG took.
    """

    def __init__(
        self,
        output_size: int = 256,
        transform_size: int | None = None,
        detector_upsample: int = 1,
        select: Select = "best",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        *,
        min_side: int = MIN_SIDE,
        detect_size: int | None = None,
        min_face: int = 0,
        enable_padding: bool = True,
        _models: tuple | None = None,
    ):
        if select not in ("best", "largest", "last", "all"):
            raise ValueError(f"FaceAligner: select={select!r}; use 'best', 'largest', 'last' or 'all'")
        transform_size = transform_size or output_size
        if transform_size < output_size:
            raise ValueError(
                f"FaceAligner: transform_size={transform_size} < output_size={output_size}; "
                "transform_size must be at least the output size"
            )
        if detect_size is not None:
            check_detect_size(detect_size)
        if isinstance(min_face, bool) or not isinstance(min_face, (int, np.integer)) or min_face < 0:
            raise ValueError(f"FaceAligner: min_face={min_face!r}; expected a number of pixels >= 0")
        self.output_size = int(output_size)
        self.transform_size = int(transform_size)
        self.detector_upsample = int(detector_upsample)
        self.select = select
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.detect_size = detect_size
        self.min_face = int(min_face)
        self.enable_padding = enable_padding
        #: the speed mode's path for the last JPEG given as bytes ("1/2 decode", "full decode (why)")
        self.last_path = ""
        if _models is None:
            import dlib

            _models = (
                dlib,
                dlib.get_frontal_face_detector(),
                dlib.shape_predictor(dlib_model_path("shape_predictor_68_face_landmarks.dat")),
            )
        self._dlib, self.detector, self.predictor = _models

    # -- public ------------------------------------------------------------------------------

    def replace(self, **changes) -> "FaceAligner":
        """A FaceAligner with some options changed that shares this one's loaded models (no reload).

        e.g. `aligner.replace(select="last", output_size=1024)`.
        """
        opts = dict(
            output_size=self.output_size,
            transform_size=None if self.transform_size == self.output_size else self.transform_size,
            detector_upsample=self.detector_upsample,
            select=self.select,
            max_pixels=self.max_pixels,
            min_side=self.min_side,
            detect_size=self.detect_size,
            min_face=self.min_face,
            enable_padding=self.enable_padding,
        )
        unknown = set(changes) - set(opts)
        if unknown:
            raise TypeError(f"FaceAligner.replace: unknown option(s) {sorted(unknown)}")
        opts.update(changes)
        return FaceAligner(**opts, _models=(self._dlib, self.detector, self.predictor))


    def __call__(self, image: ImageInput, *, name: str | None = None) -> AlignResult | list[AlignResult]:
        """Align the face(s) in `image` (encoded bytes, path, PIL image, HxW[xC] uint8 array, or a
        `psp_core.images.JpegDraft`).

        Returns an AlignResult, or a list of them with select="all". Never raises for bad input:
        decode failures, size guards and missing faces come back as statuses (and an unreadable
        path as "read_error", the schema's status for it). In the speed mode (detect_size) a JPEG
        given as bytes or a JpegDraft is decoded at reduced scale where its face allows
        (`_align_draft`); the exact mode always decodes every pixel.
        """
        if self.detect_size is not None and self.detector_upsample == 1:
            draft = image if isinstance(image, JpegDraft) else None
            if draft is None and isinstance(image, (bytes, bytearray, memoryview)):
                draft = open_jpeg_draft(image, self.max_pixels, self.min_side, name=name)
            if draft is not None:
                return self._wrap(self._align_draft(draft, name or draft.label))
        elif isinstance(image, JpegDraft):
            image = image.blob
        try:
            pil, arr = self._prepare(image, name)
        except ImageDecodeError as e:
            return self._wrap([AlignResult(status=e.status, error=e.message)])
        except OSError as e:  # a path that cannot be read (the pipeline reads bytes itself)
            msg = f"{_label(image, name)}: cannot read: {e.strerror or e}"
            return self._wrap([AlignResult(status="read_error", error=msg)])
        return self._wrap(self._align_decoded(pil, arr, _label(image, name)))

    def _align_decoded(self, pil: Image.Image | None, arr: np.ndarray, label: str) -> list[AlignResult]:
        size = (arr.shape[1], arr.shape[0])
        dets = self.detect(arr, pil)
        if not dets:
            msg = f"{label}: no face found by the HOG detector (upsample {self.detector_upsample})"
            if self.min_face > 0:
                msg = (f"{label}: no face of at least {self.min_face} px found by the HOG detector "
                       f"(faces smaller than the minimum face size {self.min_face} px are not looked for; "
                       "lower --min-face to keep them)")
            return [AlignResult(status="no_face", error=msg, n_faces=0, source_size=size)]
        chosen = self._choose(dets)
        results = []
        for rect, score in chosen:
            lm = self.landmarks(arr, rect)
            results.append(self._align_landmarks(pil if pil is not None else arr, lm, score, rect, len(dets), size))
        return results

    def _align_draft(self, draft: JpegDraft, label: str) -> list[AlignResult]:
        """Speed mode on a JPEG: decode it once at 1/scale (`draft_scale`), find the one clear face
        there (`WindowDetector.run_view`), predict its landmarks on its region resampled back to full
        scale, crop from the reduced decode. A photo whose face is small at that scale (under
        DRAFT_MIN_BOX px, or a third of transform_size), or that the window path leaves to the exact
        scan, is decoded fully and aligned as any other input."""
        from psp_core.face_detection import PyramidDetector, WindowDetector, box_side

        scale = draft_scale(draft.size, self.detect_size)
        self.last_path = "full decode (photo fits detect_size)"
        try:
            view = self._draft_view(draft, scale) if scale > 1 else None
            found = None
            if view is not None:
                exact = PyramidDetector(self.detector, self.min_face, self._dlib)
                # re-detection windows with 2 HOG cells of context (the full-scale path keeps 4): a
                # third of the cost, the same boxes on the bench photos (bench/align_stage.py)
                window = WindowDetector(self.detector, exact, self.detect_size, context=16)
                found = window.run_view(view, only_best=self.select == "best")
                self.last_path = f"full decode ({window.last_path})"
            # the face must be large enough at the decode's scale for its landmarks and crop: else
            # a finer decode (the detection, in photo px, stands)
            small_face = max(DRAFT_MIN_BOX, self.transform_size / 3)
            while found is not None and view.scale > 1 and box_side(found[0].box) < small_face * view.scale:
                view = self._draft_view(draft, view.scale // 2) if view.scale > 2 else None
                if view is None:
                    found, self.last_path = None, "full decode (small face)"
            if found is None:
                pil = draft.decode(1)
                return self._align_decoded(pil, np.asarray(pil), label)
        except ImageDecodeError as e:
            return [AlignResult(status=e.status, error=e.message)]
        self.last_path = f"1/{view.scale} decode"
        box, score = found[0].box, found[0].score
        lm = self._view_landmarks(view, box)
        quad, qsize = alignment_quad(lm)
        crop = extract_aligned(view.pil, (quad - view.offset) / view.scale, qsize / view.scale, self.output_size,
                               self.transform_size, self.enable_padding, fast_pad=True)
        return [AlignResult(status="ok", image=crop, landmarks=lm, quad=quad.astype(np.float32), score=score,
                            n_faces=1, box=np.asarray(box, dtype=np.int32), source_size=draft.size)]

    @staticmethod
    def _draft_view(draft: JpegDraft, scale: int):
        """The JPEG decoded at 1/scale as a ScaledView (with its PIL image as `.pil`), or None."""
        from psp_core.face_detection import ScaledView

        reduced = draft.decode(scale)
        if reduced is None:
            return None
        off = (scale - 1) / 2
        view = ScaledView(np.asarray(reduced), scale, (off, off), draft.size)
        view.pil = reduced
        return view

    def _view_landmarks(self, view, box: tuple[int, int, int, int]) -> np.ndarray:
        """68 landmarks (photo px) predicted on the face's region (box +- an eighth of its side, inside
        the photo) resampled from the reduced decode `view` back to the photo's pixel grid."""
        from psp_core.face_detection import _resample

        w, h = view.size
        margin = (box[2] - box[0] + 1) // 8
        x0, y0 = max(box[0] - margin, 0), max(box[1] - margin, 0)
        x1, y1 = min(box[2] + margin + 1, w), min(box[3] + margin + 1, h)
        region = _resample(view.arr, (x1 - x0, y1 - y0), view.to_view((x0, y0, x1, y1)))
        shifted = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
        return self.landmarks(region, shifted) + np.float32([x0, y0])

    def detect(self, arr: np.ndarray, pil: Image.Image | None = None) -> list[tuple[tuple[int, int, int, int], float]]:
        """HOG detections on an HxWx3 uint8 RGB array: [((left, top, right, bottom), score)], in dlib's
        order (descending score, the order `detector(img, upsample)` returns), boxes of at least
        `min_face` px only.

        Exact mode (default): `psp_core.face_detection.PyramidDetector`, the original's
        `detector(img, 1)` without the pyramid levels that only hold faces under min_face (the same
        boxes and scores for every face it keeps). With detect_size: `WindowDetector` (speed mode).
        """
        from psp_core.face_detection import PyramidDetector, WindowDetector, box_side

        if self.detector_upsample != 1:  # the level skipping is written for the original's upsample 1
            rects, scores, _ = self.detector.run(arr, self.detector_upsample, 0.0)
            dets = [((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores)]
            return [d for d in dets if box_side(d[0]) >= self.min_face]
        exact = PyramidDetector(self.detector, self.min_face, self._dlib)
        if self.detect_size is not None:
            found = WindowDetector(self.detector, exact, self.detect_size).run(arr, pil, only_best=self.select == "best")
        else:
            found = exact.run(arr)
        return [(d.box, d.score) for d in found]

    def landmarks(self, arr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """68 landmarks (int-valued float32 [68,2], x, y) predicted on the full-resolution array in `box`."""
        shape = self.predictor(arr, self._dlib.rectangle(*box))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)

    def align_landmarks(self, image: Image.Image | np.ndarray, landmarks: np.ndarray) -> AlignResult:
        """Align an RGB image given its 68 landmarks (skips detection)."""
        if isinstance(image, np.ndarray):
            arr = _array_to_rgb(image)
            size = (arr.shape[1], arr.shape[0])
        else:
            arr = normalize_image(image)
            size = arr.size
        return self._align_landmarks(arr, np.asarray(landmarks, np.float32), None, None, 1, size)

    # -- internals ---------------------------------------------------------------------------

    def _prepare(self, image: ImageInput, name: str | None) -> tuple[Image.Image | None, np.ndarray]:
        if isinstance(image, np.ndarray):
            arr = _array_to_rgb(image)
            _check_size((arr.shape[1], arr.shape[0]), self.max_pixels, self.min_side, _label(image, name))
            return None, arr
        pil = load_image(image, self.max_pixels, self.min_side, name=name)
        return pil, np.asarray(pil)

    def _choose(self, dets):
        if self.select == "last":
            return [dets[-1]]
        if self.select == "best":
            return [max(dets, key=lambda d: d[1])]
        if self.select == "largest":
            area = lambda d: (d[0][2] - d[0][0] + 1) * (d[0][3] - d[0][1] + 1)  # noqa: E731
            return [max(dets, key=lambda d: (area(d), d[1]))]
        return sorted(dets, key=lambda d: -d[1])

    def _align_landmarks(self, image, lm, score, box, n_faces, size) -> AlignResult:
        quad, qsize = alignment_quad(lm)
        crop = extract_aligned(image, quad, qsize, self.output_size, self.transform_size, self.enable_padding,
                               fast_pad=self.detect_size is not None)
        return AlignResult(
            status="ok",
            image=crop,
            landmarks=lm.astype(np.float32),
            quad=quad.astype(np.float32),
            score=score,
            n_faces=n_faces,
            box=None if box is None else np.asarray(box, dtype=np.int32),
            source_size=size,
        )

    def _wrap(self, results: list[AlignResult]):
        return results if self.select == "all" else results[0]
