"""Writing a run's files: Ray write tasks write Parquet under ``OUTPUT/runs/<run_id>/``; the driver
gets the Delta add actions and status counts (never a value per row) and commits later
(`pipelines.commit`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.table import RUN_FILES, OutputTable
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


def _run_sink_class():
    from ray.data._internal.datasource.delta_datasink import (
        DeltaDatasink,
        DeltaWriteResult,
    )

    @dataclass
    class RunWriteResult(DeltaWriteResult):
        counts: dict = field(default_factory=dict)  # rows per status
        rows: int = 0

    class RunSink(DeltaDatasink):
        """Ray Data's Delta sink, writing one run's files under OUTPUT/runs/<run_id>/ without
        committing: each block is checked (tensor lengths) and cast to the output schema (the
        rows carry their listing facts from the read stage); the driver's `written` collects the
        add actions and status counts (never a value per row)."""

        def __init__(self, table: OutputTable, run_id: str, n_styles: int):
            run_dir = f"{table.path}/{RUN_FILES}/{run_id}"
            super().__init__(run_dir, storage_options=table.delta_options,
                             filesystem=table.worker_filesystem(), schema_mode="error")
            self.run_id = run_id
            self.n_styles = n_styles
            self.written: WrittenRun | None = None

        def _prepare(self, block) -> pa.Table:
            from ray.data.block import BlockAccessor

            table = BlockAccessor.for_block(block).to_arrow()
            schema = output_schema(self.n_styles)
            table = table.select(schema.names).cast(schema)  # a block of another schema fails here
            validate_tensors(table, self.n_styles)
            return table

        def write(self, blocks, ctx):
            tables = [self._prepare(b) for b in blocks]
            res = super().write(tables, ctx)
            counts: dict[str, int] = {}
            for t in tables:
                for d in pc.value_counts(t["status"]).to_pylist():
                    counts[d["values"]] = counts.get(d["values"], 0) + d["counts"]
            return RunWriteResult(add_actions=res.add_actions, schemas=res.schemas, counts=counts,
                                  rows=sum(t.num_rows for t in tables))

        def on_write_complete(self, write_result) -> None:
            from deltalake.transaction import AddAction

            written = WrittenRun(self.run_id)
            prefix = f"{RUN_FILES}/{self.run_id}/"
            for res in write_result.write_returns:
                if res is None:
                    continue
                adds = [AddAction(prefix + a.path, a.size, a.partition_values, a.modification_time,
                                  a.data_change, a.stats) for a in res.add_actions]
                written.add_files(adds, res.counts, res.rows)
            self.written = written

    return RunSink


def write_run(ds, table: OutputTable, run_id: str, n_styles: int) -> WrittenRun:
    """Write a Ray Dataset of output-schema tables as the files of run `run_id` (not committed).

    Rows carry their listing facts (source_size/mtime/etag) from the read stage. A block that is
    not an output table of `n_styles` fails the write; a failed block fails it too
    (`max_errored_blocks = 0`): rows are never silently lost. The driver gets add actions and
    status counts, not a value per row.
    """
    from ray.data import DataContext

    check_run_id(run_id)
    DataContext.get_current().max_errored_blocks = 0
    ds.context.max_errored_blocks = 0
    sink = _run_sink_class()(table, run_id, n_styles)
    ds.write_datasink(sink)
    return sink.written or WrittenRun(run_id)
