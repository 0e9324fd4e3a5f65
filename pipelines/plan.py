"""What a run processes: the plan step of `pipelines.run`, the one step in which commands differ.

Every run goes list -> plan -> process -> write -> commit -> summary (`pipelines.run.execute`); a
planner turns the run's listing and the output table's current rows into a `Plan`:

- `InvertPlanner` (`psp invert`, `psp frontalize`): every listed input that is not done yet (an
  input is done when all its rows have a final status), less the rows a crashed run wrote for the
  same input bytes and checkpoint (adopted, not redone). The listing stays in its Parquet shards:
  the read tasks drop the done inputs by key.
- `NightlyPlanner` (`psp nightly`): the diff of the listing against the table's rows
  (`plan_nightly`, a pure Arrow join): new (no row), changed (ETag -- or size/mtime where there is
  no ETag -- differs), deleted (gone from the listing: their rows leave the table), and, on
  request, rows made by another checkpoint (`reprocess_on_model_change`) or with a transient
  failure (`retry_failed`); rows a crashed run wrote for exactly these inputs, from the same bytes
  and checkpoint, are adopted (`pipelines.table.adoptable_rows`).

Nothing is visible to readers before the run's one commit, so a crash anywhere leaves the previous
version, and the rerun neither loses nor duplicates a row.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.adoption import adoptable_rows, uncommitted_runs, wanted_facts
from pipelines.config import ResolvedConfig
from pipelines.items import mtime_us
from pipelines.listing import Listing, count_todo, done_keys
from pipelines.listing import first_per_key as _first_per_key
from pipelines.table import ConcurrentRunError, OutputTable
from pipelines.writer import WrittenRun
from schemas.ids import image_id_for
from schemas.status import FINAL_STATUSES

log = logging.getLogger(__name__)


class NightlyError(RuntimeError):
    """A nightly run could not complete; nothing was committed, rerun after fixing the cause."""


@dataclass
class ListedInput:
    """One listed input: what the diff compares. `mtime` is seconds since the epoch or None."""

    uri: str
    size: int | None = None
    etag: str | None = None
    mtime: float | None = None


@dataclass
class NightlyPlan:
    """What a run will do. Lists hold source URIs; `to_process` is what the pipeline gets."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    model_changed: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def to_process(self) -> list[str]:
        return self.new + self.changed + self.model_changed + self.retry

    def counts(self) -> dict[str, int]:
        return {
            "new": len(self.new),
            "changed": len(self.changed),
            "model_changed": len(self.model_changed),
            "retry": len(self.retry),
            "deleted": len(self.deleted),
            "unchanged": self.unchanged,
            "to_process": len(self.to_process),
        }


# -- the listing ------------------------------------------------------------------------------

def mtime_seconds(value: Any) -> float | None:
    """A listing's mtime (datetime, epoch number, ISO string or None) as epoch seconds."""
    us = mtime_us(value)
    return None if us is None else us / 1e6


def as_listed(item: Any) -> ListedInput:
    """A `pipelines.items.SourceItem` (or anything with uri/size/etag/mtime) as a ListedInput."""
    size = getattr(item, "size", None)
    etag = getattr(item, "etag", None)
    return ListedInput(
        uri=getattr(item, "source_uri", None) or item.uri,  # the key output rows carry
        size=None if size is None or int(size) < 0 else int(size),
        etag=None if etag is None else str(etag).strip('"'),
        mtime=mtime_seconds(getattr(item, "mtime", None)),
    )


LISTING_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),  # the key output rows carry
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),  # quotes stripped
        pa.field("mtime", pa.float64()),  # seconds since the epoch
        # what `pipelines.items.SourceItem` needs besides the above (null where it equals the
        # default or, for `uri`, the source_uri), so only the inputs to process become objects
        pa.field("uri", pa.string()),
        pa.field("kind", pa.dictionary(pa.int8(), pa.string())),
        pa.field("url", pa.string()),
        pa.field("column", pa.string()),
        pa.field("offset", pa.int64()),
    ]
)
_LISTING_BATCH = 8192


