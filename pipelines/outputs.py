"""Outputs stage: the model stage's arrays -> PNG/JPEG, metrics, identity distance, the output table.

`EncodeOutputs` is a plain callable class on a batch dict that runs in its own CPU actor pool after
the model actors (the dlib face descriptor for identity distance loads once per actor), so a cluster
adds CPU pods, not GPUs, when encoding or `--metrics` cost more than the model. Per ok row it encodes
`image` (and `mix_images`, and with `--save-aligned` the crop) as PNG (`encode_png`: fpng when
installed, else Pillow at zlib level 1; lossless either way) or JPEG (`JPEG_QUALITY`), computes mse/psnr/ssim and
the identity distance between the crop (`aligned`) and the 256x256 reconstruction (`image256`, or
`image` when that is 256), and builds the table with `schemas.columns_to_table`, so every output
file has the same schema. A row whose encoding fails becomes 'invert_error' alone.

In: the columns `pipelines.model.InvertFaces` hands on (see its module docstring), with the face
columns of `pipelines.align.AlignFaces` (face_index, face_count, face_box; -1 / NaN without a face).
Out: a pyarrow table of the output schema, one row per input row; `image_id` is
`schemas.ids.face_image_id(source_uri, face_index)` and `source_id` `image_id_for(source_uri)`.
"""
from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

#: `--images jpeg`: Pillow's JPEG at quality 95 with its default 4:2:0 chroma subsampling (lossy;
#: a 1024² face ≈ 10 ms on one core, a few times smaller than the PNG).
JPEG_QUALITY = 95
#: The PNG encoders `encode_png` can use: fpng (SIMD, ≈ 20x faster than zlib level 1 at 1024²,
#: files ≈ 5 % larger) and Pillow's zlib at level 1 (the reference, and the fallback).
PNG_IMPLS = ("auto", "fpng", "pillow")
_fpng_module: Any = None


def _fpng():
    """The `fpng` module, or None when it cannot be imported (then PNGs come from Pillow)."""
    global _fpng_module
    if _fpng_module is None:
        try:
            import fpng

            _fpng_module = fpng
        except Exception:  # noqa: BLE001 - an optional speed-up: any import failure means Pillow
            _fpng_module = False
    return _fpng_module or None


