"""What a run's commit changes, as a distributed join: nothing per row on the driver.

A run's commit (`pipelines.commit.commit_run`) adds the run's files and takes out of the table
every current row the run replaces (image_id, or source_id, among the run's image_ids) and every
row of a deleted input; a file holding such rows is removed and, if it holds other rows too,
re-added as a rewritten copy without them. Which rows those are is a join of the run's rows with
the table's, hash-partitioned like the plan's (`pipelines.diff`):

1. map: one Ray task per group of data files -- the run's, the table's current ones, and (when
   another run committed since this one planned) the files of the version it planned against that
   are gone since -- reads the small columns (`KEY_COLUMNS`) and splits the rows into partitions
   by a hash of the input's key (source_id; image_id for a row without one): every row of an
   input, face rows included, lands in the same partition on every side;
2. reduce: one task per partition (`join_partition`, pure Arrow) finds the run's twins (a later
   copy of an image_id, e.g. from a retried write block), the table rows replaced or deleted, and
   the rows another run committed for these inputs since `read_version` (a conflict); it returns
   counts per file to the driver and the (file, row) positions to drop as a Ray object;
3. rewrite: one task per group of touched files reads a file, drops its rows and writes the copy
   under ``runs/<run_id>/`` (`rewrite-*` for table files, `dedup-*` for the run's own), returning
   the copy's add-action fields.

The driver holds file names, counts per file and object references. A small commit (under
`pipelines.diff.LOCAL_MAX_ROWS` rows) without Ray running takes the same steps in the calling
process; a run's commit (Ray is up) always uses tasks, because a rewrite reads whole rows.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.diff import LOCAL_MAX_ROWS, PARTITION_ROWS, plan_partitions, split
from pipelines.table import RUN_FILES, OutputTable
from pipelines.writer import file_stats
from schemas.outputs import output_schema

RUN, TABLE, MOVED = 0, 1, 2  # kinds of file: the run's, the table's current, gone since read_version
KEY_COLUMNS = ("image_id", "source_id", "source_uri", "run_id", "processed_at")
KEY = "_key"
MAP_FILES = 8  # data files per map task
REWRITE_FILES = 1  # touched files per rewrite task
TASK_CPUS = 0.25  # bookkeeping tasks: mostly I/O
# A rewrite decodes and encodes a whole data file (≈ 0.4 s of CPU for 2,048 rows of W+): one per
# core. At 0.25 CPU, eight on two cores took as long as one after the other (49 files of a 100k
# table: 20.7 s; one core each: 11.9 s; in one process: 22.2 s).
REWRITE_CPUS = 1.0
DROP_SCHEMA = pa.schema([("_kind", pa.int8()), ("_f", pa.int32()), ("_row", pa.int64())])


def rows_schema() -> pa.Schema:
    schema = output_schema(1)
    return pa.schema([schema.field(c) for c in KEY_COLUMNS] + [
        pa.field(KEY, pa.string()), pa.field("_fresh", pa.bool_()), *DROP_SCHEMA])


def read_rows(table: OutputTable, files: Sequence[tuple[int, int, str, bool]]) -> pa.Table:
    """`KEY_COLUMNS` of `files` ((kind, file index, path relative to the table, fresh)) with the
    partition key, the file's kind, index and freshness and each row's position in its file."""
    schema = rows_schema()
    parts = []
    for kind, f, rel, fresh in files:
        t = table.read_file(rel, KEY_COLUMNS).select(list(KEY_COLUMNS))
        t = t.cast(pa.schema([schema.field(c) for c in KEY_COLUMNS]))
        n = t.num_rows
        t = t.append_column(KEY, pc.coalesce(t["source_id"], t["image_id"]))
        t = t.append_column("_fresh", pa.array(np.full(n, bool(fresh))))
        t = t.append_column("_kind", pa.array(np.full(n, kind, dtype=np.int8)))
        t = t.append_column("_f", pa.array(np.full(n, f, dtype=np.int32)))
        parts.append(t.append_column("_row", pa.array(np.arange(n, dtype=np.int64))))
    return pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()


def map_rows(table: OutputTable, files, partitions: int):
    """A map task: `read_rows` cut into `partitions` parts by the key's hash (one table for one)."""
    parts = split(read_rows(table, files), partitions, KEY)
    return parts if partitions > 1 else parts[0]


