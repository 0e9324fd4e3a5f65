"""dlib HOG face detection at a fraction of the original's cost.

The original recipe calls `detector(img, 1)`: dlib upsamples the photo 2x and scans an image
pyramid of it (each level 5/6 of the previous one) with an 80x80 fHOG window. A detection at level
l has a box of about 36 * 1.2**l px (in the photo's pixels): level 0 finds ~36 px faces, level 4
~75 px faces. The finest levels are the largest images, so they cost most of the scan (levels 0-2
are about 2/3 of it), and they can only hold faces smaller than a product keeps anyway.

`PyramidDetector` (the exact default) skips those levels and gives exactly what `detector(img, 1)`
gives for every detection whose box is at least `min_face` px on its shorter side: the same boxes,
scores, filter index and order. How (facts of dlib's Python API, checked by tests/test_align.py):

- `detector.run(resize_image(img, 2H+1, 2W+2), 0, 0.0)` is `detector.run(img, 1, 0.0)` before its
  boxes are mapped back with `pyramid_down(2).rect_down` (that is dlib's own upsampling);
- `pyramid_down(6)` applied k times to that image is the scan's level k, and the detector run on it
  (no upsampling) finds every detection of level >= k with the same score;
- a box is `rect_up(L, level)` of a fixed 73x73 box L in the level's pixels, rounded once; the
  detector run on level k maps with `rect_up(L, j)` from its own level j, so the box is recovered as
  L (the unique 73 px box that maps to it) and mapped again with `rect_up(L, k + j)` and
  `pyramid_down(2).rect_down`: dlib's own rounding (mapping the level-k box up naively is off by a
  pixel).

k is one level below the finest level whose boxes can reach `min_face` (so a face at the boundary
is never lost). Non-maximum suppression runs inside dlib on the detections it sees; it differs
from the original's only where a skipped box (under `min_face`, scored higher) overlapped a kept one,
which the original would then have dropped, or where an overlap sits exactly at dlib's threshold
and the rounding of the two frames decides it (neither happened on the bench and test photos).

`WindowDetector` (the speed mode, opt-in) scans a copy box-reduced by an integer factor to about
`detect_size` px and, only where that scan shows one clear face (at least one pyramid level above
its size floor, no other candidate within `margin` of its score, and any weak candidate at the floor
re-detected at its own, finer size and found clearly weaker), re-detects that face in a small window
resampled on the exact geometry of the original's pyramid levels around its size. Every other photo
(no face, several faces, a weak or floor-sized face, a close choice) takes the exact path. Boxes
are the original's in most cases and close otherwise (bench/align.py prints the landmark deviation
and counts "another face"). `WindowDetector.run_view` does the same on a photo decoded at reduced
scale (`ScaledView`: a JPEG's draft decode), the coarse copy made from that decode in gray and the
windows resampled from it; it returns None where the exact scan of the full photo must decide.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

#: side (px, inclusive) of a detection box at its own pyramid level (the 2x upsampled frame at level 0)
LEVEL_BOX = 73
#: the scan's pyramid ratio (dlib pyramid_down<6>)
RATIO = 6.0 / 5.0


class Detection(NamedTuple):
    """One HOG detection: box (left, top, right, bottom; inclusive px), score, filter index (0-4)."""

    box: tuple[int, int, int, int]
    score: float
    filter: int


def box_side(box) -> int:
    """Shorter side (px) of a dlib box (left, top, right, bottom; inclusive)."""
    left, top, right, bottom = (int(v) for v in box)
    return min(right - left + 1, bottom - top + 1)


def skip_levels(min_face: int) -> int:
    """Pyramid levels the exact scan may skip for `min_face`: one below the finest level whose
    boxes (~36 * 1.2**l px, + 2 px for rounding) can reach min_face (0 for min_face <= ~40)."""
    if min_face <= 0:
        return 0
    level = 0
    while LEVEL_BOX / 2 * RATIO**level + 2 < min_face:
        level += 1
    return max(level - 1, 0)


def _rect(dlib, box):
    return dlib.rectangle(*(int(v) for v in box))


def _tuple(r) -> tuple[int, int, int, int]:
    return (r.left(), r.top(), r.right(), r.bottom())


def level_box(dlib, pyr6, r) -> tuple[int, tuple[int, int, int, int]] | None:
    """(j, L): the level j and the 73 px level box L with `pyr6.rect_up(L, j) == r` (None if none)."""
    w = r.right() - r.left() + 1
    j0 = int(round(math.log(max(w, 1) / LEVEL_BOX) / math.log(RATIO)))
    for j in (j0, j0 - 1, j0 + 1):
        if j < 0:
            continue
        p = pyr6.point_down(dlib.dpoint(r.left(), r.top()), j)
        for dy in (0, -1, 1):
            for dx in (0, -1, 1):
                left, top = int(round(p.x)) + dx, int(round(p.y)) + dy
                cand = (left, top, left + LEVEL_BOX - 1, top + LEVEL_BOX - 1)
                if _tuple(pyr6.rect_up(_rect(dlib, cand), j)) == _tuple(r):
                    return j, cand
    return None


class PyramidDetector:
    """`detector(img, 1)` restricted to boxes of at least `min_face` px, at a fraction of its cost.

    run(arr) -> [Detection] in dlib's order (descending score); see the module docstring.
    min_face 0 (or a level count of 0) runs the plain `detector.run(img, 1, 0.0)`.
    """

    def __init__(self, detector, min_face: int = 64, dlib_module=None):
        import dlib as _dlib

        self.dlib = dlib_module or _dlib
        self.detector = detector
        self.min_face = int(min_face)
        self.levels = skip_levels(self.min_face)
        self._pyr6 = self.dlib.pyramid_down(6)
        self._pyr2 = self.dlib.pyramid_down(2)

    def run(self, arr: np.ndarray) -> list[Detection]:
        dlib = self.dlib
        if self.levels == 0:
            rects, scores, idx = self.detector.run(arr, 1, 0.0)
            dets = [Detection(_tuple(r), float(s), int(i)) for r, s, i in zip(rects, scores, idx)]
        else:
            h, w = arr.shape[:2]
            img = dlib.resize_image(np.ascontiguousarray(arr), 2 * h + 1, 2 * w + 2)  # dlib's own upsampling
            for _ in range(self.levels):
                img = self._pyr6(img)
            rects, scores, idx = self.detector.run(img, 0, 0.0)
            dets = []
            for r, s, i in zip(rects, scores, idx):
                found = level_box(dlib, self._pyr6, r)
                if found is None:  # cannot happen with dlib's 73 px boxes; keep the naive map
                    up = self._pyr6.rect_up(r, self.levels)
                else:
                    j, box = found
                    up = self._pyr6.rect_up(_rect(dlib, box), self.levels + j)
                dets.append(Detection(_tuple(self._pyr2.rect_down(up)), float(s), int(i)))
        return [d for d in dets if box_side(d.box) >= self.min_face]


class WindowDetector:
    """Speed mode: a coarse scan on a cheap copy of at most `detect_size` px (longest side), and,
    where that scan shows one clear, large face, that face re-detected in a window resampled on the
    geometry of the original's pyramid levels near its size (so its box lands on the original's
    grid); everywhere else the exact scan (`exact`, a PyramidDetector) decides.

    run(arr) -> [Detection] (descending score). The coarse copy is the photo box-reduced by an
    integer factor (`PIL.Image.reduce` by round(longest side / detect_size)); the coarse scan keeps
    candidates down to a score of `candidate_score` (below dlib's 0: weak or partly seen faces count
    too). The window path is taken only when the best candidate scores at least 0, was found
    `clear_levels` pyramid levels above the coarse scan's finest level (its face is then at least
    ~1.2**clear_levels x the smallest face the coarse scan sees, not a smaller face seen at the
    floor), its refinement finds a face of at least min_face, no other candidate scores within
    `margin` of it, and every other candidate at the floor, re-detected at its own and finer
    levels, scores more than `margin` below the refined face. Else the exact path runs (the photo
    fits detect_size, no candidate, a weak or floor-sized best, a close choice: group photos).

    What it cannot see: a face smaller than the coarse floor (~73 x longest side / detect_size px)
    in a photo whose only coarse candidate is one large face; the exact mode would pick that small
    face if it scored higher. bench/align.py counts "another face" on its photos and composites.
    """

    def __init__(self, detector, exact: PyramidDetector, detect_size: int = 512, candidate_score: float = -0.6,
                 clear_levels: int = 1, margin: float = 0.75, context: int = 32):
        self.dlib = exact.dlib
        self.detector = detector
        self.exact = exact
        self.min_face = exact.min_face
        self.detect_size = int(detect_size)
        self.candidate_score = float(candidate_score)
        self.clear_levels = int(clear_levels)
        self.margin = float(margin)
        self.context = int(context)
        self._pyr6 = exact._pyr6
        self._pyr2 = exact._pyr2
        self.last_path = "exact"

    def _exact(self, arr: np.ndarray, why: str) -> list[Detection]:
        self.last_path = f"exact ({why})"
        return self.exact.run(arr)

    def run(self, arr: np.ndarray, pil=None, only_best: bool = True) -> list[Detection]:
        """only_best False (faces 'all' or 'largest'): any other face candidate takes the exact path
        (the window path returns the best face only)."""
        from PIL import Image

        h, w = arr.shape[:2]
        factor = int(round(max(h, w) / self.detect_size))
        if factor <= 1:  # the photo fits detect_size: the exact scan
            return self._exact(arr, "fits")
        src = pil if pil is not None else Image.fromarray(arr, "RGB")
        small = np.asarray(src.reduce(factor))  # a box filter: a few ms, enough for the coarse scan
        found, why = self._window(small, factor, ScaledView(arr), only_best)
        if found is None:
            return self._exact(arr, why)
        self.last_path = "window"
        return [found]

    def run_view(self, view: "ScaledView", only_best: bool = True) -> list[Detection] | None:
        """The window path on a photo decoded at reduced scale (`view`, a JPEG's draft decode):
        the coarse scan on a gray copy of `detect_size` px (longest side) made from it, the
        re-detection in windows resampled from it (boxes in the photo's px). None where the exact
        scan of the full photo must decide (`last_path` says why): the caller decodes it fully."""
        from PIL import Image

        w, h = view.size
        factor = max(w, h) / self.detect_size  # photo px per coarse px
        if factor < 1.5:
            self.last_path = "exact (fits)"
            return None
        size = (max(1, round(w / factor)), max(1, round(h / factor)))
        gray = (view.pil if view.pil is not None else Image.fromarray(view.arr, "RGB")).convert("L")
        small = np.asarray(gray.resize(size, Image.Resampling.BOX))
        found, why = self._window(small, factor, view, only_best)
        if found is None:
            self.last_path = f"exact ({why})"
            return None
        self.last_path = "window (scaled)"
        return [found]

    def _window(self, small: np.ndarray, factor: float, view: "ScaledView",
                only_best: bool) -> tuple[Detection | None, str]:
        """(the one clear face, '') from the coarse scan of `small` (photo px = coarse px x factor),
        refined on `view`; (None, why) where the exact scan must decide."""
        rects, scores, _ = self.detector.run(small, 0, self.candidate_score)
        if not len(rects):
            return None, "no face"
        r, score = rects[0], float(scores[0])  # dlib lists them by descending score
        side = r.right() - r.left() + 1
        if score < 0.0 or side < LEVEL_BOX * RATIO**self.clear_levels - 1:
            return None, "weak" if score < 0.0 else "near the floor"
        found = self._refine(view, self._photo_box(r, factor))
        if found is None or box_side(found.box) < self.min_face:
            return None, "refinement"
        floor = LEVEL_BOX * RATIO - 1  # coarse boxes under this come from the coarse scan's finest level
        for o, o_score in zip(list(rects)[1:], list(scores)[1:]):
            if _iou(_tuple(o), _tuple(r)) >= 0.2:  # the same face seen by another filter / offset
                continue
            if not only_best or score - float(o_score) < self.margin:  # another face that may win
                return None, "several candidates"
            if o.right() - o.left() + 1 < floor:
                # a weak candidate at the floor may be a smaller face that scores higher at its own
                # size: re-detect it there (one level finer too) and compare
                other = self._refine(view, self._photo_box(o, factor), finer=True)
                if other is not None and other.score > found.score - self.margin:
                    return None, "several candidates"
        return found, ""

    @staticmethod
    def _photo_box(r, factor: float) -> tuple[int, int, int, int]:
        """A coarse box (dlib rectangle in the reduced copy) in photo px."""
        return (round(r.left() * factor), round(r.top() * factor), round((r.right() + 1) * factor) - 1,
                round((r.bottom() + 1) * factor) - 1)

    def _refine(self, view: "ScaledView", box, finer: bool = False) -> Detection | None:
        """The best detection of the face in `box` (photo px) over the levels near its size, each
        level's window resampled from the photo (or its reduced decode, `view`) so its pixels sit
        where the original's do."""
        dlib = self.dlib
        w, h = view.size
        side = max(box[2] - box[0], box[3] - box[1]) + 1
        # photo px -> upsampled px (dlib resize_image to 2H+1 x 2W+2 maps index i to i*(2W+1)/(W-1))
        sx, sy = (2 * w + 1) / max(w - 1, 1), (2 * h) / max(h - 1, 1)
        estimate = math.log(max(side * 2.0 / LEVEL_BOX, 1.0)) / math.log(RATIO)
        level = int(round(estimate))
        # the level the box's size points to, then its nearer neighbour, then the farther one only
        # where those two found nothing (one window fewer on most photos, the same boxes on
        # bench/align.py's photos and composites)
        near = 1 if estimate >= level else -1
        levels = (level - 2, level - 1, level) if finer else (level, level + near, level - near)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        best: Detection | None = None
        for k, lev in enumerate(levels):
            if lev < 0 or (k == 2 and not finer and best is not None):
                continue
            a = RATIO**lev  # level px -> upsampled px: u = a*p + b
            b = 0.3 * (a - 1) / (RATIO - 1)
            # window in level px: the face (73 px) with `context` px each side
            half = LEVEL_BOX / 2 + self.context
            pcx, pcy = ((cx * sx) - b) / a, ((cy * sy) - b) / a
            # the window starts on the fHOG cell grid (8 px) of the level, so cells sit where the
            # original's do
            x0, y0 = max(int(math.floor((pcx - half) / 8)) * 8, 0), max(int(math.floor((pcy - half) / 8)) * 8, 0)
            # the level's own size: the upsampled image's size mapped down `lev` times
            full = self._pyr6.rect_down(dlib.rectangle(0, 0, 2 * w + 1, 2 * h), lev)
            lw, lh = full.right() + 1, full.bottom() + 1
            x1, y1 = min(int(math.ceil(pcx + half)), lw), min(int(math.ceil(pcy + half)), lh)
            if x1 - x0 < LEVEL_BOX or y1 - y0 < LEVEL_BOX:
                continue
            # level index p -> photo pixel centre: (a*p + b)/s + 0.5; PIL's box is in centre coords
            ax, ay = a / sx, a / sy
            bx, by = b / sx + 0.5 - 0.5 * ax, b / sy + 0.5 - 0.5 * ay
            pbox = (bx + ax * x0, by + ay * y0, bx + ax * x1, by + ay * y1)
            win = _resample(view.arr, (x1 - x0, y1 - y0), view.to_view(pbox))
            rects, scores, idx = self.detector.run(win, 0, 0.0)
            for r, s, i in zip(rects, scores, idx):
                if r.right() - r.left() + 1 != LEVEL_BOX:  # only this level's boxes (on its grid)
                    continue
                lbox = (r.left() + x0, r.top() + y0, r.right() + x0, r.bottom() + y0)
                up = self._pyr6.rect_up(_rect(dlib, lbox), lev)
                out = _tuple(self._pyr2.rect_down(up))
                if _iou(out, box) < 0.3:
                    continue
                if best is None or s > best.score:
                    best = Detection(out, float(s), int(i))
        return best


class ScaledView:
    """A photo as an HxWx3 uint8 array `arr` decoded at 1/scale: its pixel (i, j) stands for the
    photo's pixel (scale*i + offset[0], scale*j + offset[1]) (a JPEG's draft decode: offset
    (scale-1)/2). size: the photo's (width, height). ScaledView(arr): the photo itself."""

    def __init__(self, arr: np.ndarray, scale: int = 1, offset: tuple[float, float] = (0.0, 0.0),
                 size: tuple[int, int] | None = None):
        self.arr, self.scale, self.offset = arr, int(scale), (float(offset[0]), float(offset[1]))
        self.pil = None  # the PIL image of `arr`, where the caller has it
        self.size = size if size is not None else (arr.shape[1], arr.shape[0])

    def to_view(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A region in the photo's PIL coordinates (pixel i spans [i, i+1]) in the view's."""
        if self.scale == 1 and self.offset == (0.0, 0.0):
            return box
        s, (ox, oy) = self.scale, self.offset
        return ((box[0] - 0.5 - ox) / s + 0.5, (box[1] - 0.5 - oy) / s + 0.5,
                (box[2] - 0.5 - ox) / s + 0.5, (box[3] - 0.5 - oy) / s + 0.5)


def _resample(arr: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """PIL bilinear resize of the region `box` (pixel-centre coordinates, may leave the image: the
    edge pixels repeat, as dlib's resampling does) of an HxWx3 array to `size`."""
    from PIL import Image

    h, w = arr.shape[:2]
    left, top = int(math.floor(box[0])) - 2, int(math.floor(box[1])) - 2
    right, bottom = int(math.ceil(box[2])) + 2, int(math.ceil(box[3])) + 2
    crop = arr[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)]
    pad = ((max(-top, 0), max(bottom - h, 0)), (max(-left, 0), max(right - w, 0)), (0, 0))
    if any(p for pair in pad for p in pair):
        crop = np.pad(crop, pad, mode="edge")
    img = Image.fromarray(np.ascontiguousarray(crop), "RGB")
    shifted = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=shifted))


def _iou(a, b) -> float:
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)
