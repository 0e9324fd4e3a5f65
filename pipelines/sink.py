"""The end of the trip: a Ray Dataset of output-schema-v1 tables -> Parquet, plus `_SUCCESS.json`.

File names are `part-<run_id>-<write_uuid>-<task:06>-<i>.parquet`: deterministic for a write task
(Ray's checkpointing predicts them), never clashing across runs (APPEND mode needs the write uuid),
and greppable by run. Readers (`schemas.read_outputs`) ignore `_*` names, so `_SUCCESS.json` and
`_runs/` sit beside the data. Reruns stay duplicate-free because the pipeline skips
`existing_image_ids(...)` before it starts; the reader also keeps only the latest row per image_id.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from importlib import metadata as _metadata
from typing import Any

from ray.data.datasource import FilenameProvider

SUCCESS_NAME = "_SUCCESS.json"
RUNS_DIR = "_runs"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def make_run_id(now: _dt.datetime | None = None) -> str:
    """A fresh run id: UTC time plus 8 random hex chars, e.g. `20261126T231500Z-1a2b3c4d`."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is safe in a file name (letters, digits, `_`, `-`), else ValueError."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run_id {run_id!r} must be 1-128 letters, digits, '_' or '-' (it goes into file "
            "names); omit it to get one from make_run_id()"
        )
    return run_id


class OutputFilenameProvider(FilenameProvider):
    """Names each write task's files `part-<run_id>-<write_uuid>-<task:06>-<i>.parquet`."""

    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = check_run_id(run_id)

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # `{i}` is filled by pyarrow when a task's rows span several files (max_rows_per_file).
        return f"part-{self.run_id}-{write_uuid}-{task_index:06d}-{{i}}.parquet"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> str:
    # Ray workers do not share the driver's cwd: always hand them an absolute path.
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def resolve_filesystem(
    output_uri: str, filesystem: Any = None, storage_options: Mapping[str, Any] | None = None
):
    """(path, pyarrow filesystem or None) for writing `output_uri` from Ray workers.

    `filesystem` may be a pyarrow FileSystem or an fsspec one (wrapped); otherwise, for a remote
    URI with `storage_options`, an fsspec filesystem of the URI's protocol is built from them
    (e.g. s3fs with `client_kwargs.endpoint_url`) and wrapped in `pyarrow.fs.PyFileSystem`. It is
    pickled to every write task, so credentials must be in it (or in the workers' environment).
    Local paths are made absolute.
    """
    import fsspec
    import pyarrow.fs as pafs

    if _is_local(output_uri) and filesystem is None:
        return _local_path(output_uri), None
    if filesystem is None and storage_options:
        protocol = output_uri.split("://", 1)[0]
        filesystem = fsspec.filesystem(protocol, **dict(storage_options))
    if filesystem is None:
        return output_uri, None  # Ray infers the filesystem from the scheme and environment
    if isinstance(filesystem, fsspec.AbstractFileSystem):
        path = filesystem._strip_protocol(output_uri)
        return path, pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
    if isinstance(filesystem, pafs.FileSystem):
        path = output_uri.split("://", 1)[1] if "://" in output_uri else output_uri
        return path, filesystem
    raise TypeError(
        f"filesystem must be a pyarrow.fs.FileSystem or an fsspec filesystem, got {type(filesystem)}"
    )


