"""Reading the output table: a Delta Lake table at OUTPUT (local path, file://, s3://, gs://, ...).

Its current version holds exactly one row per live input (per face with `--faces all`; output
schema v3); every earlier version stays readable by number or time (`as_of`) until `psp vacuum` removes its files. Table properties
carry `psp.schema_version`, `psp.n_styles` and `psp.tensor_shapes`; each commit of a run carries its
summary in the commit info (`psp.run_id`, `psp.run`).

`read_outputs` / `read_latents` are the readers most users need; `open_dataset` gives a pyarrow
dataset of the current version for pandas, Polars or DuckDB, `open_table` the `deltalake.DeltaTable`.

Every read scans through a native Arrow filesystem (`arrow_filesystem`: local, S3), never through
deltalake's default Python filesystem: Arrow's scan finishes tearing down on its own threads after
`to_table` returns (apache/arrow#36389); when what it releases last is a Python object (deltalake's
`PyFileSystem` handler, the `bytes` its reads return), that thread needs the GIL, and if the
interpreter is already finalizing, Python ends the thread with a forced unwind through a C++
destructor: "terminate called without an active exception", SIGABRT at exit. Storage
options are fsspec's (`key`, `secret`, `client_kwargs.endpoint_url`, ...), translated for
delta-rs by `delta_storage_options`.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from psp_core.uris import is_local
from schemas.outputs import (
    COLUMNS,
    META_N_STYLES,
    META_SHAPES,
    META_VERSION,
    SCHEMA_VERSION,
    output_schema,
    w_plus_to_numpy,
)
from schemas.status import OK as STATUS_OK

# Table properties (Delta `configuration`) and commit-info keys written by psp runs.
PROP_VERSION = META_VERSION.decode()
PROP_N_STYLES = META_N_STYLES.decode()
PROP_SHAPES = META_SHAPES.decode()
COMMIT_RUN_ID = "psp.run_id"
COMMIT_RUN = "psp.run"
RUNS_DIR = "_runs"  # OUTPUT/_runs/<run_id>.json: each committed run's summary (readable without Delta)

AsOf = int | str | _dt.datetime | None


def table_uri(uri: str) -> str:
    """`uri` as delta-rs takes it: local paths absolute, `file://` stripped, no trailing slash."""
    import os

    if is_local(uri):
        return os.path.abspath(uri.removeprefix("file://"))
    return uri.rstrip("/")


def delta_storage_options(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, str] | None:
    """fsspec storage options (as `--storage-options` takes them) -> delta-rs `storage_options`.

    s3: key/secret/token, client_kwargs.endpoint_url (http endpoints allowed) and region_name,
    anon. Keys already in delta-rs form (upper case, e.g. `AWS_ENDPOINT_URL`) pass through.
    Without options delta-rs reads the usual environment (AWS_*, GOOGLE_*, AZURE_*).
    """
    if not storage_options:
        return None
    so = dict(storage_options)
    out = {k: str(v) for k, v in so.items() if isinstance(k, str) and k.isupper()}
    if uri.startswith(("s3://", "s3a://")):
        ck = dict(so.get("client_kwargs") or {})
        pairs = {
            "AWS_ACCESS_KEY_ID": so.get("key") or so.get("aws_access_key_id"),
            "AWS_SECRET_ACCESS_KEY": so.get("secret") or so.get("aws_secret_access_key"),
            "AWS_SESSION_TOKEN": so.get("token"),
            "AWS_ENDPOINT_URL": so.get("endpoint_url") or ck.get("endpoint_url"),
            "AWS_REGION": ck.get("region_name") or so.get("region_name"),
        }
        out.update({k: str(v) for k, v in pairs.items() if v})
        if str(out.get("AWS_ENDPOINT_URL", "")).startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
        if so.get("anon"):
            out["AWS_SKIP_SIGNATURE"] = "true"
    elif uri.startswith(("gs://", "gcs://")) and so.get("token") and isinstance(so["token"], str):
        out["GOOGLE_SERVICE_ACCOUNT"] = so["token"]
    return out or None


def table_exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when `uri` holds a Delta table (a `_delta_log` with at least one commit)."""
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(table_uri(uri), storage_options=delta_storage_options(uri, storage_options))


