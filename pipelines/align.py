"""Align stage: decoded pixels -> the 256x256 crop, and the PIL part of the task transform.

`AlignFaces` is a plain callable class on a batch dict; the pipeline runs it in a CPU actor pool so
the dlib models load once per actor. It runs `DecodeImages` first (in the same actor, so only
compressed bytes travel between Ray operators) and then, per row:
- mode 'dlib': `psp_core.align.FaceAligner` (FFHQ alignment; 'no_face' etc. become row statuses);
- mode 'none': resize to 256x256 exactly as the task transform would (sketches, segmentation maps,
  pre-aligned faces, cars, churches, animals), no detection; `model_input` is then prepared from the
  decoded image itself (a task of another input size, cars' 192x256, resizes it once, as its
  transform does, not the 256x256 crop);
- with a `task`: `Task.prepare` on the crop (convert, resize, super-resolution degradation, seg label
  check), so the model actor gets uint8 pixels and does only tensor work on its device. A row whose
  prepare fails gets status 'invert_error' ("input transform failed"), as before the split.

Output columns are fixed-shape so Ray stores them as tensor columns: `aligned` uint8 [B,256,256,3]
(the crop; zeros when the row failed; left out with keep_aligned=False), `model_input` uint8
[B, *Task.prepared_shape] (with a task), `landmarks` float32 [B,68,2] and `quad` [B,4,2] (NaN when
absent), `face_score` float32 [B] (NaN when absent).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from pipelines.decode import DecodeImages
from pipelines.sources import object_column
from psp_core.images import DEFAULT_DECODE_TIMEOUT_S

CROP_SIZE = 256


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
    landmarks, quad, aligned, model_input (see module docstring). Rows that failed upstream pass
    through.

    mode: 'dlib' or 'none'. gray: sketch/seg task (only used with mode 'none').
    aligner_kwargs: passed to `FaceAligner` (e.g. detect_size).
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
    ):
        if mode not in ("dlib", "none"):
            raise ValueError(f"align mode {mode!r}: expected 'dlib' or 'none'")
        self.mode = mode
        self.gray = gray
        self.stage_clock = stage_clock
        self.decode = DecodeImages(stage_clock=stage_clock, timeout_s=decode_timeout_s)
        self.task = None
        if task is not None:
            from psp_core.tasks import get_task

            self.task = get_task(task)
        self.resize_factor = resize_factor
        self.keep_aligned = keep_aligned or self.task is None
        self.aligner = None
        if mode == "dlib":
            from psp_core.align import FaceAligner

            self.aligner = FaceAligner(output_size=CROP_SIZE, **dict(aligner_kwargs or {}))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = self.decode(batch)
        start = time.perf_counter()
        n = len(decoded["source_uri"])
        status = list(decoded["status"])
        error = list(decoded["error"])
        aligned = np.zeros((n, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
        landmarks = np.full((n, 68, 2), np.nan, dtype=np.float32)
        quad = np.full((n, 4, 2), np.nan, dtype=np.float32)
        score = np.full(n, np.nan, dtype=np.float32)
        prepared = None
        if self.task is not None and self.aligner is None:
            prepared = np.zeros((n, *self.task.prepared_shape), dtype=np.uint8)
        for i, rgb in enumerate(decoded["image"]):
            if status[i] != "ok":
                continue
            uri = decoded["source_uri"][i]
            try:
                if self.aligner is None:
                    aligned[i] = resize_unaligned(rgb, self.gray)
                    if prepared is not None:
                        self._prepare_row(prepared, i, rgb, status, error, uri)
                    continue
                result = self.aligner(rgb, name=str(uri))
                if result.status != "ok":
                    status[i], error[i] = result.status, result.error or f"{uri}: {result.status}"
                    continue
                aligned[i] = np.asarray(result.image.convert("RGB"), dtype=np.uint8)
                landmarks[i] = result.landmarks
                quad[i] = result.quad
                score[i] = np.nan if result.score is None else result.score
            except Exception as e:  # an aligner bug must not lose the row
                status[i] = "align_error"
                error[i] = f"{uri}: alignment failed ({type(e).__name__}: {e})"
        out = {k: v for k, v in decoded.items() if k != "image"}
        if prepared is not None:
            out["model_input"] = prepared
        elif self.task is not None:
            out["model_input"] = self._prepare(aligned, status, error, decoded["source_uri"])
        out.update(
            status=object_column(status),
            error=object_column(error),
            landmarks=landmarks,
            quad=quad,
            face_score=score,
        )
        if self.keep_aligned:
            out["aligned"] = aligned
        if self.stage_clock is not None:
            self.stage_clock.record("align", n, time.perf_counter() - start)
        return out

    def _prepare(self, aligned: np.ndarray, status: list, error: list, uris) -> np.ndarray:
        """The PIL part of the task transform per ok row (a failing row fails alone)."""
        prepared = np.zeros((len(aligned), *self.task.prepared_shape), dtype=np.uint8)
        for i in range(len(aligned)):
            if status[i] == "ok":
                self._prepare_row(prepared, i, aligned[i], status, error, uris[i])
        return prepared

    def _prepare_row(self, prepared: np.ndarray, i: int, image: np.ndarray, status: list, error: list, uri) -> None:
        """prepared[i] = Task.prepare(image); a failure makes row i 'invert_error' alone."""
        try:
            prepared[i] = self.task.prepare(image, self.resize_factor)
        except Exception as e:
            status[i] = "invert_error"
            error[i] = f"{uri}: input transform failed ({type(e).__name__}: {e})"
