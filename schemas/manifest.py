"""The nightly manifest: which output row is the current one for each input, and the commit protocol.

Layout under an output URI (local path, ``file://``, ``s3://`` ...)::

    OUTPUT/runs/<run_id>/*.parquet                      each run writes only under its own prefix
    OUTPUT/_manifests/manifest-<seq>-<run_id>.parquet   one immutable snapshot per committed run
    OUTPUT/_manifests/_CURRENT.json                     the pointer, written last

A run is committed when ``_CURRENT.json`` names its manifest. The pointer is one small object: on S3
a single PUT is atomic, on a local filesystem it is written to a temporary name and renamed. A run
that crashes before that point leaves files under ``runs/<run_id>/`` that no reader ever looks at,
so a crashed run is never visible and a rerun neither loses nor duplicates a row.

The manifest is a full snapshot (not a delta): one row per input ever seen, with ``status`` the
output row's status, or ``deleted`` (a tombstone: the input is gone, readers drop it).
``output_file`` (relative to OUTPUT) is the Parquet file holding that input's current row; readers
keep, from each listed file, only the rows the manifest points at, so a file that also holds older
or duplicated rows never leaks them.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_DIR = "_manifests"
RUNS_DIR = "runs"
POINTER_NAME = "_CURRENT.json"
DELETED = "deleted"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),  # seconds since the epoch, as listed; null if unknown
        pa.field("checkpoint_sha256", pa.string()),
        pa.field("schema_version", pa.int32()),  # output schema version of the row
        pa.field("run_id", pa.string()),  # run that produced the current row
        pa.field("status", pa.string(), nullable=False),  # the row's status, or "deleted"
        pa.field("output_file", pa.string()),  # relative to OUTPUT; null for tombstones
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"psp.manifest_version": str(MANIFEST_SCHEMA_VERSION)},
)


class ManifestError(RuntimeError):
    """The manifest under an output URI is unreadable, or a commit lost a race."""


def image_id_for(source_uri: str) -> str:
    """The row key of the output schema: sha256 hex of the source URI, first 32 characters."""
    return hashlib.sha256(source_uri.encode("utf-8")).hexdigest()[:32]


def new_run_id(now: Optional[_dt.datetime] = None) -> str:
    """A sortable, unique run id: ``YYYYmmddTHHMMSSZ-<8 hex>``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


@dataclass
class ManifestPointer:
    """What ``_CURRENT.json`` says: the committed manifest and the run that wrote it."""

    seq: int
    run_id: str
    manifest: str  # file name under OUTPUT/_manifests/
    committed_at: str
    manifest_version: int = MANIFEST_SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


# -- filesystem helpers -----------------------------------------------------------------------

def _fs_and_root(uri: str, storage_options: Optional[dict] = None):
    """(fsspec filesystem, root path without protocol) for an output URI."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, root.rstrip("/")


def _join(*parts: str) -> str:
    return posixpath.join(*parts)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _put_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write `data` at `path` so readers see the old object or the new one, never a torn one."""
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.pipe_file(path, data)  # one PUT: atomic on S3/GCS


# -- reading ----------------------------------------------------------------------------------

def read_pointer(uri: str, storage_options: Optional[dict] = None) -> Optional[ManifestPointer]:
    """The committed pointer under `uri`, or None if no run was ever committed there."""
    fs, root = _fs_and_root(uri, storage_options)
    path = _join(root, MANIFEST_DIR, POINTER_NAME)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return ManifestPointer(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ManifestError(
            f"manifest pointer {uri}/{MANIFEST_DIR}/{POINTER_NAME} is not valid JSON ({exc}): "
            "restore it from the newest manifest-*.parquet or delete it to start over"
        ) from exc


def has_manifest(uri: str, storage_options: Optional[dict] = None) -> bool:
    """True if `uri` holds committed nightly runs (readers must then go through the manifest)."""
    return read_pointer(uri, storage_options) is not None


def empty_manifest() -> pa.Table:
    return MANIFEST_SCHEMA.empty_table()


def read_manifest(
    uri: str, storage_options: Optional[dict] = None
) -> tuple[pa.Table, Optional[ManifestPointer]]:
    """The latest committed manifest under `uri` (all rows, tombstones included) and its pointer.

    Returns an empty table and None when nothing was committed yet.
    """
    pointer = read_pointer(uri, storage_options)
    if pointer is None:
        return empty_manifest(), None
    fs, root = _fs_and_root(uri, storage_options)
    path = _join(root, MANIFEST_DIR, pointer.manifest)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError as exc:
        raise ManifestError(
            f"{uri}/{MANIFEST_DIR}/{POINTER_NAME} names {pointer.manifest}, which is missing: "
            "the output prefix was partly deleted; point _CURRENT.json at the newest manifest left"
        ) from exc
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA), pointer


def live_entries(manifest: pa.Table) -> pa.Table:
    """Manifest rows that have a current output row (tombstones and unwritten rows dropped)."""
    keep = pc.and_(
        pc.not_equal(manifest["status"], DELETED), pc.is_valid(manifest["output_file"])
    )
    return manifest.filter(keep)


