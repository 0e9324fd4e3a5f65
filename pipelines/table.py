"""Writing the output table (Delta Lake): Ray write tasks write Parquet, the driver commits once.

One run, whatever the command (invert, frontalize, nightly):

1. the run's sink (`RunSink`, a public `ray.data.Datasink`) writes the run's rows as Parquet files
   under ``OUTPUT/runs/<run_id>/`` in the write tasks (one row group each, up to FILE_TARGET_ROWS
   rows or FILE_TARGET_BYTES, with Delta statistics on the key and status columns), and hands the
   driver the files' Delta add actions and status counts -- it does not commit;
2. `commit_run` makes ONE Delta commit with those files, the files of rows adopted from a crashed
   run, and the removal of the rows they replace (and of deleted inputs): files holding such rows
   are removed and, if they hold other rows too, re-added as a rewritten copy without them. So the
   version after the commit holds exactly one row per input (per face with `--faces all`);
   history keeps the old rows. The commit is made with deltalake's public API
   (`DeltaTable.create_write_transaction`) and followed by a Delta checkpoint.

Keys: `image_id` keys a row, `source_id` (= `image_id_for(source_uri)`) the input. Every input a
run processes has a row whose image_id is its source_id (face 0, or its one image-level row), so
the run's image_ids name its inputs too: a row of the table is replaced when its image_id OR its
source_id is among them -- all face rows of a reprocessed input go, even when it now has fewer
faces. Adoption takes an input's rows only all together (`face_count` of them, from one run).

A run that dies before its commit is invisible (its files are referenced by no version); the next
run adopts its finished rows (`adoptable_rows`) and `psp vacuum` deletes the rest.

Concurrency: every commit is attempted at exactly the next version (`max_commit_retries=0`). If
another run committed since this run read the table, `commit_run` re-checks: when the other run
committed a row for one of this run's inputs, this run commits nothing and raises
`ConcurrentRunError` (a rerun adopts its rows); otherwise it recomputes its removals against the
new version and commits after it.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.ids import check_run_id
from schemas.outputs import (
    SCHEMA_VERSION,
    STYLE_DIM,
    output_schema,
    validate_tensors,
)
from schemas.status import FINAL_STATUSES
from schemas.table import (
    COMMIT_RUN,
    COMMIT_RUN_ID,
    RUNS_DIR,
    delta_storage_options,
    is_local,
    table_dataset,
    table_info,
    table_properties,
    table_uri,
)

RUN_FILES = "runs"  # OUTPUT/runs/<run_id>/*.parquet: the data files each run writes
COMMIT_ATTEMPTS = 5
TABLE_NAME = "psp_outputs"
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
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.uri if not is_local(self.uri) else self.path,
                                         **self.storage_options)
        return fs, root.rstrip("/")

    def worker_filesystem(self):
        """The pyarrow filesystem Ray write tasks use (None: local, or inferred from the URI).
        Built from the fsspec options, so credentials and retries are the same as for reads."""
        if is_local(self.uri) or not self.storage_options:
            return None
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))

    def write_file(self, rel_path: str, table: pa.Table):
        """Write `table` as Parquet at `rel_path` under the table (from the driver); its AddAction."""
        import pyarrow.parquet as pq
        from deltalake.transaction import AddAction

        fs, root = self.filesystem()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        full = f"{root}/{rel_path}"
        fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(full, data)
        return AddAction(rel_path, len(data), {}, int(time.time() * 1000), True,
                         json.dumps({"numRecords": table.num_rows}))

    def read_file(self, rel_path: str, columns: Sequence[str] | None = None) -> pa.Table:
        """A data file of the table (any version's, or an uncommitted one), as written."""
        import pyarrow.parquet as pq

        fs, root = self.filesystem()
        with fs.open(f"{root}/{rel_path}", "rb") as f:
            return pq.read_table(f, columns=list(columns) if columns else None)


# ------------------------------------------------------------------------------------------------
# Writing a run's files (Ray)


@dataclass
class SourceFacts:
    """Listing facts (size, mtime, etag) of the inputs a run processes, looked up by the rows'
    source_id in the write tasks: sorted 64-bit keys (first 16 hex chars of the input's
    image_id_for(source_uri), the `image_id` column here) and Arrow columns."""

    keys: np.ndarray
    image_id: pa.Array
    size: pa.Array
    mtime: pa.Array
    etag: pa.Array

    @classmethod
    def from_items(cls, items: Iterable[Any]) -> SourceFacts:
        """From `SourceItem`s (or anything with source_uri, size, mtime (epoch s), etag)."""
        from schemas.ids import image_id_for

        rows = [(image_id_for(it.source_uri), getattr(it, "size", None), getattr(it, "mtime", None),
                 getattr(it, "etag", None)) for it in items]
        rows.sort()
        ids = [r[0] for r in rows]
        return cls(
            keys=np.array([int(i[:16], 16) for i in ids], dtype=np.uint64),
            image_id=pa.array(ids, pa.string()),
            size=pa.array([None if r[1] is None or int(r[1]) < 0 else int(r[1]) for r in rows], pa.int64()),
            mtime=pa.array([mtime_us(r[2]) for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            etag=pa.array([None if r[3] is None else str(r[3]).strip('"') for r in rows], pa.string()),
        )

    def stamp(self, table: pa.Table) -> pa.Table:
        """`table` with source_size/mtime/etag filled from the facts where the row has none."""
        if len(self.keys) == 0 or table.num_rows == 0:
            return table
        ids = pc.coalesce(table["source_id"], table["image_id"]).to_pylist()  # every face row of an input
        keys = np.array([int(i[:16], 16) for i in ids], dtype=np.uint64)
        idx = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        take = pa.array(idx)
        found = pc.equal(self.image_id.take(take), pa.array(ids, pa.string()))
        for name, values in (("source_size", self.size), ("source_mtime", self.mtime), ("source_etag", self.etag)):
            have = table[name]
            fill = pc.if_else(found, values.take(take), pa.nulls(len(ids), values.type))
            col = pc.coalesce(have.cast(values.type), fill)
            table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), col)
        return table


def mtime_us(value: Any) -> int | None:
    """A listing's mtime (epoch seconds, datetime or ISO string) as integer microseconds (UTC)."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        value = (value if value.tzinfo else value.replace(tzinfo=_dt.UTC)).timestamp()
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return mtime_us(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    value = float(value)
    return None if np.isnan(value) else int(round(value * 1e6))


@dataclass
class WrittenRun:
    """What a run's write tasks produced, not yet committed: Delta add actions (paths relative to
    the table), and the image_id and status of every row in them -- loaded (`ids`, `statuses`,
    e.g. adopted rows), or still only in the files the write tasks wrote (`unloaded`: their
    status counts and rows are known, the ids are read by `load` when the commit needs them)."""

    run_id: str
    adds: list = field(default_factory=list)
    ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    statuses: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    unloaded: list = field(default_factory=list)
    unloaded_counts: dict[str, int] = field(default_factory=dict)
    unloaded_rows: int = 0

    def extend(self, adds: Sequence[Any], ids: pa.Array | pa.ChunkedArray, statuses: pa.Array | pa.ChunkedArray) -> None:
        self.adds.extend(adds)
        self.ids = _concat(self.ids, ids)
        self.statuses = _concat(self.statuses, statuses)

    def add_files(self, adds: Sequence[Any], counts: Mapping[str, int], rows: int) -> None:
        """Files written by write tasks: their add actions and status counts (ids not loaded)."""
        self.adds.extend(adds)
        self.unloaded.extend(adds)
        for k, v in counts.items():
            self.unloaded_counts[k] = self.unloaded_counts.get(k, 0) + int(v)
        self.unloaded_rows += int(rows)

    def merge(self, other: WrittenRun) -> None:
        self.extend([a for a in other.adds if a not in other.unloaded], other.ids, other.statuses)
        self.add_files(other.unloaded, other.unloaded_counts, other.unloaded_rows)

    @property
    def rows(self) -> int:
        return len(self.ids) + self.unloaded_rows

    def load(self, table: OutputTable) -> WrittenRun:
        """Read the image_id and status of the rows of the unloaded files (a few files at a time)."""
        if not self.unloaded:
            return self
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            parts = list(pool.map(lambda a: table.read_file(a.path, ("image_id", "status")), self.unloaded))
        for part in parts:
            self.ids = _concat(self.ids, part["image_id"])
            self.statuses = _concat(self.statuses, part["status"])
        self.unloaded, self.unloaded_counts, self.unloaded_rows = [], {}, 0
        return self

    def counts(self) -> dict[str, int]:
        out = dict(self.unloaded_counts)
        if len(self.statuses):
            for d in pc.value_counts(self.statuses).to_pylist():
                out[d["values"]] = out.get(d["values"], 0) + d["counts"]
        return dict(sorted(out.items()))


def _concat(a: pa.Array, b: pa.Array | pa.ChunkedArray) -> pa.Array:
    b = b.combine_chunks() if isinstance(b, pa.ChunkedArray) else b
    return pa.concat_arrays([a, b.cast(pa.string())])


#: A run's data files: one Parquet row group each, closed at whichever comes first of
#: FILE_TARGET_BYTES (Arrow bytes in memory, about the file's size before compression) and
#: FILE_TARGET_ROWS (give or take one input block). Ray hands each write task a bundle of about that many rows (`RunSink`), so a
#: task holds one file's rows (zero-copy views of its input blocks), never a run.
FILE_TARGET_BYTES = 64 * 2**20
FILE_TARGET_ROWS = 10_000
#: A run smaller than MIN_RUN_FILES full files is still written as this many files.
MIN_RUN_FILES = 8
#: CPUs each write task asks Ray for.
WRITE_CPUS = 0.25
#: Columns with Delta statistics (min / max / null count) in each add action: the keys and status.
STATS_COLUMNS = ("image_id", "source_id", "status")


def estimated_row_bytes(n_styles: int, images: str = "none", image_size: str = "256", output_size: int = 1024,
                        mix: int = 0, extra: int = 0) -> int:
    """About how many Arrow bytes one output row takes (W+, an encoded image, the small columns):
    what `RunSink` bundles rows by before the first block is seen."""
    w_plus = n_styles * 512 * 4
    side = output_size if str(image_size) == "full" else 256
    image = 0 if images == "none" else side * side * (3 if images == "png" else 1) // 2
    return int(1_500 + w_plus * (1 + mix) + image * (1 + mix) + extra)


def rows_per_file(row_bytes: int, target_bytes: int = FILE_TARGET_BYTES, target_rows: int = FILE_TARGET_ROWS) -> int:
    """Rows of one data file: `target_rows`, or fewer when `target_bytes` comes first."""
    return max(1, min(int(target_rows), int(target_bytes) // max(1, int(row_bytes))))


def file_stats(table: pa.Table, columns: Sequence[str] = STATS_COLUMNS) -> str:
    """The Delta `stats` JSON of a data file: numRecords, and min / max / nullCount of `columns`."""
    mins, maxs, nulls = {}, {}, {}
    for name in columns:
        col = table[name]
        nulls[name] = col.null_count
        if col.null_count < len(col):
            mm = pc.min_max(col)
            mins[name], maxs[name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


@dataclass
class WrittenFile:
    """One data file a write task wrote: path relative to the table, bytes, rows, Delta stats JSON,
    rows per status."""

    path: str
    size: int
    rows: int
    stats: str
    counts: dict[str, int]
    modified_ms: int

    def add_action(self):
        from deltalake.transaction import AddAction

        return AddAction(self.path, self.size, {}, self.modified_ms, True, self.stats)


def _run_sink_class():
    from ray.data import Datasink

    class RunSink(Datasink):
        """The run's write tasks (Ray Data's public `Datasink`): each checks its rows (tensor
        lengths), casts them to the output schema and writes them as Parquet data files of one
        row group under ``OUTPUT/runs/<run_id>/``, each at most `rows_per_file` rows and
        FILE_TARGET_BYTES; nothing is committed here. Ray bundles about one file's rows per task
        (`min_rows_per_write`). File names are fixed per (sink, task, file), so a retried task
        overwrites its own files and returns them once. The driver's `written` collects add
        actions and status counts (never a value per row)."""

        def __init__(self, table: OutputTable, run_id: str, n_styles: int, file_rows: int = FILE_TARGET_ROWS,
                     file_bytes: int = FILE_TARGET_BYTES):
            self.table = table
            self.run_id = run_id
            self.n_styles = n_styles
            self.file_rows = max(1, int(file_rows))
            self.file_bytes = max(1, int(file_bytes))
            self.write_id = uuid.uuid4().hex
            self.written: WrittenRun | None = None

        @property
        def min_rows_per_write(self) -> int:
            return self.file_rows

        def get_name(self) -> str:
            return "WriteRun"

        def _prepare(self, block) -> pa.Table:
            from ray.data.block import BlockAccessor

            table = BlockAccessor.for_block(block).to_arrow()
            schema = output_schema(self.n_styles)
            table = table.select(schema.names).cast(schema)  # a block of another schema fails here
            validate_tensors(table, self.n_styles)
            return table

        def _write_file(self, table: pa.Table, name: str) -> WrittenFile:
            import pyarrow.parquet as pq

            fs, root = self.table.filesystem()
            rel = f"{RUN_FILES}/{self.run_id}/{name}"
            full = f"{root}/{rel}"
            fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(full, "wb") as f:
                pq.write_table(table, f, row_group_size=max(1, table.num_rows), compression="snappy")
                size = f.tell()
            counts = {d["values"]: d["counts"] for d in pc.value_counts(table["status"]).to_pylist()}
            return WrittenFile(rel, int(size), table.num_rows, file_stats(table), counts,
                               int(time.time() * 1000))

        def write(self, blocks, ctx) -> list[WrittenFile]:
            task = int(getattr(ctx, "task_idx", 0) or 0)
            # The task's input blocks are already in its memory (zero-copy views of the object
            # store): cut them into files of even size, none over the row and byte targets.
            tables = [t for t in (self._prepare(b) for b in blocks) if t.num_rows]
            if not tables:
                return []
            whole = pa.concat_tables(tables)
            per_row = max(1, whole.nbytes // whole.num_rows)
            # Ray's bundles overshoot the target by up to a block: a file may too (never a tiny one).
            n_files = max(1, round(whole.num_rows / rows_per_file(per_row, self.file_bytes, self.file_rows)))
            step = math.ceil(whole.num_rows / n_files)
            out = []
            for k, start in enumerate(range(0, whole.num_rows, step)):
                name = f"part-{self.write_id}-{task:06d}-{k:04d}.parquet"
                out.append(self._write_file(whole.slice(start, step).combine_chunks(), name))
            return out

        def on_write_complete(self, write_result) -> None:
            written = WrittenRun(self.run_id)
            for files in write_result.write_returns:
                for f in files or ():
                    written.add_files([f.add_action()], f.counts, f.rows)
            self.written = written

    return RunSink


def write_run(ds, table: OutputTable, run_id: str, n_styles: int, row_bytes: int | None = None,
              expected_rows: int | None = None) -> WrittenRun:
    """Write a Ray Dataset of output-schema tables as the files of run `run_id` (not committed).

    Rows carry their listing facts (source_size/mtime/etag) from the read stage. A block that is
    not an output table of `n_styles` fails the write; a failed block fails it too
    (`max_errored_blocks = 0`): rows are never silently lost. The driver gets add actions and
    status counts, not a value per row. row_bytes: about the bytes of one row
    (`estimated_row_bytes`; None: W+ and the small columns), which sizes the data files.
    expected_rows: about how many rows the run writes (None: unknown); a small run is cut into
    at least MIN_RUN_FILES files, so its first files are finished (and adoptable after a crash)
    while the rest is still in flight.
    """
    from ray.data import DataContext

    check_run_id(run_id)
    DataContext.get_current().max_errored_blocks = 0
    ds.context.max_errored_blocks = 0
    file_rows = rows_per_file(row_bytes or estimated_row_bytes(n_styles))
    if expected_rows:
        file_rows = min(file_rows, max(1, math.ceil(int(expected_rows) / MIN_RUN_FILES)))
    sink = _run_sink_class()(table, run_id, n_styles, file_rows=file_rows)
    # Writing is I/O: a fractional CPU, so write tasks run beside the stages' actors while the run
    # is in flight (a whole CPU waited for the read tasks to end on small machines, and every
    # finished row waited in the object store until then).
    ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
    return sink.written or WrittenRun(run_id)


# ------------------------------------------------------------------------------------------------
# Adopting the rows of crashed runs


def committed_run_ids(dt) -> set[str]:
    """Run ids of every commit the table's history knows (`psp.run_id` of its commit info)."""
    if dt is None:
        return set()
    return {c[COMMIT_RUN_ID] for c in dt.history() if c.get(COMMIT_RUN_ID)}