def encode_png(pixels: np.ndarray, impl: str = "auto") -> bytes:
    """uint8 HxWx3 (RGB) or HxW / HxWx1 (grayscale) -> lossless PNG bytes.

    impl: 'fpng' (RGB only), 'pillow' (zlib level 1: the reference), or 'auto' (fpng for RGB when
    it is installed, else Pillow). Every impl decodes to exactly `pixels`.
    """
    if impl not in PNG_IMPLS:
        raise ValueError(f"encode_png: impl={impl!r}; expected one of {', '.join(PNG_IMPLS)}")
    a = np.asarray(pixels)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3))):
        raise ValueError(f"encode_png: expected uint8 HxWx3 or HxW pixels, got {a.dtype} {a.shape}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    rgb = a.ndim == 3
    if impl == "fpng" and not rgb:
        raise ValueError("encode_png: fpng writes RGB only; use impl='pillow' for grayscale")
    fpng = _fpng() if rgb and impl != "pillow" else None
    if impl == "fpng" and fpng is None:
        raise ValueError("encode_png: impl='fpng' but the fpng package cannot be imported (pip install fpng)")
    if fpng is not None:
        return fpng.from_ndarray(np.ascontiguousarray(a))
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), "RGB" if rgb else "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_image(rgb: np.ndarray, fmt: str) -> bytes | None:
    """uint8 HxWx3 -> PNG (`encode_png`) / JPEG (`JPEG_QUALITY`) bytes (None for 'none')."""
    if fmt == "none":
        return None
    if fmt == "png":
        return encode_png(rgb)
    if fmt != "jpeg":
        raise ValueError(f"encode_image: fmt={fmt!r}; expected 'png', 'jpeg' or 'none'")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def outputs_resources(cluster_resources: Mapping[str, float], actors: int | None = None) -> dict[str, Any]:
    """What each outputs actor requests, and how many there may be.

    One CPU per actor on a cluster with >= 8 CPUs (PNG encoding and metrics are single-threaded),
    a quarter CPU on small machines so read and align tasks are not starved. `actors`: at most
    this many (None: half the cluster's CPUs, at least 1; Ray Data starts one and adds actors
    while their input queue grows).
    """
    cpus = float(cluster_resources.get("CPU", 0) or 0)
    if actors is not None and actors < 1:
        raise ValueError(f"output actors={actors}: expected >= 1")
    return {
        "num_cpus": 1 if cpus >= 8 else 0.25,
        "actors": int(actors) if actors is not None else max(1, int(cpus // 2)),
    }


def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class EncodeOutputs:
    """Batch dict stage: model outputs -> an output-schema table (one row per input row).

    task: dataset_type (recorded per row; metrics only for photo tasks). run_id, code_version:
    recorded per row. n_styles: the model's (the schema's w_plus shape). images: 'png' | 'jpeg' |
    'none'. metrics: mse/psnr/ssim/identity distance (needs the `aligned` column). save_aligned:
    store the crop as PNG. stage_clock: records stage 'outputs' with the final status counts.
    """

    def __init__(
        self,
        task: str,
        run_id: str,
        n_styles: int,
        images: str = "png",
        metrics: bool = False,
        save_aligned: bool = False,
        code_version: str | None = None,
        stage_clock: Any = None,
    ):
        from pipelines.config import code_version as _code_version
        from psp_core.tasks import get_task

        self.task = get_task(task)
        self.run_id = run_id
        self.n_styles = int(n_styles)
        self.images = images
        self.metrics = bool(metrics) and self.task.label_nc == 0
        self.save_aligned = save_aligned
        self.code_version = code_version or _code_version()
        self.stage_clock = stage_clock
        self._identity = None
        self._identity_error: str | None = None

    def _identity_distance(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """dlib face-descriptor distance between two uint8 crops (None if unavailable)."""
        if self._identity_error is not None:
            return None
        try:
            from psp_core.identity import identity_distance

            if self._identity is None:
                from psp_core.identity import FaceDescriptor

                self._identity = FaceDescriptor()
            value = identity_distance(a, b, self._identity, aligned=True)  # both are aligned crops
        except Exception as e:  # identity is optional: record why once, keep going
            self._identity_error = f"{type(e).__name__}: {e}"
            return None
        return _nan_to_none(value)

    def _row(self, batch: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
        fmt = self.images
        row: dict[str, Any] = {"w_plus": batch["w_plus"][i], "image_format": fmt}
        if "iteration_w_plus" in batch:
            row["iteration_w_plus"] = batch["iteration_w_plus"][i]
        if "image" in batch:
            row["output_image"] = encode_image(batch["image"][i], fmt)
        if self.save_aligned:
            row["aligned_image"] = encode_image(batch["aligned"][i], "png")
        if "mix_w_plus" in batch:
            row["mix_w_plus"] = batch["mix_w_plus"][i]
            row["mix_images"] = [encode_image(m, fmt) for m in batch["mix_images"][i]] if "mix_images" in batch else None
        if self.metrics:
            from psp_core import metrics

            crop = batch["aligned"][i]
            recon = batch["image256"][i] if "image256" in batch else batch["image"][i]
            row["mse"] = _nan_to_none(metrics.mse(crop, recon))
            row["psnr"] = _nan_to_none(metrics.psnr(crop, recon))
            row["ssim"] = _nan_to_none(metrics.ssim(crop, recon))
            row["identity_distance"] = self._identity_distance(crop, recon)
        return row

    def __call__(self, batch: Mapping[str, np.ndarray]):
        from schemas import columns_to_table, image_id_for
        from schemas.ids import face_image_id

        start = time.perf_counter()
        uris = [str(u) for u in batch["source_uri"]]
        n = len(uris)
        status = [str(s) for s in batch["status"]]
        error = [str(e) if e else None for e in batch["error"]]
        names = ("w_plus", "iteration_w_plus", "output_image", "image_format", "aligned_image", "mix_w_plus", "mix_images",
                 "mse", "psnr", "ssim", "identity_distance")
        cols: dict[str, list] = {name: [None] * n for name in names}
        for i in range(n):
            if status[i] != "ok":
                continue
            try:
                row = self._row(batch, i)
            except Exception as e:
                status[i] = "invert_error"
                error[i] = f"{uris[i]}: output encoding failed ({type(e).__name__}: {e})"
                continue
            for name, value in row.items():
                cols[name][i] = value

        ok = [s == "ok" for s in status]
        has_face = [not np.isnan(np.asarray(batch["quad"][i])).any() for i in range(n)]
        shas = [str(v) if v else None for v in batch["checkpoint_sha256"]]
        face_index = _ints(batch["face_index"]) if "face_index" in batch else [None] * n
        face_box = batch.get("face_box")
        columns = {
            "image_id": [face_image_id(u, k) for u, k in zip(uris, face_index)],
            "source_id": [image_id_for(u) for u in uris],
            "source_uri": uris,
            "source_sha256": [str(v) if v else None for v in batch["source_sha256"]],
            "source_width": _ints(batch["source_width"]),
            "source_height": _ints(batch["source_height"]),
            "status": status,
            "error": [None if ok[i] else error[i] or status[i] for i in range(n)],
            "face_score": [_nan_to_none(float(batch["face_score"][i])) for i in range(n)],
            "face_index": face_index,
            "face_count": _ints(batch["face_count"]) if "face_count" in batch else [None] * n,
            "face_box": [None if face_box is None or np.isnan(np.asarray(face_box[i], np.float32)).any()
                         else np.asarray(face_box[i], np.float32) for i in range(n)],
            "landmarks": [np.asarray(batch["landmarks"][i]) if has_face[i] else None for i in range(n)],
            "quad": [np.asarray(batch["quad"][i]) if has_face[i] else None for i in range(n)],
            "task": [self.task.name] * n,
            **cols,
            "checkpoint_sha256": shas,
            "code_version": [self.code_version] * n,
            "run_id": [self.run_id] * n,
        }
        if "source_size" in batch:  # the input's listing facts, from the read stage
            sizes = np.asarray(batch["source_size"], dtype=np.int64)
            mtimes = np.asarray(batch["source_mtime"], dtype=np.float64)
            columns["source_size"] = [int(v) if v >= 0 else None for v in sizes.tolist()]
            columns["source_etag"] = [str(v) if v else None for v in batch["source_etag"]]
            columns["source_mtime"] = [None if m != m else int(round(m * 1e6)) for m in mtimes.tolist()]  # us
        if "model_family" in batch:  # every row: what the run's checkpoint is
            columns["model_family"] = [str(v) if v else None for v in batch["model_family"]]
            columns["n_iters"] = _ints(batch["n_iters"])
        table = columns_to_table(columns, self.n_styles)
        if self.stage_clock is not None:
            sha = next((s for s in shas if s), None)
            self.stage_clock.record(
                "outputs", n, time.perf_counter() - start, statuses=Counter(status),
                meta={"checkpoint_sha256": sha} if sha else None,
            )
        return table


def _ints(values) -> list[int | None]:
    """-1 / None / NaN -> None (the stages use -1 for 'unknown')."""
    out = []
    for v in values:
        try:
            v = int(v)
        except (TypeError, ValueError):
            v = -1
        out.append(v if v >= 0 else None)
    return out