def join_partition(rows: pa.Table, remove: pa.Array) -> tuple[pa.Table, pa.Table]:
    """One partition of a commit: `rows` (`rows_schema`, every kind) and `remove` (source ids of
    deleted inputs). Returns (drops: `DROP_SCHEMA` positions of the run's twins -- every copy of
    an image_id after its first, in file then row order -- and of the table rows replaced or
    deleted: image_id or source_id among the run's image_ids or `remove`; clash: source_uri and
    run_id of the rows among those that another run committed since the run planned -- in a
    fresh file, and not merely moved there from a file of the planned version)."""
    kind = rows["_kind"]
    run = rows.filter(pc.equal(kind, RUN))
    run = run.take(pc.sort_indices(run, sort_keys=[("_f", "ascending"), ("_row", "ascending")]))
    idx = pa.array(np.arange(run.num_rows, dtype=np.int64))
    keep = pa.table({"image_id": run["image_id"], "_i": idx}).group_by("image_id", use_threads=False).aggregate(
        [("_i", "min")])["_i_min"]
    twins = run.filter(pc.invert(pc.is_in(idx, value_set=keep)))
    ids = pa.concat_arrays([pc.unique(run["image_id"]).cast(pa.string()), remove.cast(pa.string())]).unique()
    tab = rows.filter(pc.equal(kind, TABLE))
    hit = tab.filter(pc.fill_null(pc.or_(pc.is_in(tab["image_id"], value_set=ids),
                                         pc.is_in(tab["source_id"], value_set=ids)), False))
    fresh = hit.filter(hit["_fresh"]).select(["image_id", "run_id", "processed_at", "source_uri"])
    moved = rows.filter(pc.equal(kind, MOVED)).select(["image_id", "run_id", "processed_at"])
    if fresh.num_rows and moved.num_rows:
        fresh = fresh.join(moved, keys=["image_id", "run_id", "processed_at"], join_type="left anti",
                           use_threads=False)
    drops = pa.concat_tables([twins.select(DROP_SCHEMA.names), hit.select(DROP_SCHEMA.names)])
    return drops.cast(DROP_SCHEMA), fresh.select(["source_uri", "run_id"])


def reduce_rows(remove: pa.Array, *parts: pa.Table) -> tuple[dict, pa.Table]:
    """A reduce task: `join_partition` of its parts; (summary for the driver: drops per (kind,
    file), the clash's count, run ids and one source_uri; the drops, for the rewrite tasks)."""
    parts = [p for p in parts if p.num_rows]
    rows = pa.concat_tables(parts) if parts else rows_schema().empty_table()
    drops, clash = join_partition(rows, remove)
    per_file = {}
    if drops.num_rows:
        got = drops.group_by(["_kind", "_f"], use_threads=False).aggregate([("_row", "count")])
        per_file = {(k, f): n for k, f, n in zip(got["_kind"].to_pylist(), got["_f"].to_pylist(),
                                                 got["_row_count"].to_pylist())}
    summary = {"files": per_file, "clash": clash.num_rows,
               "clash_runs": sorted(set(pc.unique(clash["run_id"]).to_pylist()) - {None}),
               "clash_uri": clash["source_uri"][0].as_py() if clash.num_rows else None}
    return summary, drops