def uncommitted_runs(table: OutputTable, dt, exclude_run: str | None = None) -> list[str]:
    """Ids of the runs with files under ``runs/`` that no commit of `dt`'s history names (runs
    that died before their commit, or are still in flight), sorted; `exclude_run` left out."""
    fs, root = table.filesystem()
    base = f"{root}/{RUN_FILES}"
    try:
        fs.invalidate_cache(base)
        run_dirs = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    except FileNotFoundError:
        return []
    skip = committed_run_ids(dt) | {exclude_run}
    return [r for r in run_dirs if r not in skip]


def adoptable_rows(
    table: OutputTable, dt, wanted: pa.Table, checkpoint_sha256: str | None, retry_failed: bool,
    exclude_run: str | None = None,
) -> WrittenRun:
    """Rows that uncommitted (crashed) runs wrote under ``runs/<id>/`` for inputs in `wanted`
    (a table with image_id = the input's source_id, source_size, source_mtime, source_etag: the
    current listing facts), made from the same bytes (facts unchanged) and the same checkpoint;
    with `retry_failed`, not transient failures. An input's rows are adopted all together or not
    at all: all `face_count` of them (one without a face count), from one run, each passing those
    tests. A file whose rows are all adopted is added as it is; from other files the adopted rows
    are copied into ``runs/<exclude_run>/adopted-*.parquet``. The first run (by id) wins."""
    from schemas.status import is_transient

    out = WrittenRun(exclude_run or "")
    if wanted.num_rows == 0:
        return out
    run_dirs = uncommitted_runs(table, dt, exclude_run)
    if not run_dirs:
        return out
    fs, root = table.filesystem()
    base = f"{root}/{RUN_FILES}"
    live = table.files(dt)
    facts = {r["image_id"]: r for r in wanted.select(["image_id", "source_size", "source_mtime", "source_etag"]).to_pylist()}
    small = ["image_id", "source_id", "face_count", "status", "checkpoint_sha256", "source_size",
             "source_mtime", "source_etag"]
    taken: set[str] = set()  # inputs (source_id) adopted from an earlier run
    for run in run_dirs:
        files = []  # (rel, full path, small columns)
        for full in sorted(p for p in fs.find(f"{base}/{run}") if p.endswith(".parquet")):
            rel = full[len(root) + 1:]
            if rel in live:
                continue
            try:  # the small columns first: a file adopted whole is never read further
                files.append((rel, full, table.read_file(rel, small)))
            except Exception:  # noqa: BLE001, S112 - cut short by the crash, or another schema
                continue
        rows_of: dict[str, list[tuple[int, int, str, bool]]] = {}  # source -> (file, row, image_id, ok)
        expected: dict[str, int] = {}
        for f, (_, _, rows) in enumerate(files):
            for i, r in enumerate(rows.to_pylist()):
                src = r["source_id"] or r["image_id"]
                want = facts.get(src)
                if want is None or src in taken:
                    continue
                ok = ((checkpoint_sha256 is None or r["checkpoint_sha256"] == checkpoint_sha256)
                      and not facts_changed(want, r)
                      and not (retry_failed and is_transient(r["status"])))
                rows_of.setdefault(src, []).append((f, i, r["image_id"], ok))
                expected[src] = max(1, r["face_count"] or 1)
        keep: dict[int, list[int]] = {}
        for src, found in rows_of.items():
            complete = len(found) == len({x[2] for x in found}) == expected[src]
            if complete and all(x[3] for x in found):
                taken.add(src)
                for f, i, _, _ in found:
                    keep.setdefault(f, []).append(i)
        for f in sorted(keep):
            rel, full, rows = files[f]
            picked_idx = sorted(keep[f])
            if len(picked_idx) == rows.num_rows:
                from deltalake.transaction import AddAction

                add = AddAction(rel, fs.size(full), {}, int(time.time() * 1000), True,
                                json.dumps({"numRecords": rows.num_rows}))
                picked = rows
            else:
                picked = table.read_file(rel).take(pa.array(picked_idx, pa.int64()))
                add = table.write_file(f"{RUN_FILES}/{exclude_run}/adopted-{uuid.uuid4().hex}.parquet", picked)
            out.extend([add], picked["image_id"], picked["status"])
    return out


