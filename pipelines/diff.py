"""The plan of a run as a distributed join: a listing against the output table, in Ray tasks.

Which listed inputs a run processes, and which inputs left the listing, is a join of the listing
(`pipelines.listing.Listing`: Parquet shards) with the key columns of the table's current rows,
on `source_uri`. Done on the driver it costs a few hundred bytes per input (the whole listing and
the whole table state in one process); here it is hash-partitioned:

1. map: one Ray task per group of listing shards, and one per group of table data files, reads
   only the columns the plan needs and splits its rows into `partitions` parts by a hash of
   `source_uri` (the same hash on both sides), handed on as Ray objects;
2. reduce: one task per partition joins its listing part with its table part (`diff_partition`,
   a pure Arrow function), writes the listing rows to process as one Parquet shard (a new
   `Listing` the pipeline reads lazily), and returns the source_uris that left the listing and the
   counts per bucket.

The driver holds shard and file names, object references per (task, partition), and the counts:
nothing per input. A small run (under `LOCAL_MAX_ROWS` rows on both sides) takes the same steps in
the calling process.

Buckets (`BUCKETS`): an input with no row is `new`; `changed` when its listing facts differ from
those its rows were made from (`pipelines.adoption.facts_changed`, the same rules); with
`reprocess_on_model_change`, rows made by another checkpoint are `model_changed`; with
`retry_failed`, an input with a transient row is `retry`; the rest `unchanged`. The `invert` rule
is a rerun's: an input is skipped (`unchanged`) when every one of its rows has a final status,
and processed otherwise (`new` without rows, `retry` with a transient one), whatever its facts.
Inputs with rows but gone from the listing are `deleted` (reported by both rules; only nightly
removes them). A source_uri listed twice counts once (its first listing).
"""
from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.listing import SHARD_SCHEMA, Listing, first_per_key, shard_facts, write_shard
from schemas.status import FINAL_STATUSES

BUCKETS = ("new", "changed", "model_changed", "retry", "unchanged")
NEW, CHANGED, MODEL_CHANGED, RETRY, UNCHANGED = range(5)
#: What the plan reads of the table's rows (never images or tensors).
STATE_COLUMNS = ("source_uri", "status", "checkpoint_sha256", "source_size", "source_mtime", "source_etag")
PARTITION_ROWS = 500_000  # listing + table rows per partition: a reduce task's working set (~150 MB)
LOCAL_MAX_ROWS = 50_000  # below this (both sides) the plan runs in the calling process
MAP_SHARDS = 4  # listing shards per map task
MAP_FILES = 8  # table data files per map task
TODO_SHARD_ROWS = 2048  # rows per shard of the plan's output: one read task each
ORDER = "_order"  # listing order: shard index << 32 | row


@dataclass(frozen=True)
class DiffRule:
    """What makes a listed input one to process (see the module doc). mode: 'nightly' or 'invert'."""

    mode: str = "nightly"
    checkpoint_sha256: str | None = None
    reprocess_on_model_change: bool = False
    retry_failed: bool = False

    def __post_init__(self):
        if self.mode not in ("nightly", "invert"):
            raise ValueError(f"DiffRule.mode must be 'nightly' or 'invert', not {self.mode!r}")


@dataclass
class Diff:
    """A run's plan: the listing rows to process (`todo`, SHARD_SCHEMA shards, with a `bucket`
    column), the source_uris of inputs that left the listing, counts per bucket (plus `deleted`
    and `to_process`), the table rows the plan read, and how many partitions it used."""

    todo: Listing
    deleted: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    counts: dict[str, int] = field(default_factory=dict)
    table_rows: int = 0
    partitions: int = 1

    @property
    def to_process(self) -> int:
        return self.counts.get("to_process", 0)

    def bucket_uris(self, limit: int | None = None) -> dict[str, list[str]]:
        """The source_uris of each bucket to process, in listing order, at most `limit` each (read
        from the todo shards: for reports and tests, never needed by a run)."""
        table = self.todo.read_table(["source_uri", "bucket"], schema=TODO_SCHEMA) if self.to_process else None
        return bucket_lists(table, limit)


TODO_SCHEMA = SHARD_SCHEMA.append(pa.field("bucket", pa.int8(), nullable=False))


