"""The output table (Delta Lake): where it is, what it holds, and its housekeeping.

A run's way into the table, whatever the command (invert, frontalize, nightly), one module a step:

1. `pipelines.writer`: Ray write tasks write the run's rows as Parquet files under
   ``OUTPUT/runs/<run_id>/`` and hand the driver the files' Delta add actions and status counts
   -- they do not commit;
2. `pipelines.adoption`: rows a crashed run wrote for the same inputs, from the same bytes and
   checkpoint, are taken instead of being redone;
3. `pipelines.commit`: ONE Delta commit with those files, the adopted ones, and the removal of the
   rows they replace (and of deleted inputs): files holding such rows are removed and, if they
   hold other rows too, re-added as a rewritten copy without them. So the version after the
   commit holds exactly one row per input (per face with `--faces all`); history keeps the old
   rows.

Keys: `image_id` keys a row, `source_id` (= `image_id_for(source_uri)`) the input. Every input a
run processes has a row whose image_id is its source_id (face 0, or its one image-level row), so
the run's image_ids name its inputs too: a row of the table is replaced when its image_id OR its
source_id is among them -- all face rows of a reprocessed input go, even when it now has fewer
faces.

A run that dies before its commit is invisible (its files are referenced by no version); the next
run adopts its finished rows and `psp vacuum` (`vacuum` here) deletes the rest.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from psp_core.uris import filesystem_for, is_local
from schemas.outputs import output_schema
from schemas.table import (
    delta_storage_options,
    table_dataset,
    table_info,
    table_properties,
    table_uri,
)

RUN_FILES = "runs"  # OUTPUT/runs/<run_id>/*.parquet: the data files each run writes
COMMIT_ATTEMPTS = 5
TABLE_NAME = "psp_outputs"
#: Columns with Delta statistics (min / max / null count) in each add action: the keys and status.
STATS_COLUMNS = ("image_id", "source_id", "status")
# What planning and adoption read of the current rows (never the images or tensors).
STATE_COLUMNS = ("image_id", "source_id", "source_uri", "status", "checkpoint_sha256", "source_size",
                 "source_mtime", "source_etag", "run_id")


class ConcurrentRunError(RuntimeError):
    """Another run committed rows for some of this run's inputs first; this run committed nothing."""


class TableMismatchError(ValueError):
    """OUTPUT holds a table this run cannot write into (another n_styles or schema version)."""


# ------------------------------------------------------------------------------------------------
# The table