def facts_changed(listed: Mapping[str, Any], made_from: Mapping[str, Any]) -> bool:
    """True if an input's listing facts (source_size/mtime/etag) differ from those a row was made
    from. Where both have an ETag it decides (with the size): re-uploaded identical bytes are no
    change. Without ETags size and mtime decide; with nothing comparable: changed."""
    a_size, b_size = listed.get("source_size"), made_from.get("source_size")
    if a_size is not None and b_size is not None and a_size != b_size:
        return True
    a_etag, b_etag = listed.get("source_etag"), made_from.get("source_etag")
    if a_etag is not None and b_etag is not None:
        return a_etag != b_etag
    a_mtime, b_mtime = listed.get("source_mtime"), made_from.get("source_mtime")
    if a_mtime is not None and b_mtime is not None:
        return a_mtime != b_mtime
    return a_etag != b_etag or a_mtime != b_mtime


# ------------------------------------------------------------------------------------------------
# Committing


@dataclass
class CommitResult:
    """A committed run: the table version it made, rows added, and old rows it removed."""

    version: int
    added: int
    removed: int
    rewritten_files: int
    attempts: int


def _conflicts(table: OutputTable, dt, read_version: int | None, ids: pa.Array) -> pa.Table:
    """Rows for `ids` that another run committed after `read_version` (rows merely moved by a
    rewrite or compaction, same run_id and processed_at as before, do not count)."""
    if dt is None or read_version == dt.version():
        return pa.table({"image_id": pa.array([], pa.string())})
    cols = ("image_id", "source_uri", "run_id", "processed_at")
    now = table.state(dt, cols, ids)
    before_dt = table.load(read_version) if read_version is not None else None
    fresh = now.filter(pc.invert(pc.is_in(now["_file"], value_set=pa.array(sorted(table.files(before_dt)), pa.string()))))
    if fresh.num_rows == 0:
        return fresh
    before = table.state(before_dt, cols, fresh["image_id"])
    old = set(zip(before["image_id"].to_pylist(), before["run_id"].to_pylist(), before["processed_at"].to_pylist()))
    keep = [(i, r, t) not in old for i, r, t in zip(fresh["image_id"].to_pylist(), fresh["run_id"].to_pylist(),
                                                      fresh["processed_at"].to_pylist())]
    return fresh.filter(pa.array(keep, pa.bool_()))


