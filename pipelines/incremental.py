"""Nightly incremental runs: process only new or changed inputs, exactly once, into the output table.

One run (`run_nightly`):

1. list INPUT (key, ETag, size, mtime) and read the current version of the output table
   (its `source_*` listing facts, status and checkpoint per input: no image or tensor column);
2. plan (`plan_nightly`, a pure Arrow join): new (no row), changed (ETag -- or size/mtime where
   there is no ETag -- differs), deleted (gone from the listing: their rows leave the table), and,
   on request, rows made by another checkpoint (`reprocess_on_model_change`) or with a transient
   failure (`retry_failed`);
3. adopt rows an earlier crashed run wrote but never committed for exactly these inputs, made from
   the same bytes and checkpoint (`pipelines.table.adoptable_rows`), so a rerun does not redo them;
4. run the pipeline on the rest (`pipelines.graph.process_items`: files under ``runs/<run_id>/``);
5. commit once (`pipelines.table.commit_run`): the new rows in, the rows they replace and the
   deleted inputs' rows out, with the run's summary in the commit.

Nothing is visible to readers before step 5, so a crash anywhere leaves the previous version, and
the rerun neither loses nor duplicates a row.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import ConfigError, InvertConfig, resolve_config
from pipelines.graph import (
    RunSummary,
    commit_summary,
    ensure_ray,
    make_listing,
    open_output,
    process_items,
    stage_dict,
)
from pipelines.listing import check_inputs
from pipelines.listing import first_per_key as _first_per_key
from pipelines.reuse import alignment_signature
from pipelines.table import (
    ConcurrentRunError,
    SourceFacts,
    WrittenRun,
    adoptable_rows,
    mtime_us,
)
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


@dataclass
class NightlyResult:
    """The outcome of `run_nightly`. `committed` is False for a dry run or when nothing changed;
    `version` is the table version the run committed; `live` the rows (inputs) after it."""

    run_id: str
    plan: NightlyPlan
    processed: int = 0  # rows written by this run's pipeline
    adopted: int = 0  # rows adopted from an earlier crashed run
    lost: int = 0  # planned inputs with no output row (left for the next run)
    status_counts: dict[str, int] = field(default_factory=dict)
    committed: bool = False
    version: int | None = None
    replaced: int = 0  # old rows the run's rows replaced, plus deleted inputs' rows
    live: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "plan": self.plan.counts(),
            "processed": self.processed,
            "adopted": self.adopted,
            "lost": self.lost,
            "status_counts": self.status_counts,
            "committed": self.committed,
            "version": self.version,
            "replaced": self.replaced,
            "live": self.live,
            "timings": self.timings,
        }


# -- the listing ------------------------------------------------------------------------------

def mtime_seconds(value: Any) -> float | None:
    """A listing's mtime (datetime, epoch number, ISO string or None) as epoch seconds."""
    us = mtime_us(value)
    return None if us is None else us / 1e6


def as_listed(item: Any) -> ListedInput:
    """A `pipelines.sources.SourceItem` (or anything with uri/size/etag/mtime) as a ListedInput."""
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
        # what `pipelines.sources.SourceItem` needs besides the above (null where it equals the
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
    """`pipelines.sources.SourceItem`s for the listed inputs `uris` (source URIs), in that order."""
    from pipelines.sources import KIND_FILE, SourceItem

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


def _listed(config: InvertConfig, table, run_id: str) -> pa.Table:
    """INPUT (or --listing) listed in Ray tasks, as one `listing_table` for the plan."""
    try:
        shards = make_listing(config, table, run_id)
    except Exception as exc:
        raise NightlyError(
            f"listing {config.input!r} for run {run_id} failed: {type(exc).__name__}: {exc}. Nothing was "
            "committed; check the URI and credentials, then rerun"
        ) from exc
    try:
        listed = shards_to_listing_table(shards.read_table())
    finally:
        shards.discard()
    pa.default_memory_pool().release_unused()
    return listed


# -- pure planning ----------------------------------------------------------------------------

def _ne(a: pa.ChunkedArray, b: Any) -> pa.ChunkedArray:
    """Python's ``a != b`` per row with None semantics (None != None is False, None != x True)."""
    a_valid = pc.is_valid(a)
    b_valid = pc.is_valid(b) if isinstance(b, (pa.Array, pa.ChunkedArray)) else pa.scalar(b is not None)
    return pc.if_else(
        pc.and_(a_valid, b_valid), pc.fill_null(pc.not_equal(a, b), True), pc.xor(a_valid, b_valid)
    )


def _changed_mask(l_size, l_etag, l_mtime, m_size, m_etag, m_mtime) -> pa.ChunkedArray:
    """`pipelines.table.facts_changed` for every row at once (the same rules, in the same order)."""
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


# -- one run ----------------------------------------------------------------------------------