def rewrite_files(table: OutputTable, run_id: str, files: Sequence[tuple[int, int, str]],
                  *drops: pa.Table) -> list[tuple[int, int, tuple | None]]:
    """A rewrite task: each of `files` ((kind, file index, path)) without its rows in `drops`,
    written as a copy under ``runs/<run_id>/``. Returns (kind, file index, the copy's (path, size,
    modified ms, stats JSON) or None when no row is left)."""
    drops = [d for d in drops if d.num_rows]
    gone = pa.concat_tables(drops) if drops else DROP_SCHEMA.empty_table()
    out = []
    for kind, f, rel in files:
        mine = gone.filter(pc.and_(pc.equal(gone["_kind"], kind), pc.equal(gone["_f"], f)))["_row"]
        rest = without_rows(table.read_file(rel), mine.to_numpy())
        if not rest.num_rows:
            out.append((kind, f, None))
            continue
        name = "dedup" if kind == RUN else "rewrite"
        path = f"{RUN_FILES}/{run_id}/{name}-{uuid.uuid4().hex}.parquet"
        size, modified_ms = table.write_parquet(path, rest)
        out.append((kind, f, (path, size, modified_ms, file_stats(rest))))
    return out


def without_rows(rows: pa.Table, drop: np.ndarray) -> pa.Table:
    """`rows` less the rows at positions `drop`, as zero-copy slices of the runs between them (a
    filter would copy every latent of the file: 0.1 s for 2,048 rows of W+, as much as half the
    Parquet write)."""
    keep = np.ones(rows.num_rows, dtype=np.int8)
    keep[drop] = 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep, [0]])))  # starts, stops of kept runs
    if len(edges) == 2 and edges[0] == 0 and edges[1] == rows.num_rows:
        return rows
    return pa.concat_tables([rows.slice(a, b - a) for a, b in zip(edges[::2], edges[1::2])] or [rows.slice(0, 0)])


@dataclass
class Changes:
    """What a commit changes, from `changes`: per touched file (kind, index) the rows dropped and
    its rewritten copy (path, size, modified ms, stats; None: none left); the clash (rows another
    run committed for these inputs since the run planned: count, run ids, one source_uri)."""

    dropped: dict[tuple[int, int], int] = field(default_factory=dict)
    copies: dict[tuple[int, int], tuple | None] = field(default_factory=dict)
    clash: int = 0
    clash_runs: list[str] = field(default_factory=list)
    clash_uri: str | None = None
    paths: dict[tuple[int, int], str] = field(default_factory=dict)  # touched files

    def rows_dropped(self, kind: int) -> int:
        return sum(n for (k, _), n in self.dropped.items() if k == kind)


def commit_files(table: OutputTable, dt, run_paths: Sequence[str], read_version: int | None):
    """The files a commit joins: [(kind, index, path, fresh)] of the run's files, the table's
    current ones (fresh: not in the `read_version` the run planned against), and the planned
    version's files gone since."""
    current = sorted(table.files(dt))
    changed = dt is not None and read_version != dt.version()
    before = table.files(table.load(read_version)) if changed and read_version is not None else set()
    files = [(RUN, i, p, False) for i, p in enumerate(run_paths)]
    files += [(TABLE, i, p, changed and p not in before) for i, p in enumerate(current)]
    files += [(MOVED, i, p, False) for i, p in enumerate(sorted(before - set(current)))]
    return files


def changes(table: OutputTable, dt, run_paths: Sequence[str], run_rows: int, remove: pa.Array,
            read_version: int | None, run_id: str, *, use_ray: bool | None = None,
            partition_rows: int = PARTITION_ROWS) -> Changes:
    """The `Changes` of committing the run's files `run_paths` (`run_rows` rows) and removing the
    rows of `remove` (source ids) at `dt`'s version (see the module doc). Rewritten copies are
    written only when there is no clash. use_ray: None: in Ray tasks when Ray is up (a pipeline
    run) or the commit is big; in the calling process otherwise (a rewrite reads whole rows,
    tensors and all: never on the driver of a run)."""
    from pipelines.diff import table_row_count

    files = commit_files(table, dt, run_paths, read_version)
    table_rows = table_row_count(dt)
    if use_ray is None:
        use_ray = _ray_up() or run_rows + table_rows > LOCAL_MAX_ROWS
    groups = [files[i:i + MAP_FILES] for i in range(0, len(files), MAP_FILES)]
    if not use_ray:
        summary, drops = reduce_rows(remove, *[map_rows(table, g, 1) for g in groups])
        out = _summed([summary])
        if out.clash or not out.dropped:
            return out
        for kind, f, copy in rewrite_files(table, run_id, _touched(files, out), drops):
            out.copies[(kind, f)] = copy
        return out
    return _changes_in_ray(table, files, groups, remove, run_id, plan_partitions(run_rows, table_rows, partition_rows))


