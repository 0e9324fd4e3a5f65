"""What a run processes: the plan step of `pipelines.run`, the one step in which commands differ.

Every run goes list -> plan -> process -> write -> commit -> summary (`pipelines.run.execute`); a
planner turns the run's listing and the output table's current rows into a `Plan`:

- `InvertPlanner` (`psp invert`, `psp frontalize`): every listed input that is not done yet (an
  input is done when all its rows have a final status), less the rows a crashed run wrote for the
  same input bytes and checkpoint (adopted, not redone).
- `NightlyPlanner` (`psp nightly`): new (no row), changed (ETag -- or size/mtime where there is
  no ETag -- differs), deleted (gone from the listing: their rows leave the table), and, on
  request, rows made by another checkpoint (`reprocess_on_model_change`) or with a transient
  failure (`retry_failed`); rows a crashed run wrote for exactly these inputs, from the same bytes
  and checkpoint, are adopted (`pipelines.adoption.adoptable_rows`).

Both are the distributed join of `pipelines.diff` (the listing's shards against the table's key
columns, hash-partitioned, in Ray tasks) with their rule: the rows to process come back as Parquet
shards the read tasks read, the driver gets counts. With `--align dlib` a second join attaches to
those rows the alignment earlier runs stored for them (`pipelines.diff.attach_stored_alignment`,
`pipelines.reuse`), so the align stage does not detect them again. `plan_nightly` applies the
nightly rule in this process (the same function a partition runs).

Nothing is visible to readers before the run's one commit, so a crash anywhere leaves the previous
version, and the rerun neither loses nor duplicates a row.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines.adoption import adoptable_rows, uncommitted_runs, wanted_facts
from pipelines.config import ResolvedConfig
from pipelines.diff import (
    BUCKETS,
    STATE_COLUMNS,
    Diff,
    DiffRule,
    attach_stored_alignment,
    bucket_lists,
    diff,
    diff_partition,
)
from pipelines.items import mtime_us
from pipelines.listing import Listing, count_todo, done_keys, items_table, scratch_dir
from pipelines.table import ConcurrentRunError, OutputTable
from pipelines.writer import WrittenRun
from schemas.ids import image_id_for

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


#: URIs a `NightlyPlan` keeps per bucket (its counts are exact): examples for a report, never a
#: list a run needs.
PLAN_EXAMPLES = 1000


@dataclass
class NightlyPlan:
    """What a nightly run planned: exact counts per bucket, and the source URIs of each (in listing
    order; a bucket of more than `PLAN_EXAMPLES` keeps the first `PLAN_EXAMPLES`).
    `to_process` lists what the pipeline gets."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    model_changed: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    n: dict[str, int] = field(default_factory=dict)  # exact counts (default: the lists' lengths)

    @property
    def to_process(self) -> list[str]:
        return self.new + self.changed + self.model_changed + self.retry

    def counts(self) -> dict[str, int]:
        out = {b: self.n.get(b, len(getattr(self, b))) for b in ("new", "changed", "model_changed", "retry", "deleted")}
        out["unchanged"] = self.unchanged
        out["to_process"] = out["new"] + out["changed"] + out["model_changed"] + out["retry"]
        return out

    @classmethod
    def of(cls, plan: Diff, examples: int = PLAN_EXAMPLES) -> NightlyPlan:
        """The counts of a run's `pipelines.diff.Diff` and up to `examples` URIs per bucket."""
        counts = plan.counts
        return cls(**plan.bucket_uris(examples), deleted=plan.deleted.slice(0, examples).to_pylist(), unchanged=counts["unchanged"],
                   n={k: counts[k] for k in (*BUCKETS[:-1], "deleted")})


# -- the listing ------------------------------------------------------------------------------

def as_listed(item: Any) -> ListedInput:
    """A `pipelines.items.SourceItem` (or anything with uri/size/etag/mtime) as a ListedInput."""
    size = getattr(item, "size", None)
    etag = getattr(item, "etag", None)
    us = mtime_us(getattr(item, "mtime", None))
    return ListedInput(
        uri=getattr(item, "source_uri", None) or item.uri,  # the key output rows carry
        size=None if size is None or int(size) < 0 else int(size),
        etag=None if etag is None else str(etag).strip('"'),
        mtime=None if us is None else us / 1e6,
    )


def plan_nightly(
    listing: Iterable[Any] | pa.Table,
    state: pa.Table,
    checkpoint_sha256: str,
    reprocess_on_model_change: bool = False,
    retry_failed: bool = False,
) -> NightlyPlan:
    """Diff a listing against the current rows of the output table in this process (pure: no
    I/O), by the rules a run's distributed plan applies to each partition
    (`pipelines.diff.diff_partition`).

    `listing`: `ListedInput`s / `SourceItem`s, or listing-shard rows (`SHARD_SCHEMA`); `state`:
    the table's source_uri, status, checkpoint_sha256, source_size, source_mtime and source_etag
    (`pipelines.table.OutputTable.state`); an input with several rows (one per face) is planned
    once. Each listed input lands in exactly one bucket: new, changed, model_changed (only with
    `reprocess_on_model_change`: rows made by another checkpoint), retry (only with
    `retry_failed`: a transient status), or unchanged. Inputs with a row but gone from the listing
    are ``deleted``. The lists are complete here.
    """
    listed = listing if isinstance(listing, pa.Table) else items_table(listing)
    rule = DiffRule("nightly", checkpoint_sha256, reprocess_on_model_change, retry_failed)
    todo, deleted, counts = diff_partition(listed, state.select(list(STATE_COLUMNS)), rule)
    return NightlyPlan(**bucket_lists(todo), deleted=deleted.to_pylist(), unchanged=counts["unchanged"])