def _removals(table: OutputTable, dt, drop_ids: pa.Array, run_id: str) -> tuple[list, int]:
    """Actions that take the rows of `drop_ids` (image_id or source_id among them: every face row of
    those inputs) out of `dt`'s version: RemoveAction per file
    holding one, plus an AddAction for a rewritten copy of the file's other rows. (actions, rows
    removed)."""
    from deltalake.transaction import RemoveAction

    if dt is None or len(drop_ids) == 0:
        return [], 0
    hit = table.state(dt, ("image_id",), drop_ids)
    if hit.num_rows == 0:
        return [], 0
    sizes = {r["path"]: r["size_bytes"] for r in pa.table(dt.get_add_actions(flatten=True)).select(["path", "size_bytes"]).to_pylist()}
    actions: list = []
    now_ms = int(time.time() * 1000)
    for rel in sorted(set(hit["_file"].to_pylist())):
        actions.append(RemoveAction(rel, True, now_ms, sizes.get(rel), {}))
        rows = table.read_file(rel)
        gone = pc.or_(pc.is_in(rows["image_id"], value_set=drop_ids), pc.is_in(rows["source_id"], value_set=drop_ids))
        rest = rows.filter(pc.invert(gone))
        if rest.num_rows:
            actions.append(table.write_file(f"{RUN_FILES}/{run_id}/rewrite-{uuid.uuid4().hex}.parquet", rest))
    return actions, hit.num_rows