class _Clock:
    """Wall-clock laps of a run's phases (seconds), reported in `NightlyResult.timings`."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 4)
        self._last = now


def run_nightly(
    config: InvertConfig,
    reprocess_on_model_change: bool = False,
    retry_failed: bool = False,
    dry_run: bool = False,
    resume: bool = True,
) -> NightlyResult:
    """One nightly run of `config.input` into the output table at `config.output` (its `run_id`
    is used if set). Raises `NightlyError` (nothing committed) when listing, the pipeline, or the
    commit fails, and `pipelines.config.ConfigError` for a misconfiguration."""
    t0, started = time.perf_counter(), _dt.datetime.now(_dt.UTC)
    clock = _Clock()
    resolved = resolve_config(config)
    config = resolved.config
    run_id = resolved.run_id
    sha = resolved.checkpoint.sha256
    table, dt = open_output(resolved)
    try:  # a missing INPUT fails fast, before Ray starts
        check_inputs(config.input, config.storage_options, config.listing)
    except Exception as exc:
        raise NightlyError(
            f"listing {config.input!r} failed: {type(exc).__name__}: {exc}. Nothing was committed; "
            "check the URI and credentials, then rerun"
        ) from exc
    ensure_ray()
    clock.lap("open_s")
    listing = _listed(config, table, run_id)
    clock.lap("list_s")
    state = table.state(dt, with_file=False)  # the plan needs no file per row
    plan = plan_nightly(listing, state, sha, reprocess_on_model_change, retry_failed)
    clock.lap("plan_s")
    result = NightlyResult(run_id=run_id, plan=plan, timings=clock.laps, live=state.num_rows)
    log.info("nightly %s plan: %s", run_id, plan.counts())
    if dry_run or (not plan.to_process and not plan.deleted):
        return result

    items = source_items(listing, plan.to_process)
    del listing
    written = WrittenRun(run_id)
    if resume and items:
        facts = SourceFacts.from_items(items)
        wanted = pa.table({"image_id": facts.image_id, "source_size": facts.size,
                           "source_mtime": facts.mtime, "source_etag": facts.etag})
        written = adoptable_rows(table, dt, wanted, sha, retry_failed, exclude_run=run_id)
        written.run_id = run_id
        result.adopted = len(written.ids)
    clock.lap("adopt_s")
    adopted = set(written.ids.to_pylist())
    todo = [it for it in items if image_id_for(it.source_uri) not in adopted]
    processed = None
    if todo:
        try:
            processed = process_items(resolved, todo, table)
        except ConfigError:
            raise
        except Exception as exc:
            raise NightlyError(
                f"nightly run {run_id} failed while processing {len(todo)} inputs into {config.output}: "
                f"{type(exc).__name__}: {exc}. Nothing was committed; rerun the same command "
                "(finished rows are adopted, not redone)"
            ) from exc
        written.merge(processed.written)
        clock.lap("process_s")
    written.load(table)
    got = set(written.ids.to_pylist())
    result.processed = len(got) - result.adopted
    result.lost = sum(1 for it in items if image_id_for(it.source_uri) not in got)
    result.status_counts = written.counts()
    summary = RunSummary(
        run_id=run_id, input=config.input, output=config.output, checkpoint=config.checkpoint,
        checkpoint_sha256=sha, task=resolved.task, align=resolved.align,
        device=processed.device if processed else config.device, listed=plan.unchanged + len(plan.to_process),
        skipped=plan.unchanged, processed=result.processed, counts=result.status_counts,
        stages=stage_dict(processed.timings) if processed else {}, operators=processed.operators if processed else [], started_at=started.isoformat(),
        adopted=result.adopted, kind="nightly",
        model_family=resolved.checkpoint.family, n_iters=resolved.n_iters,
        alignment=alignment_signature(config, resolved.align),
    )
    try:
        summary = commit_summary(
            table, written, resolved.checkpoint.n_styles, summary, dt.version(), t0,
            remove_ids=[image_id_for(u) for u in plan.deleted],
            extra={"plan": plan.counts(), "lost": result.lost},
        )
    except ConcurrentRunError as exc:
        raise NightlyError(str(exc)) from exc
    except Exception as exc:
        raise NightlyError(
            f"committing run {run_id} to {config.output} failed: {type(exc).__name__}: {exc}. The "
            "previous version is intact; rerun the same command"
        ) from exc
    clock.lap("commit_s")
    result.committed = summary.version is not None
    result.version, result.replaced = summary.version, summary.replaced
    result.live = state.num_rows + len(got) - summary.replaced
    return result


__all__ = [
    "ListedInput",
    "NightlyError",
    "NightlyPlan",
    "NightlyResult",
    "as_listed",
    "listing_table",
    "plan_nightly",
    "read_listing",
    "run_nightly",
    "source_items",
]