def listing_table(items: Iterable[Any]) -> pa.Table:
    """A listing (`SourceItem`s, `ListedInput`s, or anything with uri/size/etag/mtime) as one Arrow
    table with `LISTING_SCHEMA`, one row per distinct source URI (the first listed wins), in listing
    order. Built in record batches of 8192, so no per-input Python object outlives its batch."""
    batches: list[pa.RecordBatch] = []
    cols: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}

    def flush() -> None:
        if cols["source_uri"]:
            batches.append(pa.RecordBatch.from_pydict(cols, schema=LISTING_SCHEMA))
            for v in cols.values():
                v.clear()

    for item in items:
        listed = as_listed(item)
        uri = getattr(item, "uri", listed.uri)
        cols["source_uri"].append(listed.uri)
        cols["size"].append(listed.size)
        cols["etag"].append(listed.etag)
        cols["mtime"].append(listed.mtime)
        cols["uri"].append(None if uri == listed.uri else uri)
        cols["kind"].append(getattr(item, "kind", None))
        cols["url"].append(getattr(item, "url", None))
        cols["column"].append(getattr(item, "column", None))
        offset = getattr(item, "offset", None)
        cols["offset"].append(None if offset is None else int(offset))
        if len(cols["source_uri"]) >= _LISTING_BATCH:
            flush()
    flush()
    table = pa.Table.from_batches(batches, schema=LISTING_SCHEMA).combine_chunks()
    return _first_per_key(table, "source_uri")


def source_items(listing: pa.Table, uris: Sequence[str]) -> list[Any]:
    """`pipelines.items.SourceItem`s for the listed inputs `uris` (source URIs), in that order."""
    from pipelines.items import KIND_FILE, SourceItem

    if not uris:
        return []
    wanted = pa.array(list(uris), pa.string())
    rows = listing.filter(pc.is_in(listing["source_uri"], value_set=wanted))
    by_uri = {}
    for r in rows.to_pylist():
        by_uri[r["source_uri"]] = SourceItem(
            uri=r["uri"] or r["source_uri"], size=r["size"], etag=r["etag"], mtime=r["mtime"],
            kind=r["kind"] or KIND_FILE, url=r["url"], column=r["column"], offset=r["offset"],
        )
    return [by_uri[u] for u in uris]


def read_listing(input_uri: Any, storage_options: dict | None = None, **rules: Any) -> pa.Table:
    """The input listing as a `listing_table`, streamed: no `SourceItem` per input is kept.
    `rules`: `pipelines.sources.iter_inputs` keywords (image_column, include, exclude, output).

    Raises `NightlyError` (with what to do) when the listing fails.
    """
    from pipelines.sources import iter_inputs

    try:
        table = listing_table(iter_inputs(input_uri, storage_options=storage_options, **rules))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise NightlyError(
            f"listing {input_uri!r} failed: {type(exc).__name__}: {exc}. Nothing was committed; "
            "check the URI and credentials, then rerun"
        ) from exc
    pa.default_memory_pool().release_unused()
    return table


def shards_to_listing_table(shards: pa.Table) -> pa.Table:
    """Rows of `pipelines.listing.SHARD_SCHEMA` as a `listing_table` (nulls for 'none', one row
    per source URI, the first listed wins)."""
    def none_if(col, value):
        return pc.if_else(pc.equal(col, value), pa.scalar(None, col.type), col)

    uri, src = shards["uri"], shards["source_uri"]
    kind = shards["kind"]
    table = pa.table({
        "source_uri": src,
        "size": none_if(shards["size"], -1),
        "etag": none_if(shards["etag"], ""),
        "mtime": pc.if_else(pc.is_nan(shards["mtime"]), pa.scalar(None, pa.float64()), shards["mtime"]),
        "uri": pc.if_else(pc.equal(uri, src), pa.scalar(None, pa.string()), uri),
        "kind": pc.cast(kind, pa.dictionary(pa.int8(), pa.string())),
        "url": pc.if_else(pc.equal(uri, src), pa.scalar(None, pa.string()), src),
        "column": none_if(shards["column"], ""),
        "offset": none_if(shards["offset"], -1),
    }, schema=LISTING_SCHEMA)
    return _first_per_key(table.combine_chunks(), "source_uri")


# -- pure planning ----------------------------------------------------------------------------

def _ne(a: pa.ChunkedArray, b: Any) -> pa.ChunkedArray:
    """Python's ``a != b`` per row with None semantics (None != None is False, None != x True)."""
    a_valid = pc.is_valid(a)
    b_valid = pc.is_valid(b) if isinstance(b, (pa.Array, pa.ChunkedArray)) else pa.scalar(b is not None)
    return pc.if_else(
        pc.and_(a_valid, b_valid), pc.fill_null(pc.not_equal(a, b), True), pc.xor(a_valid, b_valid)
    )