def _dedupe(table: OutputTable, run: WrittenRun) -> WrittenRun:
    """`run` with each image_id once: a file holding a later copy of an id is rewritten without it
    (Ray retries write whole blocks again, so this should never happen; never commit a twin)."""
    if pc.count_distinct(run.ids).as_py() == len(run.ids):  # Arrow's hash, no Python object per row
        return run
    seen: set[str] = set()
    out = WrittenRun(run.run_id)
    for add in run.adds:
        rows = table.read_file(add.path)
        keep = [i for i, x in enumerate(rows["image_id"].to_pylist()) if x not in seen]
        seen.update(rows["image_id"].take(pa.array(keep, pa.int64())).to_pylist())
        if len(keep) == rows.num_rows:
            out.extend([add], rows["image_id"], rows["status"])
        elif keep:
            picked = rows.take(pa.array(keep, pa.int64()))
            out.extend([table.write_file(f"{RUN_FILES}/{run.run_id}/dedup-{uuid.uuid4().hex}.parquet", picked)],
                       picked["image_id"], picked["status"])
    return out


def commit_run(
    table: OutputTable,
    run: WrittenRun,
    n_styles: int,
    summary: Mapping[str, Any],
    read_version: int | None,
    remove_ids: Sequence[str] | pa.Array = (),
) -> CommitResult | None:
    """Commit `run` (its rows replace every current row of the same inputs: same image_id, or a
    source_id among the run's image_ids) and remove the rows of `remove_ids` (deleted inputs'
    source ids: all their face rows), in one Delta commit carrying `summary` as `psp.run`.

    `read_version`: the version the run planned against (None: no table then). Returns None when
    there is nothing to commit. Raises ConcurrentRunError when another run committed one of these
    inputs since `read_version` (nothing committed), and the delta-rs error if the commit fails.
    """
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import CommitProperties

    remove = pa.array(list(remove_ids) if not isinstance(remove_ids, pa.Array) else remove_ids, pa.string())
    if not run.adds and len(remove) == 0:
        return None
    run = _dedupe(table, run.load(table))
    touched = pa.concat_arrays([run.ids, remove]).unique()
    meta = {COMMIT_RUN_ID: run.run_id, COMMIT_RUN: json.dumps(dict(summary), sort_keys=True, default=_json_default)}
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        dt = table.ensure(n_styles)
        clash = _conflicts(table, dt, read_version, touched)
        if clash.num_rows:
            others = sorted(set(clash["run_id"].to_pylist()))
            raise ConcurrentRunError(
                f"run {run.run_id} did not commit: run(s) {', '.join(others)} committed {clash.num_rows} of "
                f"its inputs to {table.uri} after it started (e.g. {clash['source_uri'][0].as_py()}). "
                "Nothing of this run is visible; rerun the same command: what is committed is kept and "
                "this run's finished rows are adopted, not redone"
            )
        removals, removed = _removals(table, dt, touched, run.run_id)
        actions = list(run.adds) + removals
        try:
            dt.create_write_transaction(
                actions, mode="append", schema=output_schema(n_styles),
                commit_properties=CommitProperties(custom_metadata=meta, max_commit_retries=0),
            )
        except CommitFailedError:
            # Another commit took the next version: re-check against it (our rewritten copies
            # are orphans now; vacuum removes them).
            if attempt == COMMIT_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)
            continue
        after = table.load()
        version = after.version()
        checkpoint(after)
        rewritten = sum(1 for a in removals if not hasattr(a, "deletion_timestamp"))
        return CommitResult(version, len(run.ids), removed, rewritten, attempt)
    return None  # pragma: no cover - the loop returns or raises