def open_table(uri: str, storage_options: Mapping[str, Any] | None = None, as_of: AsOf = None):
    """The `deltalake.DeltaTable` at `uri`, at its latest version or at `as_of` (a version number,
    or a time: ISO 8601 string or datetime, UTC when naive: the version current at that time).

    Raises FileNotFoundError (saying what to do) when there is no table at `uri`, ValueError for
    an `as_of` the table does not have.
    """
    from deltalake import DeltaTable

    path, opts = table_uri(uri), delta_storage_options(uri, storage_options)
    if not DeltaTable.is_deltatable(path, storage_options=opts):
        raise FileNotFoundError(
            f"no psp output table at {uri!r} (no _delta_log): has a run written there (psp invert "
            "INPUT OUTPUT ...)? Check the path and --storage-options"
        )
    dt = DeltaTable(path, storage_options=opts)
    if as_of is not None:
        try:
            dt.load_as_version(parse_as_of(as_of))
        except Exception as e:  # noqa: BLE001 - delta-rs raises its own error types
            raise ValueError(
                f"{uri!r} has no version {as_of!r} ({e}); the table is at version {dt.version()}: "
                "see `psp inspect OUTPUT` for its history"
            ) from None
    return dt


def arrow_filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """A native (C++) pyarrow filesystem rooted at the table `uri`, for
    `DeltaTable.to_pyarrow_dataset(filesystem=...)` / `to_pandas(filesystem=...)`: local paths and
    s3:// (fsspec options: key/secret/token, client_kwargs.endpoint_url/region_name, anon; without
    them the AWS environment). None for other schemes (deltalake's own filesystem is used)."""
    import pyarrow.fs as pafs

    if is_local(uri):
        return pafs.SubTreeFileSystem(table_uri(uri), pafs.LocalFileSystem())
    if not uri.startswith(("s3://", "s3a://")):
        return None
    opts = delta_storage_options(uri, storage_options) or {}
    kw: dict[str, Any] = {}
    if opts.get("AWS_ACCESS_KEY_ID"):
        kw.update(access_key=opts["AWS_ACCESS_KEY_ID"], secret_key=opts.get("AWS_SECRET_ACCESS_KEY"),
                  session_token=opts.get("AWS_SESSION_TOKEN"))
    if opts.get("AWS_SKIP_SIGNATURE"):
        kw["anonymous"] = True
    endpoint = opts.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if opts.get("AWS_REGION"):
        kw["region"] = opts["AWS_REGION"]
    root = uri.split("://", 1)[1].rstrip("/")
    return pafs.SubTreeFileSystem(root, pafs.S3FileSystem(**kw))


def table_dataset(dt, uri: str, storage_options: Mapping[str, Any] | None = None):
    """The pyarrow dataset of `dt`'s loaded version, read through `arrow_filesystem(uri)`."""
    return dt.to_pyarrow_dataset(filesystem=arrow_filesystem(uri, storage_options))


def open_dataset(uri: str, storage_options: Mapping[str, Any] | None = None, as_of: AsOf = None):
    """The output table at `uri` (current version, or `as_of`) as a pyarrow dataset: one row per
    input, for DuckDB, Polars or `.to_table(columns=...)`; scans exit cleanly (see the module doc)."""
    return table_dataset(open_table(uri, storage_options, as_of), uri, storage_options)