def _changed_mask(l_size, l_etag, l_mtime, m_size, m_etag, m_mtime) -> pa.ChunkedArray:
    """`pipelines.adoption.facts_changed` for every row at once (the same rules, in the same order)."""
    def both(x, y):
        return pc.and_(pc.is_valid(x), pc.is_valid(y))

    size_diff = pc.and_(both(l_size, m_size), pc.fill_null(pc.not_equal(l_size, m_size), False))
    etag_diff = pc.fill_null(pc.not_equal(l_etag, m_etag), False)
    mtime_diff = pc.fill_null(pc.not_equal(l_mtime, m_mtime), False)
    fallback = pc.or_(pc.xor(pc.is_valid(l_etag), pc.is_valid(m_etag)),
                      pc.xor(pc.is_valid(l_mtime), pc.is_valid(m_mtime)))
    return pc.if_else(
        size_diff, True,
        pc.if_else(both(l_etag, m_etag), etag_diff,
                   pc.if_else(both(l_mtime, m_mtime), mtime_diff, fallback)),
    )


def _us(seconds) -> pa.ChunkedArray:
    """Epoch seconds (float64) -> integer microseconds, rounded as `mtime_us` rounds."""
    return pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())


def one_row_per_input(state: pa.Table) -> pa.Table:
    """`state` with one row per source_uri (an input with `--faces all` has one per face): a row
    with a transient status where the input has one (so `retry_failed` retries the whole input),
    else its first. The rows of an input share their listing facts and checkpoint (they are
    written, replaced and adopted together)."""
    if state.num_rows == 0:
        return state
    final = pc.fill_null(pc.is_in(state["status"], value_set=pa.array(FINAL_STATUSES)), False)
    order = pc.sort_indices(pa.table({"final": final}), sort_keys=[("final", "ascending")])
    return _first_per_key(state.take(order), "source_uri")


def plan_nightly(
    listing: Sequence[ListedInput] | pa.Table,
    state: pa.Table,
    checkpoint_sha256: str,
    reprocess_on_model_change: bool = False,
    retry_failed: bool = False,
) -> NightlyPlan:
    """Diff a listing against the current rows of the output table. Pure: no I/O.

    `listing` is a sequence of `ListedInput`s or a `listing_table`; `state` has the table's
    source_uri, status, checkpoint_sha256, source_size, source_mtime and source_etag columns (see
    `pipelines.table.OutputTable.state`); an input with several rows (one per face) is planned
    once (`one_row_per_input`). The diff is an Arrow join (no Python object per input);
    only the URIs to process, and the deleted ones, become Python strings.

    Each listed input lands in exactly one bucket: new, changed, model_changed, retry, or
    unchanged. ``model_changed`` (only with `reprocess_on_model_change`) holds rows made by
    another checkpoint; ``retry`` (only with `retry_failed`) rows whose status is transient.
    Inputs with a row but gone from the listing are ``deleted``.
    """
    if not isinstance(listing, pa.Table):
        listing = listing_table(listing)
    state = one_row_per_input(state)
    plan = NightlyPlan()
    man = pa.table(
        {"source_uri": state["source_uri"], "m_etag": state["source_etag"], "m_size": state["source_size"],
         "m_mtime": pc.cast(state["source_mtime"], pa.int64()), "m_sha": state["checkpoint_sha256"],
         "m_status": state["status"]}
    )
    n = listing.num_rows
    left = pa.table(
        {"source_uri": listing["source_uri"], "size": listing["size"], "etag": listing["etag"],
         "mtime": _us(listing["mtime"]), "_i": pa.array(np.arange(n, dtype=np.int64))}
    )
    joined = left.join(man, keys="source_uri", join_type="left outer", use_threads=False)
    joined = joined.take(pc.sort_indices(joined["_i"]))  # back to listing order
    del left
    status = joined["m_status"]
    is_new = pc.is_null(status)
    changed = _changed_mask(joined["size"], joined["etag"], joined["mtime"],
                            joined["m_size"], joined["m_etag"], joined["m_mtime"])
    bucket = pc.if_else(is_new, 0, pc.if_else(changed, 1, 4))  # 0 new 1 changed 2 model 3 retry
    if reprocess_on_model_change:
        bucket = pc.if_else(pc.and_(pc.equal(bucket, 4), _ne(joined["m_sha"], checkpoint_sha256)), 2, bucket)
    if retry_failed:
        transient = pc.invert(pc.fill_null(pc.is_in(status, value_set=pa.array(FINAL_STATUSES)), False))
        bucket = pc.if_else(pc.and_(pc.equal(bucket, 4), transient), 3, bucket)
    uris = joined["source_uri"]
    for code, name in ((0, "new"), (1, "changed"), (2, "model_changed"), (3, "retry")):
        setattr(plan, name, uris.filter(pc.equal(bucket, code)).to_pylist())
    plan.unchanged = int(pc.sum(pc.equal(bucket, 4)).as_py() or 0)
    del joined, bucket
    gone = pc.invert(pc.is_in(man["source_uri"], value_set=listing["source_uri"].combine_chunks()))
    plan.deleted = sorted(man["source_uri"].filter(gone).to_pylist())
    return plan