def checkpoint(dt) -> bool:
    """Write a Delta checkpoint of `dt`'s version (readers then open the table from it, not by
    replaying every commit). A failed checkpoint costs readers time, never data: False then."""
    import logging

    try:
        dt.create_checkpoint()
    except Exception as e:  # noqa: BLE001 - the commit is done; the next run checkpoints again
        logging.getLogger(__name__).warning("table %s: checkpoint after version %s failed: %s",
                                            dt.table_uri, dt.version(), e)
        return False
    return True


class StatusCounts:
    """A `pipelines.scan.scan_table` aggregate: rows per status."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, batch, file: str = "") -> None:
        for d in pc.value_counts(batch.column(0)).to_pylist():
            self.counts[d["values"]] = self.counts.get(d["values"], 0) + d["counts"]

    def merge(self, other: StatusCounts) -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v


def table_status_counts(table: OutputTable, version: int) -> dict[str, int]:
    """Rows per status of the table at `version`, read file by file (in Ray tasks for a table of
    many files): the caller's memory does not grow with the table."""
    from pipelines.scan import scan_table, table_files

    files = table_files(table.uri, table.storage_options, version)
    counts = scan_table(files, ["status"], StatusCounts).counts
    return dict(sorted((k, v) for k, v in counts.items() if v))


