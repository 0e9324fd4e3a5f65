"""The keys every writer and reader agree on: `image_id` (one per output row), `source_id` (one per
input) and run ids.

An input's rows: with `--faces best|largest` (and for an input without a face) one row whose
`image_id` is `image_id_for(source_uri)`; with `--faces all` one row per face, face 0 (the best
detector score) keyed as before and face k > 0 by `face_image_id(source_uri, k)`. Every row carries
`source_id = image_id_for(source_uri)`, so all rows of an input are found by it, and face 0's
`image_id` equals it.

Defined once here; `pipelines` and `jobs` import them from `schemas`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import re
import uuid

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def image_id_for(source_uri: str) -> str:
    """Stable row key for an input: the first 32 hex chars of sha256(source_uri as UTF-8)."""
    if not isinstance(source_uri, str) or not source_uri:
        raise ValueError(f"source_uri must be a non-empty string, got {source_uri!r}")
    return hashlib.sha256(source_uri.encode("utf-8")).hexdigest()[:32]


def face_image_id(source_uri: str, face_index: int | None) -> str:
    """Row key of face `face_index` of an input: `image_id_for(source_uri)` for face 0 or None (so
    `--faces best` keeps the keys it always had), else the first 32 hex chars of
    sha256(source_uri + NUL + "face" + index), a string no URI or path can equal (no NUL in them)."""
    if face_index is None or int(face_index) == 0:
        return image_id_for(source_uri)
    if int(face_index) < 0:
        raise ValueError(f"face_index must be >= 0 (or None for a row without a face), got {face_index!r}")
    image_id_for(source_uri)  # the same check of source_uri
    return hashlib.sha256(f"{source_uri}\x00face{int(face_index)}".encode()).hexdigest()[:32]


def row_seed(seed: int, image_id: str) -> int:
    """The per-row seed for style mixing: a function of (--seed, image_id) only, so a row's result
    does not depend on which batch or actor it lands in."""
    digest = hashlib.sha256(f"{int(seed)}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_run_id(now: _dt.datetime | None = None) -> str:
    """A fresh, sortable run id: UTC time plus 8 random hex chars, e.g. `20261126T231500Z-1a2b3c4d`."""
    now = now or _dt.datetime.now(_dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is safe in a path (letters, digits, `_`, `-`), else ValueError."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run_id {run_id!r} must be 1-128 letters, digits, '_' or '-' (it names the run's "
            "folder in the output table); omit it to get one from make_run_id()"
        )
    return run_id