def committed_output_files(uri: str, storage_options: Optional[dict] = None) -> Optional[list[str]]:
    """Full URIs of the Parquet files the latest manifest points at, or None if `uri` has none.

    None means "not a nightly output": readers fall back to reading every file under `uri`.
    """
    manifest, pointer = read_manifest(uri, storage_options)
    if pointer is None:
        return None
    files = sorted(set(live_entries(manifest)["output_file"].to_pylist()))
    base = uri.rstrip("/")
    return [f"{base}/{f}" for f in files]


def committed_tables(
    uri: str,
    storage_options: Optional[dict] = None,
    columns: Optional[Sequence[str]] = None,
    read_file: Optional[Callable[[Any, str, Optional[list[str]]], pa.Table]] = None,
    status_ok_only: bool = False,
) -> Optional[list[pa.Table]]:
    """One table per committed output file under a nightly output `uri`, holding exactly the rows
    the latest manifest points at (the current row of each live input, once). None if `uri` has
    no manifest: the caller then reads it as a plain output folder.

    Only the files the manifest lists are opened; uncommitted run folders never are. From each file
    only rows whose ``(image_id, run_id)`` the manifest names are kept (first copy of a duplicate).
    `read_file(fs, path, columns)` reads one Parquet file (default: `pyarrow.parquet`), e.g. the
    output reader's own, which casts to the output schema; it gets `columns` plus ``image_id`` and
    ``run_id``.
    """
    manifest, pointer = read_manifest(uri, storage_options)
    if pointer is None:
        return None
    live = live_entries(manifest)
    if status_ok_only:
        live = live.filter(pc.equal(live["status"], "ok"))
    fs, root = _fs_and_root(uri, storage_options)
    want = None if columns is None else list(dict.fromkeys(["image_id", "run_id", *columns]))
    if read_file is None:
        def read_file(fs, path, cols):
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=cols)
    by_file: dict[str, dict[str, Optional[str]]] = {}
    for image_id, run_id, output_file in zip(
        live["image_id"].to_pylist(), live["run_id"].to_pylist(), live["output_file"].to_pylist()
    ):
        by_file.setdefault(output_file, {})[image_id] = run_id
    tables: list[pa.Table] = []
    for output_file in sorted(by_file):
        expected = by_file[output_file]
        table = read_file(fs, _join(root, output_file), want)
        ids = table["image_id"].to_pylist()
        runs = table["run_id"].to_pylist() if "run_id" in table.column_names else [None] * len(ids)
        take, seen = [], set()
        for i, (image_id, run_id) in enumerate(zip(ids, runs)):
            if image_id in seen or image_id not in expected:
                continue
            if run_id is not None and expected[image_id] is not None and run_id != expected[image_id]:
                continue
            seen.add(image_id)
            take.append(i)
        table = table.take(pa.array(take, pa.int64()))
        if columns is not None:
            table = table.select(list(columns))
        tables.append(table)
    return tables


def read_committed(
    uri: str,
    columns: Optional[Sequence[str]] = None,
    storage_options: Optional[dict] = None,
    status_ok_only: bool = False,
) -> Optional[pa.Table]:
    """The current output row of every live input under a nightly output `uri` (one per image),
    as one table; None if `uri` has no manifest. See `committed_tables`."""
    tables = committed_tables(uri, storage_options, columns, status_ok_only=status_ok_only)
    if tables is None:
        return None
    if not tables:  # committed, but nothing live (every input deleted)
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["image_id"])})
    return pa.concat_tables(tables, promote_options="permissive")


# -- writing / committing ---------------------------------------------------------------------

def make_entries(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """A manifest table from dicts with the manifest's column names (missing keys -> null)."""
    rows = list(rows)
    cols = {
        name: [r.get(name) for r in rows] for name in MANIFEST_SCHEMA.names
    }
    return pa.table(cols, schema=MANIFEST_SCHEMA)


def commit_manifest(
    uri: str,
    manifest: pa.Table,
    run_id: str,
    expected: Optional[ManifestPointer],
    storage_options: Optional[dict] = None,
) -> ManifestPointer:
    """Commit `manifest` as the state of `uri` after run `run_id`.

    Writes ``_manifests/manifest-<seq>-<run_id>.parquet`` (a new object, never overwritten), then
    the pointer ``_CURRENT.json`` last. `expected` is the pointer the run started from: if another
    run committed in the meantime this raises `ManifestError` and commits nothing (rerun to pick up
    its work).
    """
    current = read_pointer(uri, storage_options)
    if (current and current.manifest) != (expected and expected.manifest):
        raise ManifestError(
            f"another run committed to {uri} while run {run_id} was running "
            f"(now at {current.manifest if current else None}): rerun the nightly job"
        )
    seq = (expected.seq + 1) if expected else 1
    name = f"manifest-{seq:08d}-{run_id}.parquet"
    fs, root = _fs_and_root(uri, storage_options)
    manifest = manifest.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(manifest, sink, compression="zstd")
    _put_bytes_atomic(fs, _join(root, MANIFEST_DIR, name), sink.getvalue().to_pybytes())
    pointer = ManifestPointer(
        seq=seq,
        run_id=run_id,
        manifest=name,
        committed_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
    )
    _put_bytes_atomic(fs, _join(root, MANIFEST_DIR, POINTER_NAME), pointer.to_json().encode())
    return pointer


def run_prefix(uri: str, run_id: str) -> str:
    """The URI a run writes its output files under: ``OUTPUT/runs/<run_id>``."""
    return f"{uri.rstrip('/')}/{RUNS_DIR}/{run_id}"