# -- the plan a run executes ------------------------------------------------------------------

@dataclass
class Plan:
    """What one run processes, as its planner decided.

    source: what the pipeline reads -- the run's `Listing` (less the inputs in `skip`, an ObjectRef
    to `pipelines.listing.done_keys`) or explicit `SourceItem`s. todo: inputs handed to the
    pipeline (0: nothing to process). listed / skipped: inputs listed / left as they are.
    adopted: rows crashed runs wrote, committed instead of redone. remove_ids: source ids whose
    rows leave the table (deleted inputs). expected: image_ids of explicit inputs that must each get
    a row (the run then counts the rows that came back, and `lost` inputs); None for a listing.
    stop: plan only (a dry run): nothing is processed or committed. extra: the planner's facts,
    recorded in the commit's run summary.
    """

    source: Listing | Sequence[Any] | None
    todo: int
    listed: int
    skipped: int
    adopted: WrittenRun
    skip: Any = None
    remove_ids: list[str] = field(default_factory=list)
    expected: list[str] | None = None
    stop: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def inputs_done(state: pa.Table) -> pa.Array:
    """source_ids of the inputs a rerun skips (Arrow, unique): every row of the input (each face)
    has a final status. One transient row (e.g. one face's invert_error) makes the whole input run
    again."""
    if state.num_rows == 0:
        return pa.array([], pa.string())
    final = pc.is_in(state["status"], value_set=pa.array(FINAL_STATUSES))
    done = pc.unique(state["source_id"].filter(final))
    again = pc.unique(state["source_id"].filter(pc.invert(final)))
    return done.filter(pc.invert(pc.is_in(done, value_set=again)))


class InvertPlanner:
    """`psp invert` / `frontalize`: every listed input not done yet; a crashed run's rows adopted.
    Failures raise as they are (`failure` returns None)."""

    kind = "invert"

    def plan(self, resolved: ResolvedConfig, table: OutputTable, dt, listing: Listing) -> Plan:
        import ray

        run_id = resolved.run_id
        done = inputs_done(table.state(dt, ("source_id", "status")))
        adopted = WrittenRun(run_id)
        if listing.total and uncommitted_runs(table, dt, run_id):  # a crashed run's rows to adopt
            adopted = _adopt(table, dt, listing, done, resolved.checkpoint.sha256, run_id)
        skip = ray.put(done_keys(pa.concat_arrays([done, adopted.ids.cast(pa.string())])))
        todo, skipped = count_todo(listing, skip) if listing.total else (0, 0)
        limit = resolved.config.limit
        return Plan(source=listing, todo=min(todo, limit) if limit is not None else todo, listed=listing.total,
                    skipped=skipped - adopted.rows, adopted=adopted, skip=skip)

    def failure(self, step: str, exc: Exception, resolved: ResolvedConfig, todo: int) -> Exception | None:
        return None