def bucket_lists(todo: pa.Table | None, limit: int | None = None) -> dict[str, list[str]]:
    """Rows to process (`TODO_SCHEMA`'s source_uri and bucket; None: none) as the source_uris of
    each bucket, in their order, at most `limit` each."""
    out = {}
    for code, name in enumerate(BUCKETS[:-1]):
        uris = [] if todo is None else todo["source_uri"].filter(pc.equal(todo["bucket"], code))
        out[name] = [] if todo is None else (uris if limit is None else uris.slice(0, limit)).to_pylist()
    return out


# ------------------------------------------------------------------------------------------------
# The join of one partition (pure)


def _ne(a, b) -> pa.ChunkedArray:
    """Python's ``a != b`` per row with None semantics (None != None is False, None != x True)."""
    a_valid = pc.is_valid(a)
    b_valid = pc.is_valid(b) if isinstance(b, (pa.Array, pa.ChunkedArray)) else pa.scalar(b is not None)
    return pc.if_else(pc.and_(a_valid, b_valid), pc.fill_null(pc.not_equal(a, b), True), pc.xor(a_valid, b_valid))


def changed_mask(l_size, l_etag, l_mtime, m_size, m_etag, m_mtime):
    """`pipelines.adoption.facts_changed` for every row at once (the same rules, in the same order)."""
    def both(x, y):
        return pc.and_(pc.is_valid(x), pc.is_valid(y))

    size_diff = pc.and_(both(l_size, m_size), pc.fill_null(pc.not_equal(l_size, m_size), False))
    etag_diff = pc.fill_null(pc.not_equal(l_etag, m_etag), False)
    mtime_diff = pc.fill_null(pc.not_equal(l_mtime, m_mtime), False)
    fallback = pc.or_(pc.xor(pc.is_valid(l_etag), pc.is_valid(m_etag)),
                      pc.xor(pc.is_valid(l_mtime), pc.is_valid(m_mtime)))
    return pc.if_else(size_diff, True,
                      pc.if_else(both(l_etag, m_etag), etag_diff, pc.if_else(both(l_mtime, m_mtime), mtime_diff, fallback)))


def _final(status) -> pa.ChunkedArray:
    return pc.fill_null(pc.is_in(status, value_set=pa.array(FINAL_STATUSES)), False)


def input_state(state: pa.Table) -> pa.Table:
    """One row per source_uri of the table's rows (an input with `--faces all` has one per face): a
    row with a transient status where the input has one, else its first; `all_final` tells whether
    every row of the input has a final status. The rows of an input share their listing facts and
    checkpoint (they are written, replaced and adopted together)."""
    if state.num_rows == 0:
        return state.append_column("all_final", pa.array([], pa.bool_()))
    final = _final(state["status"])
    order = pc.sort_indices(pa.table({"final": final}), sort_keys=[("final", "ascending")])
    first = first_per_key(state.take(order), "source_uri")
    return first.append_column("all_final", _final(first["status"]))


def diff_partition(listed: pa.Table, state: pa.Table, rule: DiffRule) -> tuple[pa.Table, pa.Array, dict[str, int]]:
    """The plan of one partition: `listed` (SHARD_SCHEMA rows, in listing order) against `state`
    (`STATE_COLUMNS` of the table rows of the same inputs, any order). Returns the listed rows to
    process with their `bucket` (TODO_SCHEMA, listing order), the source_uris with rows that are
    not listed (sorted), and the count per bucket."""
    listed = first_per_key(listed.select(SHARD_SCHEMA.names), "source_uri")
    mine = input_state(state)
    facts = shard_facts(listed)
    left = pa.table({"source_uri": listed["source_uri"], "size": facts["size"], "etag": facts["etag"],
                     "mtime": facts["mtime"], "_i": pa.array(np.arange(listed.num_rows, dtype=np.int64))})
    right = pa.table({"source_uri": mine["source_uri"], "m_size": mine["source_size"], "m_etag": mine["source_etag"],
                      "m_mtime": pc.cast(mine["source_mtime"], pa.int64()), "m_sha": mine["checkpoint_sha256"],
                      "m_status": mine["status"], "m_final": mine["all_final"]})
    joined = left.join(right, keys="source_uri", join_type="left outer", use_threads=False)
    joined = joined.take(pc.sort_indices(joined["_i"]))  # back to listing order
    is_new = pc.is_null(joined["m_status"])
    if rule.mode == "invert":
        bucket = pc.if_else(is_new, NEW, pc.if_else(pc.fill_null(joined["m_final"], False), UNCHANGED, RETRY))
    else:
        changed = changed_mask(joined["size"], joined["etag"], joined["mtime"],
                               joined["m_size"], joined["m_etag"], joined["m_mtime"])
        bucket = pc.if_else(is_new, NEW, pc.if_else(changed, CHANGED, UNCHANGED))
        if rule.reprocess_on_model_change:
            other = _ne(joined["m_sha"], rule.checkpoint_sha256)
            bucket = pc.if_else(pc.and_(pc.equal(bucket, UNCHANGED), other), MODEL_CHANGED, bucket)
        if rule.retry_failed:
            transient = pc.invert(_final(joined["m_status"]))
            bucket = pc.if_else(pc.and_(pc.equal(bucket, UNCHANGED), transient), RETRY, bucket)
    bucket = pc.cast(bucket, pa.int8())
    todo_mask = pc.not_equal(bucket, UNCHANGED)
    todo = listed.take(joined["_i"]).append_column(TODO_SCHEMA.field("bucket"), bucket).filter(todo_mask)
    counts = dict.fromkeys(BUCKETS, 0)
    for d in pc.value_counts(bucket).to_pylist():
        counts[BUCKETS[d["values"]]] = d["counts"]
    gone = pc.invert(pc.is_in(mine["source_uri"], value_set=listed["source_uri"]))
    deleted = pc.sort_indices(mine["source_uri"].filter(gone))
    deleted = mine["source_uri"].filter(gone).take(deleted)
    return todo.cast(TODO_SCHEMA), deleted.combine_chunks() if isinstance(deleted, pa.ChunkedArray) else deleted, counts


