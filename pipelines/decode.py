"""Decode stage: image bytes -> RGB pixels, robustly (EXIF transpose, mode conversion, size guard).

`DecodeImages` is a plain callable on a batch dict. It never raises for a bad image: the row gets
`status` decode_error / too_large / too_small / decode_timeout and a readable `error`. The content
decides (`psp_core.images`), not the file name: a PNG named `.jpg`, a GIF (first frame), AVIF, and
HEIC where the pillow-heif plugin is installed are images. The pixel arrays it produces
are variable-sized, so the pipeline runs it inside the align actor (only compressed bytes cross
the operator boundary; see `pipelines.align.AlignFaces`).

With lazy_jpeg (the align stage's speed mode, `--align-detect-size`) an upright RGB JPEG is not
decoded here: its header is read and checked (size guards, orientation) and its `image` is a
`psp_core.images.JpegDraft`, which the speed mode's aligner decodes at the reduced scale its face
allows (errors in the pixel data then become the row's status there).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipelines.read import object_column
from psp_core.images import DEFAULT_DECODE_TIMEOUT_S, ImageDecodeError, load_image, open_jpeg_draft


class DecodeImages:
    """Batch dict stage: `data` (bytes) -> `image` (uint8 HxWx3 array, or None when not decoded).

    In: columns source_uri, data, status, error (rows whose status is not 'ok' pass through).
    Out: the same columns minus `data`, plus `image`, `source_width`, `source_height` (int32, -1
    when undecodable). `error` is '' when there is none (uniform Arrow types across blocks).
    timeout_s: time limit of one image's decode (None: none); over it the row is 'decode_timeout'.
    lazy_jpeg: an upright RGB JPEG's `image` is a `JpegDraft` (header checked, pixels not decoded;
    see the module docstring), for a stage in the same process that decodes it (never across Ray).
    """

    def __init__(self, stage_clock: Any = None, timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S,
                 lazy_jpeg: bool = False):
        self.stage_clock = stage_clock
        self.timeout_s = timeout_s
        self.lazy_jpeg = lazy_jpeg

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["source_uri"])
        status = list(batch["status"])
        error = list(batch["error"])
        images: list[Any] = [None] * n
        widths = np.full(n, -1, dtype=np.int32)
        heights = np.full(n, -1, dtype=np.int32)
        for i, data in enumerate(batch["data"]):
            if status[i] != "ok":
                continue
            uri = batch["source_uri"][i]
            draft = open_jpeg_draft(data, name=str(uri), timeout_s=self.timeout_s) if self.lazy_jpeg else None
            if draft is not None:
                widths[i], heights[i] = draft.size
                images[i] = draft
                continue
            try:
                img = load_image(bytes(data), name=str(uri), timeout_s=self.timeout_s)
                widths[i], heights[i] = img.size
                images[i] = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except ImageDecodeError as e:
                status[i] = getattr(e, "status", "decode_error") or "decode_error"
                error[i] = getattr(e, "message", None) or f"{uri}: {e}"
            except Exception as e:  # a decoder bug must not lose the row
                status[i] = "decode_error"
                error[i] = f"{uri}: cannot decode image ({type(e).__name__}: {e})"
        out = {k: v for k, v in batch.items() if k != "data"}
        out["status"] = object_column(status)
        out["error"] = object_column(error)
        out["image"] = object_column(images)
        out["source_width"] = widths
        out["source_height"] = heights
        if self.stage_clock is not None:
            self.stage_clock.record("decode", n, time.perf_counter() - start)
        return out