def write_run_summary(table: OutputTable, summary: Mapping[str, Any], version: int) -> dict:
    """Write ``OUTPUT/_runs/<run_id>.json``: the run's summary plus the whole table's counts at
    `version` (rows per status), so the state of the output is readable after every run."""
    import fsspec  # noqa: F401 - through table.filesystem()

    doc = dict(summary)
    counts = table_status_counts(table, version)
    doc["table"] = {"version": version, "rows": sum(counts.values()), "counts": counts}
    fs, root = table.filesystem()
    text = json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n"
    fs.makedirs(f"{root}/{RUNS_DIR}", exist_ok=True)
    fs.pipe_file(f"{root}/{RUNS_DIR}/{doc['run_id']}.json", text.encode())
    return json.loads(text)


def run_metadata() -> dict[str, Any]:
    """Facts every run summary records: schema version and the versions shaping the outputs."""
    import platform

    def version(dist: str) -> str | None:
        try:
            return _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            return None

    versions = {d: version(d) for d in ("psp-pipeline", "torch", "ray", "pyarrow", "numpy", "deltalake")}
    versions["python"] = platform.python_version()
    return {"schema_version": SCHEMA_VERSION, "versions": versions}


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


__all__ = [
    "FINAL_STATUSES",
    "STYLE_DIM",
    "CommitResult",
    "ConcurrentRunError",
    "OutputTable",
    "SourceFacts",
    "TableMismatchError",
    "WrittenRun",
    "adoptable_rows",
    "checkpoint",
    "estimated_row_bytes",
    "rows_per_file",
    "table_status_counts",
    "uncommitted_runs",
    "commit_run",
    "facts_changed",
    "mtime_us",
    "vacuum",
    "write_run",
    "write_run_summary",
]