def _adopt(table: OutputTable, dt, listing: Listing, done: pa.Array, sha: str | None, run_id: str) -> WrittenRun:
    """Rows crashed runs wrote for this listing's inputs that are not done (read on the driver:
    only when there is an uncommitted run to adopt from)."""
    listed = listing.read_table(["source_uri", "size", "etag", "mtime"])
    ids = pa.array([image_id_for(u) for u in listed["source_uri"].to_pylist()], pa.string())
    keep = pc.invert(pc.is_in(ids, value_set=done))
    listed, ids = listed.filter(keep), ids.filter(keep)
    size = pc.if_else(pc.less(listed["size"], 0), pa.scalar(None, pa.int64()), listed["size"])
    etag = pc.if_else(pc.equal(listed["etag"], ""), pa.scalar(None, pa.string()), listed["etag"])
    us = pc.cast(pc.round(pc.multiply(listed["mtime"], 1e6)), pa.int64(), safe=False)
    mtime = pc.if_else(pc.is_nan(listed["mtime"]), pa.scalar(None, pa.int64()), us)
    wanted = pa.table({"image_id": ids, "source_size": size, "source_mtime": pc.cast(mtime, pa.timestamp("us", tz="UTC")),
                       "source_etag": etag})
    written = adoptable_rows(table, dt, wanted, sha, retry_failed=True, exclude_run=run_id)
    written.run_id = run_id
    return written


@dataclass
class NightlyPlanner:
    """`psp nightly`: new, changed, deleted (and on request model-changed, transient-failure)
    inputs, from the diff of the listing against the table's rows; rows a crashed run wrote for
    them adopted (`resume`). After `plan`: `diff` (the `NightlyPlan`) and `rows_before` (the
    table's rows it planned against). Failures become `NightlyError`s that say what to do."""

    reprocess_on_model_change: bool = False
    retry_failed: bool = False
    dry_run: bool = False
    resume: bool = True
    diff: NightlyPlan | None = None
    rows_before: int = 0
    kind = "nightly"

    def plan(self, resolved: ResolvedConfig, table: OutputTable, dt, listing: Listing) -> Plan:
        run_id = resolved.run_id
        listed = shards_to_listing_table(listing.read_table())
        listing.discard()
        pa.default_memory_pool().release_unused()
        state = table.state(dt)
        self.rows_before = state.num_rows
        diff = self.diff = plan_nightly(listed, state, resolved.checkpoint.sha256,
                                        self.reprocess_on_model_change, self.retry_failed)
        del state
        log.info("nightly %s plan: %s", run_id, diff.counts())
        items = [] if self.dry_run else source_items(listed, diff.to_process)
        del listed
        adopted = WrittenRun(run_id)
        if self.resume and items:
            adopted = adoptable_rows(table, dt, wanted_facts(items), resolved.checkpoint.sha256, self.retry_failed,
                                     exclude_run=run_id)
            adopted.run_id = run_id
        taken = set(adopted.ids.to_pylist())
        expected = [image_id_for(it.source_uri) for it in items]
        todo = [it for it, key in zip(items, expected) if key not in taken]
        return Plan(source=todo, todo=len(todo), listed=diff.unchanged + len(diff.to_process),
                    skipped=diff.unchanged, adopted=adopted, remove_ids=[image_id_for(u) for u in diff.deleted],
                    expected=expected, stop=self.dry_run, extra={"plan": diff.counts()})

    def failure(self, step: str, exc: Exception, resolved: ResolvedConfig, todo: int) -> Exception:
        config, run_id = resolved.config, resolved.run_id
        cause = f"{type(exc).__name__}: {exc}"
        if step == "inputs":
            return NightlyError(f"listing {config.input!r} failed: {cause}. Nothing was committed; check the "
                                "URI and credentials, then rerun")
        if step == "list":
            return NightlyError(f"listing {config.input!r} for run {run_id} failed: {cause}. Nothing was "
                                "committed; check the URI and credentials, then rerun")
        if step == "process":
            return NightlyError(
                f"nightly run {run_id} failed while processing {todo} inputs into {config.output}: {cause}. "
                "Nothing was committed; rerun the same command (finished rows are adopted, not redone)")
        if isinstance(exc, ConcurrentRunError):
            return NightlyError(str(exc))
        return NightlyError(f"committing run {run_id} to {config.output} failed: {cause}. The previous "
                            "version is intact; rerun the same command")

__all__ = [
    "InvertPlanner",
    "ListedInput",
    "NightlyError",
    "NightlyPlan",
    "NightlyPlanner",
    "Plan",
    "as_listed",
    "inputs_done",
    "listing_table",
    "plan_nightly",
    "read_listing",
    "source_items",
]
