"""The keys every writer and reader agree on: `image_id` (one per input) and run ids.

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