# ------------------------------------------------------------------------------------------------
# Partitioning


def partition_of(source_uris: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition of each source_uri: a fixed 64-bit hash (pandas' siphash with its default
    key: the same in every process and on every machine) modulo `partitions`."""
    if partitions <= 1:
        return np.zeros(len(source_uris), dtype=np.int64)
    import pandas as pd

    values = np.asarray(source_uris.to_numpy(zero_copy_only=False), dtype=object)
    return (pd.util.hash_array(values, categorize=False) % np.uint64(partitions)).astype(np.int64)


def split(table: pa.Table, partitions: int, key: str = "source_uri") -> list[pa.Table]:
    """`table` cut into `partitions` parts by `partition_of(table[key])`, order kept."""
    if partitions <= 1:
        return [table]
    part = partition_of(table[key], partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    return [table.take(pa.array(order[bounds[p]:bounds[p + 1]])) for p in range(partitions)]


def _read_shards(paths: Sequence[str], first: int, storage_options, shard_schema: pa.Schema = SHARD_SCHEMA) -> pa.Table:
    """Listing shards (`shard_schema`'s columns: SHARD_SCHEMA, or a plan's TODO_SCHEMA) with their
    listing order (`ORDER`); `first`: the index of the first shard."""
    import pyarrow.parquet as pq

    from psp_core.uris import filesystem_for

    parts = []
    for k, path in enumerate(paths):
        fs, p = filesystem_for(path, storage_options)
        with fs.open(p, "rb") as f:
            t = pq.read_table(f, columns=shard_schema.names).cast(shard_schema)
        order = (np.int64(first + k) << 32) + np.arange(t.num_rows, dtype=np.int64)
        parts.append(t.append_column(ORDER, pa.array(order)))
    schema = shard_schema.append(pa.field(ORDER, pa.int64()))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _read_state(files, paths: Sequence[str]) -> pa.Table:
    """`STATE_COLUMNS` of some of the table's data files (`pipelines.scan.TableFiles`)."""
    from pipelines.scan import Rows, fold_files

    schema = pa.schema([files.schema.field(c) for c in STATE_COLUMNS])
    return fold_files(files, paths, STATE_COLUMNS, Rows).table(schema)


def _map_listing(paths, first, storage_options, partitions, shard_schema: pa.Schema = SHARD_SCHEMA):
    parts = split(_read_shards(paths, first, storage_options, shard_schema), partitions)
    return parts if partitions > 1 else parts[0]


def _map_state(files, paths, partitions):
    parts = split(_read_state(files, paths), partitions)
    return parts if partitions > 1 else parts[0]


def _reduce(p: int, rule: DiffRule, out: str, storage_options, n_listed: int, *parts: pa.Table):
    """Partition `p`: join, write the rows to process as shards of at most `TODO_SHARD_ROWS` rows
    named `out`-NNNNN.parquet (the read stage reads one shard per task, so a partition's rows are
    read in parallel); ([(path, rows)], deleted source_uris, counts)."""
    listed = [t for t in parts[:n_listed] if t.num_rows]
    state = [t for t in parts[n_listed:] if t.num_rows]
    schema = SHARD_SCHEMA.append(pa.field(ORDER, pa.int64()))
    listed = pa.concat_tables(listed) if listed else schema.empty_table()
    listed = listed.take(pc.sort_indices(listed[ORDER]))
    state = pa.concat_tables(state) if state else _empty_state()
    todo, deleted, counts = diff_partition(listed, state, rule)
    return write_todo(todo, out, storage_options), deleted, counts


def write_todo(todo: pa.Table, out: str, storage_options) -> list[tuple[str, int]]:
    """Plan rows as shards `out`-NNNNN.parquet of at most `TODO_SHARD_ROWS` rows (one read task
    each); [(path, rows)]."""
    shards = []
    for k, start in enumerate(range(0, todo.num_rows, TODO_SHARD_ROWS)):
        path = f"{out}-{k:05d}.parquet"
        part = todo.slice(start, TODO_SHARD_ROWS)
        write_shard(part, path, storage_options)
        shards.append((path, part.num_rows))
    return shards


def _empty_state() -> pa.Table:
    from schemas.outputs import output_schema

    schema = output_schema(1)
    return pa.schema([schema.field(c) for c in STATE_COLUMNS]).empty_table()


# ------------------------------------------------------------------------------------------------
# The run's plan


def table_files_of(table, dt):
    """`pipelines.scan.TableFiles` of an OutputTable's loaded version `dt` (its data files)."""
    from pipelines.scan import TableFiles
    from schemas.table import table_dataset

    ds = table_dataset(dt, table.uri, table.storage_options)
    return TableFiles(table.uri, table.storage_options or None, dt.version(), ds.schema, tuple(ds.files))


def plan_partitions(listed_rows: int, table_rows: int, partition_rows: int = PARTITION_ROWS) -> int:
    return max(1, math.ceil((listed_rows + table_rows) / max(1, partition_rows)))


def table_row_count(dt) -> int:
    """Rows of a Delta table version from its add actions' statistics (no data file read)."""
    if dt is None:
        return 0
    adds = pa.table(dt.get_add_actions(flatten=True))
    if "num_records" not in adds.column_names:
        return 0
    return int(pc.sum(pc.fill_null(adds["num_records"], 0)).as_py() or 0)


def diff(listing: Listing, table, dt, scratch: str, rule: DiffRule, *, use_ray: bool | None = None,
         partition_rows: int = PARTITION_ROWS) -> Diff:
    """Plan a run: `listing` against `table`'s version `dt` (an `OutputTable` and its `DeltaTable`,
    or None for no table yet) by `rule`; the rows to process are written as shards under
    `scratch` (a new `Listing`, removed by its `discard`). use_ray: None decides by size."""

    so = dict(listing.storage_options)
    root = f"{scratch.rstrip('/')}/{uuid.uuid4().hex}"
    files = None
    if dt is not None:
        files = table_files_of(table, dt)
    table_rows = table_row_count(dt)
    paths = [p for p, n in zip(listing.paths, listing.rows) if n]
    if use_ray is None:
        use_ray = listing.total + table_rows > LOCAL_MAX_ROWS
    partitions = plan_partitions(listing.total, table_rows, partition_rows) if use_ray else 1
    listing_groups = [(paths[i:i + MAP_SHARDS], i) for i in range(0, len(paths), MAP_SHARDS)]
    state_groups = [] if files is None else [files.paths[i:i + MAP_FILES] for i in range(0, len(files.paths), MAP_FILES)]
    outs = [f"{root}/todo-{p:05d}" for p in range(partitions)]
    if not use_ray:
        parts = [_map_listing(g, first, so, 1) for g, first in listing_groups]
        parts += [_map_state(files, g, 1) for g in state_groups]
        results = [_reduce(0, rule, outs[0], so, len(listing_groups), *parts)]
    else:
        import ray

        from pipelines.dataflow import ensure_ray

        ensure_ray()
        map_listing = ray.remote(num_cpus=0.5, max_retries=3)(_map_listing)
        map_state = ray.remote(num_cpus=0.5, max_retries=3)(_map_state)
        reduce = ray.remote(num_cpus=1, max_retries=3)(_reduce)
        lrefs = [map_listing.options(num_returns=partitions).remote(g, first, so, partitions)
                 for g, first in listing_groups]
        srefs = [map_state.options(num_returns=partitions).remote(files, g, partitions) for g in state_groups]
        if partitions == 1:
            lrefs, srefs = [[r] for r in lrefs], [[r] for r in srefs]
        pending = [reduce.remote(p, rule, outs[p], so, len(lrefs), *[r[p] for r in lrefs], *[r[p] for r in srefs])
                   for p in range(partitions)]
        del lrefs, srefs
        results = ray.get(pending)
    todo = Listing([], [], listing.not_inputs, so, root)
    counts = dict.fromkeys(BUCKETS, 0)
    deleted = []
    for shards, gone, part_counts in results:
        for path, rows in shards:
            todo.paths.append(path)
            todo.rows.append(rows)
        deleted.append(gone)
        for k, v in part_counts.items():
            counts[k] += v
    deleted = pa.concat_arrays([d.cast(pa.string()) for d in deleted]) if deleted else pa.array([], pa.string())
    deleted = deleted.take(pc.sort_indices(deleted))
    counts["deleted"] = len(deleted)
    counts["to_process"] = sum(counts[b] for b in BUCKETS if b != "unchanged")
    return Diff(todo, deleted, counts, table_rows, partitions)


# ------------------------------------------------------------------------------------------------
# The plan's rows with the alignments earlier runs stored for them (pipelines.reuse)


def _map_stored(files, paths: Sequence[str], partitions: int):
    """The reusable rows (`STORED_COLUMNS` + source_uri) of some data files of a table, split by
    source_uri, after the distinct run ids they come from (the driver matches those runs)."""
    from pipelines.reuse import REUSABLE_STATUSES, STORED_COLUMNS
    from pipelines.scan import Rows, fold_files

    columns = ("source_uri", *STORED_COLUMNS)
    schema = pa.schema([files.schema.field(c) for c in columns])
    flt = pc.field("status").isin(list(REUSABLE_STATUSES))
    rows = fold_files(files, paths, columns, Rows, filter=flt).table(schema)
    runs = pc.unique(pc.drop_null(rows["run_id"])) if rows.num_rows else pa.array([], pa.string())
    return (runs, *split(rows, partitions))


def _reduce_reuse(out: str, storage_options, n_todo: int, runs: Sequence[set[str]], tables: Sequence[int],
                  *parts: pa.Table) -> list[tuple[str, int]]:
    """One partition: its plan rows with their stored alignments, written as shards `out`-NNNNN.parquet
    of at most TODO_SHARD_ROWS rows (plan order kept); [(path, rows)]."""
    from pipelines.reuse import choose_stored, stored_rows_schema, with_stored

    todo = [t for t in parts[:n_todo] if t.num_rows]
    if not todo:
        return []
    todo = pa.concat_tables(todo, promote_options="default")
    todo = todo.take(pc.sort_indices(todo[ORDER])).drop_columns([ORDER])
    per_table: list[list[pa.Table]] = [[] for _ in runs]
    for t, rows in zip(tables, parts[n_todo:]):
        if rows.num_rows:
            per_table[t].append(rows)
    stored = [pa.concat_tables(p) if p else stored_rows_schema().empty_table() for p in per_table]
    return write_todo(with_stored(todo, choose_stored(stored, runs)), out, storage_options)


def stored_tables(resolved: Any, table: Any) -> list[tuple[Any, Any]]:
    """(OutputTable, DeltaTable) of the run's OUTPUT (when it has rows) and of each
    --alignment-from table, in priority order; ConfigError for an --alignment-from without a table."""
    from pipelines.options import ConfigError
    from pipelines.table import OutputTable

    config = resolved.config
    found = []
    dt = table.load()
    if dt is not None and table.files(dt):
        found.append((table, dt))
    for uri in config.alignment_from or []:
        other = OutputTable(uri, config.storage_options)
        other_dt = other.load()
        if other_dt is None:
            raise ConfigError(f"--alignment-from {other.uri!r}: no output table there; name a psp OUTPUT "
                              "(or drop the flag)")
        found.append((other, other_dt))
    return found


def attach_stored_alignment(resolved: Any, todo: Listing, table: Any, *, use_ray: bool | None = None,
                            partition_rows: int = PARTITION_ROWS) -> Listing:
    """The plan's rows (`todo`, a `pipelines.listing.Listing` of plan shards) with the alignment
    stored for each input (`pipelines.reuse.REUSE_FIELDS`), as a new Listing in the same folder
    (discarded with it); `todo` itself when reuse is off or nothing usable is stored.

    A hash-partitioned join in Ray tasks, as the plan's (`pipelines.diff`): map tasks read the plan
    shards and the reusable rows of the run's OUTPUT and each --alignment-from table, the driver
    matches the run ids those rows come from against each table's run summaries (the alignment
    options, `alignment_signature`), and one reduce task per partition keeps each input's whole
    alignment from the first table that has one and writes its rows' shards. The driver holds run
    ids, file names and shard names: nothing per input. use_ray: None decides by size;
    partition_rows: plan and stored rows per partition (`diff`'s)."""
    from pipelines.reuse import REUSE_COLUMNS, alignment_signature, reuse_enabled

    if not reuse_enabled(resolved.config, resolved.align) or not todo.total:
        return todo
    if not todo.root:
        raise ValueError("attach_stored_alignment: the plan's listing has no folder (a Listing from `diff`)")
    sources = stored_tables(resolved, table)
    if not sources:
        return todo
    signature = alignment_signature(resolved.config, resolved.align)
    so = dict(todo.storage_options)
    stored_rows = sum(table_row_count(dt) for _, dt in sources)
    if use_ray is None:
        use_ray = todo.total + stored_rows > LOCAL_MAX_ROWS
    partitions = plan_partitions(todo.total, stored_rows, partition_rows) if use_ray else 1
    paths = [p for p, n in zip(todo.paths, todo.rows) if n]
    todo_groups = [(paths[i:i + MAP_SHARDS], i) for i in range(0, len(paths), MAP_SHARDS)]
    groups = []  # (table index, TableFiles, paths)
    for t, (source, dt) in enumerate(sources):
        files = table_files_of(source, dt)
        groups += [(t, files, files.paths[i:i + MAP_FILES]) for i in range(0, len(files.paths), MAP_FILES)]
    root = todo.root
    outs = [f"{root}/reuse-{p:05d}" for p in range(partitions)]
    tables = [t for t, _, _ in groups]
    if not use_ray:
        todo_parts = [[_map_listing(g, first, so, 1, TODO_SCHEMA)] for g, first in todo_groups]
        stored_parts = [_map_stored(files, g, 1) for _, files, g in groups]
        runs = _matching(sources, signature, tables, [s[0] for s in stored_parts])
        if not any(runs):
            return todo
        results = [_reduce_reuse(outs[0], so, len(todo_parts), runs, tables, *[t[0] for t in todo_parts],
                                 *[s[1] for s in stored_parts])]
    else:
        import ray

        from pipelines.dataflow import ensure_ray

        ensure_ray()
        map_todo = ray.remote(num_cpus=0.5, max_retries=3)(_map_listing)
        map_stored = ray.remote(num_cpus=0.5, max_retries=3)(_map_stored)
        reduce = ray.remote(num_cpus=1, max_retries=3)(_reduce_reuse)
        trefs = [map_todo.options(num_returns=partitions).remote(g, first, so, partitions, TODO_SCHEMA)
                 for g, first in todo_groups]
        srefs = [map_stored.options(num_returns=partitions + 1).remote(files, g, partitions) for _, files, g in groups]
        if partitions == 1:
            trefs = [[r] for r in trefs]
        runs = _matching(sources, signature, tables, ray.get([r[0] for r in srefs]))
        if not any(runs):
            return todo
        pending = [reduce.remote(outs[p], so, len(trefs), runs, tables, *[r[p] for r in trefs],
                                 *[r[1 + p] for r in srefs]) for p in range(partitions)]
        del trefs, srefs
        results = ray.get(pending)
    attached = Listing([], [], todo.not_inputs, so, root, todo.owned)
    for shards in results:
        for path, rows in shards:
            attached.paths.append(path)
            attached.rows.append(rows)
    attached.extra = REUSE_COLUMNS
    return attached


def _matching(sources, signature: str, tables: Sequence[int], run_ids: Sequence[pa.Array]) -> list[set[str]]:
    """Per stored table, the runs its reusable rows come from (`run_ids`: each map task's distinct
    ids; `tables`: the table of each task) that were made with alignment `signature`."""
    from pipelines.reuse import matching_runs

    per_table: list[set[str]] = [set() for _ in sources]
    for t, ids in zip(tables, run_ids):
        per_table[t].update(ids.to_pylist())
    return [matching_runs(source, dt, signature, sorted(ids)) if ids else set()
            for (source, dt), ids in zip(sources, per_table)]


__all__ = ["BUCKETS", "Diff", "DiffRule", "STATE_COLUMNS", "TODO_SCHEMA", "attach_stored_alignment", "diff",
           "diff_partition", "input_state", "partition_of", "split"]
