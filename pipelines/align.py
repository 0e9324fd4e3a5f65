"""Align stage: decoded pixels -> the 256x256 crop, and the PIL part of the task transform.

`AlignFaces` is a plain callable class on a batch dict; the pipeline runs it in a CPU actor pool so
the dlib models load once per actor. It runs `DecodeImages` first (in the same actor, so only
compressed bytes travel between Ray operators; in the speed mode, `--align-detect-size`, a JPEG is
only opened there and decoded by the aligner at the reduced scale its face allows) and then, per row:
- mode 'dlib': `psp_core.align.FaceAligner` (FFHQ alignment; 'no_face' etc. become row statuses);
- mode 'none': resize to 256x256 exactly as the task transform would (sketches, segmentation maps,
  pre-aligned faces, cars, churches, animals), no detection; `model_input` is then prepared from the
  decoded image itself (a task of another input size, cars' 192x256, resizes it once, as its
  transform does, not the 256x256 crop);
- with a `task`: `Task.prepare` on the crop (convert, resize, super-resolution degradation, seg label
  check), so the model actor gets uint8 pixels and does only tensor work on its device. A row whose
  prepare fails gets status 'invert_error' ("input transform failed"), as before the split.

Faces (`faces`, mode 'dlib'): only faces whose box is at least `min_face` px on its shorter side
count (default 64; every mode). 'best' (highest detector score among them; the original's pSp
choice made explicit, the default), 'largest' (largest box), or 'all': every such face becomes
its own row, best score first (`face_index` 0, 1,
...), each with the input's source columns repeated. So a batch of B inputs may come out with more
rows. An input without a face (or whose faces are all under `min_face`: status no_face, the error
says so), and one that failed before alignment, stays one image-level row with face_index -1.

Output columns are fixed-shape so Ray stores them as tensor columns: `aligned` uint8 [R,256,256,3]
(the crop; zeros when the row failed; left out with keep_aligned=False), `model_input` uint8
[R, *Task.prepared_shape] (with a task), `landmarks` float32 [R,68,2] and `quad` [R,4,2] (NaN when
absent), `face_score` float32 [R] (NaN when absent), `face_index` int32 [R] (-1 without a face),
`face_count` int32 [R] (the input's face rows; -1 without a face), `face_box` float32 [R,4] (dlib's
box left, top, right, bottom, inclusive pixels of the upright image; NaN without a face).
R = B except with faces='all'.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from pipelines.decode import DecodeImages
from pipelines.read import object_column
from pipelines.reuse import REUSE_COLUMNS, stored_results
from psp_core.images import DEFAULT_DECODE_TIMEOUT_S, ImageDecodeError, JpegDraft

CROP_SIZE = 256
FACE_MODES = ("best", "largest", "all")
# Every --faces mode keeps only faces whose detection box is at least this many px on its shorter
# side (best / largest choose among them). The FFHQ crop spans about 1.9x the box, so a 64 px box is
# already a ~120 px crop upscaled 2x into the 256 px model input; smaller faces (the HOG detector,
# upsample 1, finds boxes down to about 36 px) invert mostly to blur. Detection skips the pyramid
# levels that only hold smaller faces (about half the detector's cost; psp_core.face_detection).
# --min-face 0 keeps every detected face (and scans every level, as the original).
DEFAULT_MIN_FACE = 64


def box_side(box) -> int:
    """Shorter side (px) of a dlib box (left, top, right, bottom; inclusive)."""
    left, top, right, bottom = (int(v) for v in box)
    return min(right - left + 1, bottom - top + 1)


def _take(values, idx: np.ndarray):
    """Column `values` (ndarray or sequence) at row indices `idx` (rows repeated for faces)."""
    if isinstance(values, np.ndarray):
        return values[idx]
    return object_column([values[i] for i in idx])


def resize_unaligned(rgb: np.ndarray, gray: bool) -> np.ndarray:
    """`--align none`: HxWx3 uint8 -> 256x256x3 uint8, bilinear as the task transform's Resize.

    For sketch/seg tasks (`gray`) the image is converted to L before resizing, as the transform does,
    and stored as three equal channels (RGB->L of equal channels gives the L values back exactly).
    """
    img = Image.fromarray(rgb, "RGB")
    if gray:
        small = np.asarray(img.convert("L").resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR))
        return np.repeat(small[:, :, None], 3, axis=2)
    return np.asarray(img.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


class AlignFaces:
    """Batch dict stage: decode + align.

    In: columns source_uri, data, source_sha256, status, error (from the read stage).
    Out: source_uri, source_sha256, source_width, source_height, status, error, face_score,
    face_index, face_count, face_box, landmarks, quad, aligned, model_input (see module docstring),
    one row per input, or per kept face with faces='all'. Rows that failed upstream pass through.

    mode: 'dlib' or 'none'. gray: sketch/seg task (only used with mode 'none').
    aligner_kwargs: passed to `FaceAligner` (e.g. detect_size).
    faces: 'best' | 'largest' | 'all' (see the module docstring); min_face: the smallest box side
    (px) considered by every faces mode (passed to `FaceAligner`). A row that carries the alignment
    an earlier run stored for the same bytes (`pipelines.reuse.REUSE_COLUMNS`: its stored_sha256
    equals the row's source_sha256) is aligned from the stored landmarks, without detection (the
    same crop), and counted as stage 'align_reused'; the columns are not handed on.
    decode_timeout_s: time limit of one image's decode (`DecodeImages`).
    task: dataset_type whose `prepare` fills `model_input` (None: no model_input column).
    resize_factor: super-resolution factor for `prepare`. keep_aligned: also hand on the crop
    (`--metrics` and `--save-aligned` need it after the model; otherwise it would only travel).
    """

    def __init__(
        self,
        mode: str = "dlib",
        gray: bool = False,
        aligner_kwargs: Mapping[str, Any] | None = None,
        stage_clock: Any = None,
        decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S,
        task: str | None = None,
        resize_factor: int | None = None,
        keep_aligned: bool = True,
        faces: str = "best",
        min_face: int = DEFAULT_MIN_FACE,
    ):
        if mode not in ("dlib", "none"):
            raise ValueError(f"align mode {mode!r}: expected 'dlib' or 'none'")
        check_faces(faces, mode)
        if isinstance(min_face, bool) or not isinstance(min_face, (int, np.integer)) or min_face < 0:
            raise ValueError(f"min_face={min_face!r}: expected a number of pixels >= 0 (e.g. {DEFAULT_MIN_FACE})")
        self.faces = faces
        self.min_face = int(min_face)
        self.mode = mode
        self.gray = gray
        self.stage_clock = stage_clock
        # the speed mode decodes a JPEG at the reduced scale its face allows (psp_core.align.FaceAligner)
        speed = mode == "dlib" and (aligner_kwargs or {}).get("detect_size") is not None
        self.decode = DecodeImages(stage_clock=stage_clock, timeout_s=decode_timeout_s, lazy_jpeg=speed)
        self.task = None
        if task is not None:
            from psp_core.tasks import get_task

            self.task = get_task(task)
        self.resize_factor = resize_factor
        self.keep_aligned = keep_aligned or self.task is None
        self.aligner = None
        if mode == "dlib":
            from psp_core.align import FaceAligner

            kwargs = {"min_face": self.min_face, **dict(aligner_kwargs or {})}
            self.aligner = FaceAligner(output_size=CROP_SIZE, select=faces, **kwargs)
        self._reused, self._reused_s = 0, 0.0

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = self.decode(batch)
        start = time.perf_counter()
        n = len(decoded["source_uri"])
        self._reused, self._reused_s = 0, 0.0
        rows = [self._align(decoded, i) for i in range(n)]  # per input: its output rows
        take = np.array([i for i, found in enumerate(rows) for _ in found], dtype=np.int64)
        flat = [r for found in rows for r in found]
        m = len(flat)
        # Mode 'none' prepares the model input from the decoded image: no crops unless kept.
        need_crops = self.keep_aligned or self.aligner is not None
        aligned = np.zeros((m, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8) if need_crops else None
        landmarks = np.full((m, 68, 2), np.nan, dtype=np.float32)
        quad = np.full((m, 4, 2), np.nan, dtype=np.float32)
        score = np.full(m, np.nan, dtype=np.float32)
        face_index = np.full(m, -1, dtype=np.int32)
        face_count = np.full(m, -1, dtype=np.int32)
        face_box = np.full((m, 4), np.nan, dtype=np.float32)
        status, error = [], []
        for j, (st, err, crop, result, k, count) in enumerate(flat):
            status.append(st)
            error.append(err)
            if crop is not None and aligned is not None:
                aligned[j] = crop
            if result is not None:
                landmarks[j] = result.landmarks
                quad[j] = result.quad
                score[j] = np.nan if result.score is None else result.score
                face_index[j], face_count[j] = k, count
                if result.box is not None:
                    face_box[j] = result.box
        out = {k: v for k, v in decoded.items() if k != "image" and k not in REUSE_COLUMNS}
        if m != n:  # faces='all': the source columns repeat on each face row
            out = {k: _take(v, take) for k, v in out.items()}
        if self.task is not None:
            # Unaligned inputs are prepared from the decoded image itself (one resize straight to
            # the task's input size, e.g. 192x256 for cars), aligned faces from their crop.
            sources = decoded["image"] if self.aligner is None else aligned
            out["model_input"] = self._prepare(sources, status, error, out["source_uri"])
        out.update(
            status=object_column(status),
            error=object_column(error),
            landmarks=landmarks,
            quad=quad,
            face_score=score,
            face_index=face_index,
            face_count=face_count,
            face_box=face_box,
        )
        if self.keep_aligned:
            out["aligned"] = aligned
        if self.stage_clock is not None:
            self.stage_clock.record("align", m, time.perf_counter() - start)
            if self._reused:  # inputs aligned from a stored alignment, without detection
                self.stage_clock.record("align_reused", self._reused, self._reused_s)
        return out

    def _align(self, decoded: Mapping[str, Any], i: int) -> list[tuple]:
        """The output rows of input `i`: [(status, error, crop or None, AlignResult or None,
        face_index, face_count)], one per kept face, or one image-level row."""
        status, error = decoded["status"][i], decoded["error"][i]
        if status != "ok":
            return [(status, error, None, None, -1, -1)]
        uri = decoded["source_uri"][i]
        rgb = decoded["image"][i]
        try:
            if self.aligner is None:  # the model input is prepared from `rgb`: a crop only if kept
                crop = resize_unaligned(rgb, self.gray) if self.keep_aligned else None
                return [(status, error, crop, None, -1, -1)]
            stored = self._stored(decoded, i)
            if stored is not None and isinstance(rgb, JpegDraft):  # the crop from stored landmarks
                try:
                    rgb = np.asarray(rgb.decode(1))
                except ImageDecodeError as e:
                    return self._undecodable(decoded, i, e.status, e.message)
            if stored is not None:
                start = time.perf_counter()
                found = stored_results(stored, rgb, self.aligner, str(uri))
                self._reused += 1
                self._reused_s += time.perf_counter() - start
            else:
                found = self.aligner(rgb, name=str(uri))
            results = found if isinstance(found, list) else [found]
            if results[0].status != "ok":
                r = results[0]
                if isinstance(rgb, JpegDraft) and r.source_size is None:  # its pixels did not decode
                    return self._undecodable(decoded, i, r.status, r.error)
                return [(r.status, r.error or f"{uri}: {r.status}", None, None, -1, -1)]
            if self.faces == "all":
                kept = [r for r in results if r.box is None or box_side(r.box) >= self.min_face]
                if not kept:
                    sides = ", ".join(str(box_side(r.box)) for r in results)
                    msg = (f"{uri}: {len(results)} face(s) found, all smaller than the minimum face size "
                           f"{self.min_face} px (box sides {sides} px); lower --min-face to keep them")
                    return [("no_face", msg, None, None, -1, -1)]
                results = kept
            return [(status, error, np.asarray(r.image.convert("RGB"), dtype=np.uint8), r, k, len(results))
                    for k, r in enumerate(results)]
        except Exception as e:  # an aligner bug must not lose the row
            return [("align_error", f"{uri}: alignment failed ({type(e).__name__}: {e})", None, None, -1, -1)]

    @staticmethod
    def _undecodable(decoded: Mapping[str, Any], i: int, status: str, error: str) -> list[tuple]:
        """The row of a JPEG whose header read fine (DecodeImages with lazy_jpeg) but whose pixels
        did not decode: as `DecodeImages` reports it (size -1)."""
        decoded["source_width"][i] = decoded["source_height"][i] = -1
        return [(status, error, None, None, -1, -1)]

    def _stored(self, decoded: Mapping[str, Any], i: int) -> bytes | None:
        """The stored face rows of input `i` (`stored_faces`) when the plan attached an alignment
        made from the same bytes, else None."""
        if "stored_sha256" not in decoded:
            return None
        sha = decoded["stored_sha256"][i]
        return decoded["stored_faces"][i] if sha and sha == decoded["source_sha256"][i] else None

    def _prepare(self, images, status: list, error: list, uris) -> np.ndarray:
        """The PIL part of the task transform per ok row (a failing row fails alone, as
        'invert_error')."""
        prepared = np.zeros((len(images), *self.task.prepared_shape), dtype=np.uint8)
        for i in range(len(images)):
            if status[i] != "ok":
                continue
            try:
                self.task.prepare(images[i], self.resize_factor, out=prepared[i])
            except Exception as e:
                prepared[i] = 0
                status[i] = "invert_error"
                error[i] = f"{uris[i]}: input transform failed ({type(e).__name__}: {e})"
        return prepared


def check_faces(faces: str, align: str = "dlib") -> None:
    """ValueError unless `faces` is one of FACE_MODES and applies to the `align` mode ('all' and
    'largest' choose among detected faces: they need dlib alignment)."""
    if faces not in FACE_MODES:
        raise ValueError(f"faces={faces!r}: expected one of {', '.join(FACE_MODES)}")
    if faces != "best" and align != "dlib":
        raise ValueError(
            f"--faces {faces} chooses among detected faces, but --align {align} detects none: use "
            "--align dlib, or --faces best"
        )