class OutputTable:
    """The Delta table at `uri` (local path or fsspec URI) with fsspec `storage_options`."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri = str(uri)
        self.path = table_uri(self.uri)
        self.storage_options = dict(storage_options or {})
        self.delta_options = delta_storage_options(self.uri, storage_options)

    # -- reading ------------------------------------------------------------------------------
    def load(self, version: int | None = None):
        """The `DeltaTable` at its latest version (or `version`); None when there is no table yet."""
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.path, storage_options=self.delta_options):
            return None
        return DeltaTable(self.path, storage_options=self.delta_options, version=version)

    def ensure(self, n_styles: int):
        """The table, created empty (schema + psp properties) when missing; TableMismatchError
        when it exists with another n_styles or schema version. Returns the loaded `DeltaTable`."""
        from deltalake import DeltaTable

        dt = self.load()
        if dt is None:
            try:
                DeltaTable.create(self.path, output_schema(n_styles), mode="error",
                                  storage_options=self.delta_options, name=TABLE_NAME)
            except Exception:
                if self.load() is None:
                    raise
            dt = self.load()
        if not (dt.metadata().configuration or {}) and dt.metadata().name == TABLE_NAME:
            # delta-rs rejects custom properties at creation; they go in the next commit (also
            # when a run died between the two).
            # Statistics only on the key and status columns (delta-rs honours it when it writes,
            # e.g. in `psp vacuum`'s compaction; the run sink writes the same ones).
            props = {**table_properties(n_styles), "delta.dataSkippingStatsColumns": ",".join(STATS_COLUMNS)}
            dt.alter.set_table_properties(props, raise_if_not_exists=False)
            dt = self.load()
        try:
            info = table_info(dt, self.uri)
        except ValueError as e:
            raise TableMismatchError(str(e)) from None
        if info.n_styles != n_styles:
            raise TableMismatchError(
                f"output {self.uri!r} holds outputs of a model with n_styles={info.n_styles}; this "
                f"checkpoint has n_styles={n_styles}: write each model's outputs to its own OUTPUT"
            )
        return dt

    def state(self, dt, columns: Sequence[str] = STATE_COLUMNS, ids: pa.Array | None = None,
              with_file: bool = True) -> pa.Table:
        """The rows of `dt`'s loaded version (only `columns`, plus, `with_file`, `_file`: the data
        file holding the row, relative to the table), restricted to the rows of `ids` when given:
        image_id or source_id in `ids` (an input's source_id finds all its face rows)."""
        schema = pa.schema([output_schema(1).field(c) for c in columns])
        if with_file:
            schema = schema.append(pa.field("_file", pa.string()))
        if dt is None:
            return schema.empty_table()
        from concurrent.futures import ThreadPoolExecutor

        flt = None if ids is None else (pc.field("image_id").isin(ids) | pc.field("source_id").isin(ids))

        def read(fragment) -> pa.Table:
            t = fragment.to_table(columns=list(columns), filter=flt)
            if not with_file:
                return t
            return t.append_column("_file", pa.array([fragment.path] * t.num_rows, pa.string()))

        fragments = list(table_dataset(dt, self.uri, self.storage_options).get_fragments())
        # Object stores answer many small reads in parallel far faster than one after another.
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(fragments)))) as pool:
            tables = [t.cast(schema) for t in pool.map(read, fragments)]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def files(self, dt) -> set[str]:
        """Paths (relative to the table) of the data files of `dt`'s loaded version."""
        if dt is None:
            return set()
        return set(pa.table(dt.get_add_actions(flatten=False))["path"].to_pylist())

    # -- files ----------------------------------------------------------------------------------
    def filesystem(self):
        """(fsspec filesystem, table root path on it)."""
        fs, root = filesystem_for(self.uri if not is_local(self.uri) else self.path, self.storage_options)
        return fs, root.rstrip("/")

    def worker_filesystem(self):
        """The pyarrow filesystem Ray write tasks use (None: local, or inferred from the URI).
        Built from the fsspec options, so credentials and retries are the same as for reads."""
        if is_local(self.uri) or not self.storage_options:
            return None
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))

    def write_parquet(self, rel_path: str, table: pa.Table) -> tuple[int, int]:
        """Write `table` as one Parquet file (one row group) at `rel_path` under the table, streamed
        to storage (a local table: by pyarrow's own file I/O); returns (size in bytes, modified
        time in ms) for its add action.

        Snappy; dictionary encoding and column statistics only for the flat columns (ids, URIs,
        status, scores): on the latents and images they cost a quarter of the write
        (`bench/table_write.py`) and no reader filters on them."""
        import pyarrow.parquet as pq

        fs, root = self.filesystem()
        full = f"{root}/{rel_path}"
        fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        flat = [f.name for f in table.schema if not (pa.types.is_nested(f.type) or pa.types.is_binary(f.type)
                                                     or pa.types.is_large_binary(f.type))]
        options = dict(row_group_size=max(1, table.num_rows), compression="snappy", use_dictionary=flat,
                       write_statistics=flat)
        if is_local(self.uri):
            pq.write_table(table, full, **options)
            stat = os.stat(full)
            return int(stat.st_size), int(time.time() * 1000)
        with fs.open(full, "wb") as f:
            pq.write_table(table, f, **options)
            size = f.tell()
        return int(size), int(time.time() * 1000)

    def write_file(self, rel_path: str, table: pa.Table):
        """Write `table` as Parquet at `rel_path` under the table (from the driver); its AddAction."""
        from deltalake.transaction import AddAction

        size, modified_ms = self.write_parquet(rel_path, table)
        return AddAction(rel_path, size, {}, modified_ms, True, json.dumps({"numRecords": table.num_rows}))

    def read_file(self, rel_path: str, columns: Sequence[str] | None = None) -> pa.Table:
        """A data file of the table (any version's, or an uncommitted one), as written. A local
        file is read by pyarrow's own file I/O; a remote one whole in one request, or, for some of
        its columns, by ranges (only those columns' bytes)."""
        import pyarrow.parquet as pq

        fs, root = self.filesystem()
        full = f"{root}/{rel_path}"
        columns = list(columns) if columns else None
        if is_local(self.uri):
            return pq.ParquetFile(full).read(columns=columns)
        if columns is None:
            return pq.ParquetFile(pa.BufferReader(fs.cat_file(full))).read()
        with fs.open(full, "rb") as f:
            return pq.read_table(f, columns=columns)


# ------------------------------------------------------------------------------------------------
# Housekeeping


@dataclass
class VacuumResult:
    compacted: dict[str, Any]
    deleted_files: list[str]
    version: int


def vacuum(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    retention_hours: int = 168,
    compact: bool = True,
    dry_run: bool = False,
    target_size: int | None = None,
) -> VacuumResult:
    """`psp vacuum OUTPUT`: compact small files into larger ones (a new version, same rows), then
    delete every file no version within `retention_hours` needs: files of crashed runs, replaced
    rows' old files, rewritten copies of failed commits. Younger files are kept, so a run still in
    flight and time travel (`--as-of`) within the retention keep working."""
    table = OutputTable(uri, storage_options)
    dt = table.load()
    if dt is None:
        raise FileNotFoundError(f"no psp output table at {uri!r}: nothing to vacuum")
    table_info(dt, uri)  # a psp table of this schema version, or ValueError
    compacted: dict[str, Any] = {}
    if compact and not dry_run:
        from deltalake.transaction import CommitProperties

        compacted = dt.optimize.compact(
            target_size=target_size,
            commit_properties=CommitProperties(custom_metadata={"psp.operation": "vacuum"}),
        )
        dt = table.load()
    deleted = dt.vacuum(retention_hours=max(0, int(retention_hours)), dry_run=dry_run,
                        enforce_retention_duration=False, full=True)
    return VacuumResult(compacted, sorted(deleted), dt.version())