# -- the plan a run executes ------------------------------------------------------------------

@dataclass
class Plan:
    """What one run processes, as its planner decided.

    source: what the pipeline reads -- the plan's `Listing` of the inputs to process (less the
    inputs in `skip`, an ObjectRef to `pipelines.listing.done_keys`: adopted ones). todo: inputs handed to the
    pipeline (0: nothing to process). listed / skipped: inputs listed / left as they are.
    adopted: rows crashed runs wrote, committed instead of redone. remove_ids: source ids whose
    rows leave the table (deleted inputs). expected: the inputs that must each get a row (a
    `Listing`: the run then counts the inputs with no row, `lost`); None: not counted.
    stop: plan only (a dry run): nothing is processed or committed. extra: the planner's facts,
    recorded in the commit's run summary.
    """

    source: Listing | Sequence[Any] | None
    todo: int
    listed: int
    skipped: int
    adopted: WrittenRun
    skip: Any = None
    remove_ids: Sequence[str] | pa.Array = ()
    expected: Listing | None = None
    stop: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class InvertPlanner:
    """`psp invert` / `frontalize`: every listed input not done yet (an input is done when all its
    rows have a final status), from the distributed diff (`pipelines.diff`, rule 'invert'); a
    crashed run's rows adopted. Failures raise as they are (`failure` returns None)."""

    kind = "invert"

    def plan(self, resolved: ResolvedConfig, table: OutputTable, dt, listing: Listing) -> Plan:
        plan = diff(listing, table, dt, scratch_dir(table.uri, resolved.run_id), DiffRule("invert"))
        adopted, skip, todo = adopt(table, dt, plan, resolved, retry_failed=True)
        limit = resolved.config.limit
        source = attach_stored_alignment(resolved, plan.todo, table) if todo else plan.todo
        return Plan(source=source, todo=min(todo, limit) if limit is not None else todo, listed=listing.total,
                    skipped=plan.counts["unchanged"], adopted=adopted, skip=skip)

    def failure(self, step: str, exc: Exception, resolved: ResolvedConfig, todo: int) -> Exception | None:
        return None


def adopt(table: OutputTable, dt, plan: Diff, resolved: ResolvedConfig, retry_failed: bool) -> tuple[WrittenRun, Any, int]:
    """Rows crashed runs wrote for the inputs `plan` processes (`pipelines.adoption`; their listing
    facts read from the plan's shards: as many as the run redoes, only when there is an
    uncommitted run), the keys the read tasks then skip (an ObjectRef, None when nothing was
    adopted), and the inputs left to process."""
    run_id = resolved.run_id
    adopted = WrittenRun(run_id)
    if not plan.to_process or not uncommitted_runs(table, dt, run_id):
        return adopted, None, plan.to_process
    listed = plan.todo.read_table(["source_uri", "size", "etag", "mtime"])
    adopted = adoptable_rows(table, dt, wanted_facts(listed),
                             resolved.checkpoint.sha256, retry_failed=retry_failed, exclude_run=run_id)
    adopted.run_id = run_id
    if not adopted.rows:
        return adopted, None, plan.to_process
    import ray

    skip = ray.put(done_keys(adopted.ids))
    todo, _ = count_todo(plan.todo, skip)
    return adopted, skip, todo


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
        rule = DiffRule("nightly", resolved.checkpoint.sha256, self.reprocess_on_model_change, self.retry_failed)
        plan = diff(listing, table, dt, scratch_dir(table.uri, run_id), rule)
        self.rows_before = plan.table_rows
        self.diff = NightlyPlan.of(plan)
        log.info("nightly %s plan: %s", run_id, plan.counts)
        if self.dry_run:
            plan.todo.discard()
            return Plan(source=None, todo=0, listed=listing.total, skipped=plan.counts["unchanged"],
                        adopted=WrittenRun(run_id), stop=True, extra={"plan": self.diff.counts()})
        if self.resume:
            adopted, skip, todo = adopt(table, dt, plan, resolved, retry_failed=self.retry_failed)
        else:
            adopted, skip, todo = WrittenRun(run_id), None, plan.to_process
        remove = pa.array([image_id_for(u) for u in plan.deleted.to_pylist()], pa.string())
        source = attach_stored_alignment(resolved, plan.todo, table) if todo else plan.todo
        return Plan(source=source, todo=todo, listed=plan.counts["unchanged"] + plan.to_process,
                    skipped=plan.counts["unchanged"], adopted=adopted, skip=skip, remove_ids=remove,
                    expected=plan.todo, extra={"plan": self.diff.counts()})

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
    "adopt",
    "as_listed",
    "plan_nightly",
]