def parse_as_of(value: AsOf) -> int | str | _dt.datetime:
    """`--as-of` text -> a version number (digits) or a time (ISO 8601; naive means UTC)."""
    if isinstance(value, (int, _dt.datetime)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--as-of {value!r}: expected a table version (e.g. 3) or a time (e.g. 2026-11-27T02:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=_dt.UTC)


@dataclass(frozen=True)
class TableInfo:
    """What the table properties say: output schema version, n_styles and tensor shapes."""

    schema_version: str
    n_styles: int
    tensor_shapes: dict[str, list[int]]

    def schema(self) -> pa.Schema:
        return output_schema(self.n_styles)


def table_info(dt, uri: str = "") -> TableInfo:
    """The psp properties of a `DeltaTable`; ValueError when it is not a psp output table of the
    schema version this code reads."""
    conf = dt.metadata().configuration or {}
    version = conf.get(PROP_VERSION)
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"table {uri or dt.table_uri!r} has {PROP_VERSION}={version!r}; this psp-pipeline reads "
            f"version {SCHEMA_VERSION!r}. Write each schema version to its own OUTPUT, or upgrade "
            "psp-pipeline to read newer outputs"
        )
    return TableInfo(version, int(conf[PROP_N_STYLES]), json.loads(conf[PROP_SHAPES]))


def table_properties(n_styles: int) -> dict[str, str]:
    """The table properties a psp output table is created with."""
    meta = output_schema(n_styles).metadata
    return {PROP_VERSION: meta[META_VERSION].decode(), PROP_N_STYLES: meta[META_N_STYLES].decode(),
            PROP_SHAPES: meta[META_SHAPES].decode()}


def _check_columns(columns: Sequence[str] | None) -> None:
    if columns is not None:
        unknown = sorted(set(columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; schema v{SCHEMA_VERSION} columns are {list(COLUMNS)}")


def read_outputs(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    as_of: AsOf = None,
    filter: Any = None,
) -> pa.Table:
    """The output table at `uri` (current version, or `as_of`) as one Arrow table: one row per input.

    `columns` selects columns; `filter` is a pyarrow expression (e.g. `pc.field("status") == "ok"`)
    pushed into the scan. The result has the exact v2 schema, its metadata (tensor shapes) included.
    For s3:// pass e.g. `storage_options={"key": ..., "secret": ..., "client_kwargs":
    {"endpoint_url": ...}}`.
    """
    _check_columns(columns)
    dt = open_table(uri, storage_options, as_of)
    info = table_info(dt, uri)
    target = info.schema()
    if columns is not None:
        target = pa.schema([target.field(c) for c in columns], metadata=target.metadata)
    table = table_dataset(dt, uri, storage_options).to_table(columns=list(target.names), filter=filter)
    return table.select(target.names).cast(target)


def read_latents(
    uri: str, storage_options: Mapping[str, Any] | None = None, as_of: AsOf = None
) -> tuple[list[str], np.ndarray]:
    """(image_ids, w_plus float32 [N, n_styles, 512]) of the `status == "ok"` rows at `uri`."""
    import pyarrow.compute as pc

    table = read_outputs(uri, storage_options, ["image_id", "w_plus"], as_of,
                         filter=pc.field("status") == STATUS_OK)
    return table["image_id"].to_pylist(), w_plus_to_numpy(table)


def read_runs(uri: str, storage_options: Mapping[str, Any] | None = None, as_of: AsOf = None) -> list[dict]:
    """The summaries of the runs committed to the table, oldest first (up to `as_of`): what each
    commit's `psp.run` info holds, plus `version` and `committed_at`."""
    dt = open_table(uri, storage_options, as_of)
    runs = []
    for commit in dt.history():
        if COMMIT_RUN not in commit or commit.get("version", 0) > dt.version():
            continue
        run = json.loads(commit[COMMIT_RUN]) if isinstance(commit[COMMIT_RUN], str) else dict(commit[COMMIT_RUN])
        run["version"] = commit.get("version")
        run["committed_at"] = _dt.datetime.fromtimestamp(commit["timestamp"] / 1000, _dt.UTC).isoformat()
        runs.append(run)
    return sorted(runs, key=lambda r: r["version"])


