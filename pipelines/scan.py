"""Whole-table analysis whose caller's memory does not grow with the table.

`scan_table` folds every data file of an output table version into a mergeable aggregate: an
object with ``add(batch, file)`` (a ``pyarrow.RecordBatch`` of the asked columns, and the data
file it came from) and ``merge(other)``. When the table has at least `RAY_MIN_FILES` files (or
the caller asks for Ray) the file list is cut into shards and each shard is folded in a Ray task,
the caller merging the shards' aggregates as they finish; otherwise the caller streams the files
batch by batch itself. Either way the caller holds the file list and one aggregate, never a row
per input, and reads only the columns it names. `psp report`, `psp inspect` and `psp direction`
read tables this way; `read_rows` then fetches the few rows a page shows from the files that hold
them.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from psp_core.uris import filesystem_for
from schemas.table import AsOf, arrow_filesystem, open_table, table_dataset, table_info

RAY_MIN_FILES = 32  # a table with this many data files is scanned in Ray tasks
SHARD_FILES = 8  # data files per Ray task
READ_ATTEMPTS = 4  # tries of a data file's first read (a GET answered 503 is retried)
BATCH_ROWS = 4096  # rows per batch handed to `add` (bounds memory: w_plus is 36 KB a row at 1024 px)


@dataclass(frozen=True)
class TableFiles:
    """One version of an output table as a list of its data files (paths relative to the table)."""

    uri: str
    storage_options: Mapping[str, Any] | None
    version: int
    schema: pa.Schema
    paths: tuple[str, ...]


def table_files(uri: str, storage_options: Mapping[str, Any] | None = None, as_of: AsOf = None) -> TableFiles:
    """The data files of the table at `uri` (current version, or `as_of`). FileNotFoundError /
    ValueError as `schemas.table.open_table`."""
    dt = open_table(uri, storage_options, as_of)
    ds = table_dataset(dt, uri, storage_options)
    try:  # the table properties' tensor shapes (w_plus [n_styles, 512], ...) on the schema
        schema = ds.schema.with_metadata(table_info(dt, uri).schema().metadata)
    except (KeyError, ValueError):  # not a psp output table (an edits table): its own metadata
        schema = ds.schema
    return TableFiles(uri, dict(storage_options) if storage_options else None, dt.version(), schema,
                      tuple(ds.files))


def _filesystem(uri: str, storage_options: Mapping[str, Any] | None):
    """A pyarrow filesystem rooted at the table: native for local and s3://, else fsspec's."""
    fs = arrow_filesystem(uri, storage_options)
    if fs is not None:
        return fs
    import pyarrow.fs as pafs

    inner, root = filesystem_for(uri, storage_options)
    return pafs.SubTreeFileSystem(root.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(inner)))


def _batches(files: TableFiles, paths: Iterable[str], columns: Sequence[str], filter: Any = None):
    """(file, record batch) of `columns` (a column the file lacks reads as nulls), file by file."""
    fs = _filesystem(files.uri, files.storage_options)
    schema = pa.schema([files.schema.field(c) for c in columns], metadata=files.schema.metadata)
    for path in paths:
        for batch in _file_batches(fs, files.schema, path, columns, filter):
            yield path, pa.RecordBatch.from_arrays(batch.columns, schema=schema)


def _file_batches(fs, schema: pa.Schema, path: str, columns: Sequence[str], filter: Any, attempts: int = READ_ATTEMPTS):
    """The batches of one data file. A read that fails before the file's first batch (a 503
    SlowDown on a GET, which Arrow's native S3 client reports as an INTERNAL_FAILURE it does not
    retry) is tried again, after 0.5, 1, 2 ... s; a failure after it raises."""
    import time

    for attempt in range(1, attempts + 1):
        ds = pads.dataset([path], schema=schema, filesystem=fs, format="parquet")
        it = ds.to_batches(columns=list(columns), filter=filter, batch_size=BATCH_ROWS)
        try:
            first = next(it, None)
        except OSError:
            if attempt == attempts:
                raise
            time.sleep(0.5 * 2 ** (attempt - 1))
            continue
        if first is not None:
            yield first
            yield from it
        return


def fold_files(files: TableFiles, paths: Sequence[str], columns: Sequence[str], make: Callable[[], Any],
               filter: Any = None) -> Any:
    """`make()` with every batch of `paths` added (what one Ray task, or the caller, does)."""
    agg = make()
    for path, batch in _batches(files, paths, columns, filter):
        agg.add(batch, path)
    return agg


def _fold_task(files: TableFiles, paths: Sequence[str], columns: Sequence[str], make, filter) -> bytes:
    return pickle.dumps(fold_files(files, paths, columns, make, filter))