def write_outputs(
    ds,
    output_uri: str,
    run_id: str,
    *,
    n_styles: int | None = None,
    filesystem: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    max_rows_per_file: int | None = None,
) -> None:
    """Write a Ray Dataset whose blocks are output-schema-v1 tables to Parquet under `output_uri`.

    Appends next to earlier runs (files are named by run id and write uuid). With `n_styles` every
    block is cast to `schemas.output_schema(n_styles)` on write, so a block with a wrong column or
    shape fails the write instead of producing a file with another schema; without it each file
    takes its blocks' schema (already exact when they come from `schemas.rows_to_table`).
    A failed block fails the whole write (`max_errored_blocks = 0`): rows are never silently lost.
    """
    from ray.data import DataContext

    check_run_id(run_id)
    path, fs = resolve_filesystem(output_uri, filesystem, storage_options)
    DataContext.get_current().max_errored_blocks = 0
    ds.context.max_errored_blocks = 0
    args: dict[str, Any] = {}
    if n_styles is not None:
        from schemas.outputs import output_schema

        args["schema"] = output_schema(n_styles)
    ds.write_parquet(
        path,
        filesystem=fs,
        filename_provider=OutputFilenameProvider(run_id),
        max_rows_per_file=max_rows_per_file,
        mode="append",
        **args,
    )


def _version(dist: str) -> str | None:
    try:
        return _metadata.version(dist)
    except _metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages whose behaviour shapes the outputs."""
    import platform

    out = {d: _version(d) for d in ("psp-pipeline", "torch", "ray", "pyarrow", "numpy")}
    out["python"] = platform.python_version()
    return out


def _json_default(value: Any):
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def write_success(
    output_uri: str, summary: Mapping[str, Any] | Any, storage_options: Mapping[str, Any] | None = None
) -> dict:
    """Write `_SUCCESS.json` (and `_runs/<run_id>.json`, the history) under `output_uri`.

    `summary` is a dict or dataclass (e.g. the pipeline's RunSummary) with what the run knows:
    counts per status, per-stage timings, run_id, checkpoint_sha256, started/finished. This adds
    `schema_version`, `versions` (psp-pipeline, torch, ray, pyarrow, numpy, python) and
    `written_at` unless present. Returns the dict written. Write it only after `write_outputs`
    returned: its presence means every row of that run is in the folder.
    """
    import fsspec

    from schemas.outputs import SCHEMA_VERSION

    if dataclasses.is_dataclass(summary) and not isinstance(summary, type):
        summary = dataclasses.asdict(summary)
    doc = dict(summary)
    doc.setdefault("schema_version", SCHEMA_VERSION)
    doc.setdefault("versions", versions())
    doc.setdefault("written_at", _dt.datetime.now(_dt.timezone.utc))
    text = json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n"
    fs, base = fsspec.core.url_to_fs(output_uri, **dict(storage_options or {}))
    base = base.rstrip("/")
    fs.makedirs(base, exist_ok=True)
    run_id = doc.get("run_id")
    if run_id:
        check_run_id(run_id)
        fs.makedirs(f"{base}/{RUNS_DIR}", exist_ok=True)
        with fs.open(f"{base}/{RUNS_DIR}/{run_id}.json", "w") as f:
            f.write(text)
    with fs.open(f"{base}/{SUCCESS_NAME}", "w") as f:
        f.write(text)
    return json.loads(text)


def read_success(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> dict | None:
    """The `_SUCCESS.json` under `output_uri` (the latest successful run), or None if absent."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(output_uri, **dict(storage_options or {}))
    path = f"{base.rstrip('/')}/{SUCCESS_NAME}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def existing_image_ids(
    output_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    statuses: Iterable[str] | None = None,
) -> set[str]:
    """image_ids already written under `output_uri` (empty when the folder is missing or empty).

    With `statuses` (e.g. `{"ok"}`), only ids whose latest row has one of those statuses, so a
    rerun can retry the failures. Reads only the id/status columns.
    """
    from schemas.outputs import list_output_files, read_outputs

    try:
        if not list_output_files(output_uri, storage_options):
            return set()
    except FileNotFoundError:
        return set()
    if statuses is None:
        table = read_outputs(output_uri, storage_options, columns=["image_id"], dedup=False)
        return set(table["image_id"].to_pylist())
    wanted = set(statuses)
    table = read_outputs(output_uri, storage_options, columns=["image_id", "status"])
    return {i for i, s in zip(table["image_id"].to_pylist(), table["status"].to_pylist()) if s in wanted}
