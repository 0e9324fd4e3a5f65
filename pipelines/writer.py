"""Writing a run's files: Ray write tasks (`RunSink`, a public `ray.data.Datasink`) write Parquet
under ``OUTPUT/runs/<run_id>/`` -- one row group per file, up to FILE_TARGET_ROWS rows or
FILE_TARGET_BYTES, with Delta statistics on the key and status columns -- and the driver gets the
files' Delta add actions and status counts (never a value per row); `pipelines.commit` commits them.
"""
from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.table import RUN_FILES, STATS_COLUMNS, OutputTable
from schemas.ids import check_run_id
from schemas.outputs import output_schema, validate_tensors


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
            rel = f"{RUN_FILES}/{self.run_id}/{name}"
            size, modified_ms = self.table.write_parquet(rel, table)
            counts = {d["values"]: d["counts"] for d in pc.value_counts(table["status"]).to_pylist()}
            return WrittenFile(rel, size, table.num_rows, file_stats(table), counts, modified_ms)

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