def scan_table(files: TableFiles, columns: Sequence[str], make: Callable[[], Any], filter: Any = None,
               use_ray: bool | None = None) -> Any:
    """Fold the whole table version `files` into `make()`'s aggregate (see the module doc).

    columns: the columns `add` sees (missing ones read as nulls). filter: a pyarrow expression
    pushed into each file's scan. use_ray: None decides by the number of files.
    """
    missing = [c for c in columns if c not in files.schema.names]
    if missing:
        raise ValueError(f"table {files.uri!r} has no column(s) {missing}")
    if use_ray is None:
        use_ray = len(files.paths) >= RAY_MIN_FILES
    if not use_ray or not files.paths:
        return fold_files(files, files.paths, columns, make, filter)
    import ray

    from pipelines.dataflow import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1, max_retries=3)(_fold_task)
    shards = [files.paths[i:i + SHARD_FILES] for i in range(0, len(files.paths), SHARD_FILES)]
    window = max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
    total, pending = make(), []
    for shard in shards:
        pending.append(task.remote(files, shard, list(columns), make, filter))
        if len(pending) >= window:  # merge as they finish: at most `window` aggregates in flight
            done, pending = ray.wait(pending, num_returns=1)
            total.merge(pickle.loads(ray.get(done[0])))
    for ref in pending:
        total.merge(pickle.loads(ray.get(ref)))
    return total


class Rows:
    """An aggregate that keeps the batches it is given: for scans whose filter leaves few rows."""

    def __init__(self):
        self.batches: list[pa.RecordBatch] = []

    def add(self, batch, file: str = "") -> None:
        if batch.num_rows:
            self.batches.append(batch)

    def merge(self, other: Rows) -> None:
        self.batches.extend(other.batches)

    def table(self, schema: pa.Schema) -> pa.Table:
        return pa.Table.from_batches(self.batches, schema=schema)


class RowsPerFile:
    """Rows per data file (matching the scan's filter): where the first N rows of a table are."""

    def __init__(self):
        self.rows: dict[str, int] = {}

    def add(self, batch, file: str = "") -> None:
        self.rows[file] = self.rows.get(file, 0) + batch.num_rows

    def merge(self, other: RowsPerFile) -> None:
        for k, v in other.rows.items():
            self.rows[k] = self.rows.get(k, 0) + v


def read_files(batch: Mapping[str, Any], files: TableFiles, columns: Sequence[str], filter: Any = None) -> pa.Table:
    """Ray Data stage: a batch of (path, limit) rows -> the rows of those files (`columns`, `filter`),
    at most `limit` from each (-1: all): a table read in Ray tasks from a list of its files."""
    schema = pa.schema([files.schema.field(c) for c in columns], metadata=files.schema.metadata)
    parts = []
    for path, limit in zip(list(batch["path"]), list(batch["limit"])):
        got = 0
        for _, b in _batches(files, [str(path)], columns, filter):
            if 0 <= int(limit) <= got:
                break
            b = b.slice(0, int(limit) - got) if int(limit) >= 0 else b
            got += b.num_rows
            parts.append(b)
    return pa.Table.from_batches(parts, schema=schema)


def first_rows(files: TableFiles, n: int, columns: Sequence[str]) -> pa.Table:
    """The first `n` rows of the table in file order (reads no further than it needs)."""
    schema = pa.schema([files.schema.field(c) for c in columns], metadata=files.schema.metadata)
    batches, got = [], 0
    for _, batch in _batches(files, files.paths, columns):
        if got >= n:
            break
        batches.append(batch.slice(0, n - got))
        got += batches[-1].num_rows
    return pa.Table.from_batches(batches, schema=schema)


def read_rows(files: TableFiles, wanted: Mapping[str, Iterable[str]], columns: Sequence[str],
              key: str = "image_id") -> pa.Table:
    """The rows whose `key` is in `wanted[file]`, read only from those files (a few rows of a
    huge table: the images a report shows)."""
    names = list(dict.fromkeys([key, *columns]))
    schema = pa.schema([files.schema.field(c) for c in names], metadata=files.schema.metadata)
    parts = []
    for path, ids in sorted(wanted.items()):
        ids = sorted(set(ids))
        if ids:
            batches = [b for _, b in _batches(files, [path], names, pads.field(key).isin(ids))]
            parts.append(pa.Table.from_batches(batches, schema=schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


__all__ = ["TableFiles", "table_files", "scan_table", "fold_files", "first_rows", "read_rows", "read_files",
           "Rows", "RowsPerFile"]
