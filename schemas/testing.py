"""Seeded example output rows for tests and demos (no Ray, no model): what the pipeline writes."""
from __future__ import annotations

import datetime as _dt
import hashlib

import numpy as np

EXAMPLE_TIME = _dt.datetime(2026, 11, 1, 12, 0, tzinfo=_dt.timezone.utc)


def example_rows(
    n_ok: int = 4,
    n_err: int = 2,
    n_styles: int = 8,
    seed: int = 0,
    run_id: str = "run-a",
    processed_at: _dt.datetime = EXAMPLE_TIME,
    prefix: str = "img",
) -> list[dict]:
    """`n_ok` ok rows (random w_plus [n_styles,512], landmarks [68,2], quad [4,2], fake PNG bytes)
    followed by `n_err` decode_error rows (tensors null), for `schemas.rows_to_table`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_ok):
        rows.append(
            dict(
                source_uri=f"s3://bucket/{prefix}/{i}.jpg",
                source_sha256=hashlib.sha256(f"{prefix}{i}".encode()).hexdigest(),
                source_width=512 + i,
                source_height=384,
                status="ok",
                face_score=float(rng.random()),
                landmarks=rng.random((68, 2)).astype(np.float32) * 256,
                quad=rng.random((4, 2)).astype(np.float32) * 256,
                task="ffhq_encode",
                w_plus=rng.standard_normal((n_styles, 512)).astype(np.float32),
                output_image=b"\x89PNG fake " + bytes([i % 256]),
                image_format="png",
                checkpoint_sha256="ab" * 32,
                code_version="0.1.0",
                run_id=run_id,
                processed_at=processed_at,
            )
        )
    for j in range(n_err):
        rows.append(
            dict(
                source_uri=f"s3://bucket/{prefix}/bad{j}.jpg",
                status="decode_error",
                error=f"cannot identify image file bad{j}.jpg",
                task="ffhq_encode",
                image_format="none",
                run_id=run_id,
                processed_at=processed_at,
            )
        )
    return rows