def _ray_up() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _changes_in_ray(table: OutputTable, files, groups, remove: pa.Array, run_id: str, partitions: int) -> Changes:
    import ray

    from pipelines.dataflow import ensure_ray
    from pipelines.diff import partition_of

    ensure_ray()
    map_task = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(map_rows)
    reduce_task = ray.remote(num_cpus=TASK_CPUS, max_retries=3, num_returns=2)(reduce_rows)
    rewrite_task = ray.remote(num_cpus=REWRITE_CPUS, max_retries=3)(rewrite_files)
    refs = [map_task.options(num_returns=partitions).remote(table, g, partitions) for g in groups]
    if partitions == 1:
        refs = [[r] for r in refs]
    part_of = partition_of(remove, partitions)
    pending = [reduce_task.remote(remove.filter(pa.array(part_of == p)), *[r[p] for r in refs])
               for p in range(partitions)]
    del refs
    out = _summed(ray.get([s for s, _ in pending]))
    if out.clash or not out.dropped:
        return out
    drops = [d for _, d in pending]
    touched = _touched(files, out)
    jobs = [rewrite_task.remote(table, run_id, touched[i:i + REWRITE_FILES], *drops)
            for i in range(0, len(touched), REWRITE_FILES)]
    for done in ray.get(jobs):
        for kind, f, copy in done:
            out.copies[(kind, f)] = copy
    return out


def _summed(summaries: Sequence[dict]) -> Changes:
    out = Changes()
    for s in summaries:
        for key, n in s["files"].items():
            out.dropped[key] = out.dropped.get(key, 0) + n
        out.clash += s["clash"]
        out.clash_runs = sorted(set(out.clash_runs) | set(s["clash_runs"]))
        out.clash_uri = out.clash_uri or s["clash_uri"]
    return out


def _touched(files, out: Changes) -> list[tuple[int, int, str]]:
    touched = [(kind, f, path) for kind, f, path, _ in files if (kind, f) in out.dropped]
    out.paths = {(kind, f): path for kind, f, path in touched}
    return touched


# ------------------------------------------------------------------------------------------------
# The run's keys, for the run's own counts


def _image_ids(table: OutputTable, paths: Sequence[str]) -> pa.Array:
    parts = [table.read_file(p, ("image_id",))["image_id"].cast(pa.string()) for p in paths]
    return pa.chunked_array(parts, pa.string()).combine_chunks() if parts else pa.array([], pa.string())


def _keys_of_run(*parts: pa.Array):
    from pipelines.listing import done_keys

    ids = pa.chunked_array(list(parts), pa.string()) if parts else pa.chunked_array([], pa.string())
    return pc.count_distinct(ids).as_py(), done_keys(ids)


def run_keys(table: OutputTable, paths: Sequence[str]):
    """(distinct image_ids in the files `paths`, an ObjectRef to their `pipelines.listing.done_keys`),
    read in Ray tasks: the driver holds one number and one reference."""
    import ray

    read = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(_image_ids)
    merge = ray.remote(num_cpus=TASK_CPUS, max_retries=3, num_returns=2)(_keys_of_run)
    parts = [read.remote(table, paths[i:i + MAP_FILES]) for i in range(0, len(paths), MAP_FILES)]
    count, keys = merge.remote(*parts)
    return ray.get(count), keys


__all__ = ["Changes", "changes", "join_partition", "run_keys", "without_rows"]
