"""One run, whatever the command: list -> plan -> process -> write -> commit -> summary.

`execute(config, planner)` is the whole skeleton, read top to bottom:

1. check (on the driver, before Ray starts): `pipelines.config.resolve_config` (the checkpoint read
   once), the output table opened (created when missing), INPUT listable;
2. list: INPUT listed in Ray tasks into Parquet shards (`pipelines.listing`), or `--listing PATH`,
   or explicit items;
3. plan: the planner's (`pipelines.plan`) -- the only step in which `psp invert` / `frontalize`
   (`InvertPlanner`: everything not done yet) and `psp nightly` (`NightlyPlanner`: new, changed,
   deleted, retry) differ -- including the rows adopted from a crashed run;
4. process + write: the Ray Data pipeline (`pipelines.dataflow.process_items`) writes the run's
   files under ``OUTPUT/runs/<run_id>/`` (not committed);
5. commit: one Delta commit (`pipelines.table.commit_run`) with the run's summary;
6. summary: ``OUTPUT/_runs/<run_id>.json`` and the `RunSummary` the CLI prints.

`run_invert` and `run_nightly` are the two commands' entry points. `psp edit` writes another
table (`pipelines.edit`) and records its summary with the same `record_summary`.
"""
from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pipelines.commit import commit_run, run_metadata, write_run_summary
from pipelines.config import ConfigError, InvertConfig, ResolvedConfig, code_version, resolve_config
from pipelines.dataflow import STAGES, Processed, StageTiming, ensure_ray, process_items
from pipelines.items import InputError, SourceItem
from pipelines.listing import (
    Listing,
    check_inputs,
    count_todo,
    items_listing,
    list_to_shards,
    read_user_listing,
    scratch_dir,
)
from pipelines.plan import InvertPlanner, NightlyError, NightlyPlan, NightlyPlanner, Plan
from pipelines.replace import run_keys
from pipelines.reuse import alignment_signature
from pipelines.secrets import redact
from pipelines.table import ConcurrentRunError, OutputTable, TableMismatchError
from pipelines.writer import WrittenRun

# ------------------------------------------------------------------------------------------------
# What a run reports


@dataclass
class RunSummary:
    """What a run did. `counts`: rows committed per status (processed + adopted); `skipped`:
    inputs already in the output (final status) and not reprocessed; `not_inputs`: files under the
    input left out by the listing rules, per reason (hidden, excluded, not_an_image, output, ...:
    see `pipelines.sources`); `adopted`: rows a crashed run had written, committed instead of
    redone; `replaced`: older rows this run's rows replaced; `version`: the table version the run
    committed (None: nothing to commit); `stages`: per-stage timings; `operators`: Ray Data
    operator names as executed."""

    run_id: str
    input: Any
    output: str
    checkpoint: str
    checkpoint_sha256: str | None
    task: str
    align: str
    device: str
    listed: int
    skipped: int
    processed: int
    counts: dict[str, int]
    stages: dict[str, dict[str, float]]
    operators: list[str] = field(default_factory=list)
    started_at: str = ""
    finished_at: str = ""
    wall_s: float = 0.0
    code_version: str = ""
    not_inputs: dict[str, int] = field(default_factory=dict)
    adopted: int = 0
    replaced: int = 0
    version: int | None = None
    kind: str = "invert"
    model_family: str = "psp"  # the checkpoint's family (psp, e4e, restyle_psp, restyle_e4e)
    n_iters: int = 1  # ReStyle's refinement steps in this run (1 for pSp and e4e)
    alignment: str = ""  # the alignment options (pipelines.reuse.alignment_signature): what reuse matches
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds: list_s, plan_s, process_s, commit_s

    def format(self) -> str:
        """The end-of-run report printed by the CLI."""
        committed = f"committed as version {self.version}" if self.version is not None else "nothing committed"
        lines = [
            f"run {self.run_id}: {self.processed} processed, {self.adopted} adopted, {self.skipped} skipped "
            f"(already in {self.output}), {self.listed} listed, {self.replaced} older rows replaced; "
            f"{committed}; {self.wall_s:.1f}s"
            + (" (" + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()) + ")" if self.phases else ""),
            "  status counts: " + (", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"),
            "  not inputs (skipped while listing): "
            + (", ".join(f"{k}={v}" for k, v in sorted(self.not_inputs.items())) or "none"),

            f"  {'stage':<8} {'rows':>7} {'rows/s':>9} {'busy s':>9} {'ms/row':>9}",
        ]
        for name in STAGES:
            s = self.stages.get(name)
            if s:
                per_row = 1e3 * s["busy_s"] / s["rows"] if s["rows"] else 0.0
                lines.append(f"  {name:<8} {s['rows']:>7} {s['rows_per_s']:>9.2f} {s['busy_s']:>9.2f} {per_row:>9.1f}")
        device = self.stages.get("invert_device")
        if device and device["rows"]:
            host = self.stages.get("invert", device)["busy_s"] - device["busy_s"]
            lines.append(f"  invert: {1e3 * device['busy_s'] / device['rows']:.2f} ms/row in the model call "
                         f"(device copies, tensor transform, model), {1e3 * host / device['rows']:.2f} ms/row of "
                         "block handling around it")
        reused = self.stages.get("align_reused")
        if reused:
            lines.append(f"  alignment reused (no detection) for {reused['rows']} inputs; --no-reuse-alignment detects again")
        if self.operators:
            lines.append("  ray operators: " + " | ".join(self.operators))
        return "\n".join(lines)


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


def stage_dict(timings: Mapping[str, StageTiming]) -> dict[str, dict[str, float]]:
    return {
        k: {"rows": v.rows, "busy_s": round(v.busy_s, 3), "wall_s": round(v.wall_s, 3),
            "rows_per_s": round(v.rows_per_s, 3)}
        for k, v in timings.items()
    }


# ------------------------------------------------------------------------------------------------
# The steps around the plan


class Planner(Protocol):
    """The plan step of a run (`pipelines.plan.InvertPlanner`, `NightlyPlanner`)."""

    kind: str

    def plan(self, resolved: ResolvedConfig, table: OutputTable, dt, listing: Listing) -> Plan: ...

    def failure(self, step: str, exc: Exception, resolved: ResolvedConfig, todo: int) -> Exception | None:
        """The error a failed step ('inputs', 'list', 'process', 'commit') raises (None: `exc`)."""


def open_output(resolved: ResolvedConfig) -> tuple[OutputTable, Any]:
    """The run's output table, created when missing (ConfigError when OUTPUT holds another
    model's table), and its current version (`DeltaTable`) the run plans against."""
    table = OutputTable(resolved.config.output, resolved.config.storage_options)
    try:
        return table, table.ensure(resolved.checkpoint.n_styles)
    except TableMismatchError as e:
        raise ConfigError(str(e)) from None


def make_listing(config: InvertConfig, table: OutputTable, run_id: str,
                 items: Sequence[SourceItem] | None = None) -> Listing:
    """The run's listing: INPUT listed in Ray tasks, or `--listing PATH`, or explicit `items`."""
    import ray

    ensure_ray()
    scratch = scratch_dir(table.uri, run_id)
    so = config.storage_options
    try:
        if items is not None:
            return items_listing(items, scratch, so)
        if config.listing:
            return read_user_listing(config.listing, scratch, so)
        return list_to_shards(config.input, scratch, so, config.image_column, include=config.include or (),
                              exclude=config.exclude or (), output=config.output)
    except ray.exceptions.RayTaskError as e:  # a listing task's InputError reads as the driver's would
        cause = e.as_instanceof_cause()
        if isinstance(cause, InputError):
            raise InputError(str(cause).strip().splitlines()[-1]) from None
        raise


def record_summary(table: OutputTable, doc: Mapping[str, Any], version: int) -> dict:
    """``OUTPUT/_runs/<run_id>.json`` for a committed run (any command, any table): `doc` with
    credentials masked, the versions shaping the outputs, and the table's counts at `version`."""
    return write_run_summary(table, redact({**run_metadata(), **dict(doc)}, table.storage_options), version)


def commit_summary(table: OutputTable, written: WrittenRun, n_styles: int, summary: RunSummary, read_version: int,
                   t0: float, remove_ids: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> RunSummary:
    """Commit a run's rows with its summary (`psp.run` of the commit, and ``_runs/<id>.json``
    with the whole table's counts after it); fills `summary.version` / `replaced` / times."""
    summary.finished_at = _dt.datetime.now(_dt.UTC).isoformat()
    summary.wall_s = round(time.perf_counter() - t0, 3)
    # Credentials never reach the commit's metadata or the run summary file.
    doc = redact({**asdict(summary), **run_metadata(), **dict(extra or {})}, table.storage_options)
    result = commit_run(table, written, n_styles, doc, read_version, remove_ids)
    if result is not None:
        summary.version, summary.replaced = result.version, result.removed
        doc.update(version=result.version, replaced=result.removed)
        record_summary(table, doc, result.version)
    return summary


@contextmanager
def _step(planner: Planner, name: str, resolved: ResolvedConfig, todo: int = 0) -> Iterator[None]:
    """Run one step; a failure raises as the planner words it (a ConfigError as it is)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        err = planner.failure(name, exc, resolved, todo)
        if err is None:
            raise
        raise err from exc


class _Laps:
    """Wall-clock seconds of a run's phases."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name], self._last = now - self._last, now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.phases.items()}


# ------------------------------------------------------------------------------------------------
# The skeleton


@dataclass
class RunOutcome:
    """What `execute` did: the plan, the summary (None when the plan stopped: a dry run), the
    rows of explicit inputs that came back (`processed`) and the inputs that got none (`lost`)."""

    resolved: ResolvedConfig
    plan: Plan
    summary: RunSummary | None
    processed: int = 0
    lost: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per step


def execute(config: InvertConfig, planner: Planner, items: Sequence[SourceItem] | None = None) -> RunOutcome:
    """One run of `config` planned by `planner`: list -> plan -> process -> write -> commit ->
    summary (see the module docstring). items: process exactly these instead of listing INPUT."""
    started, t0 = _dt.datetime.now(_dt.UTC), time.perf_counter()
    resolved = resolve_config(config)
    config = resolved.config
    table, dt = open_output(resolved)
    if items is None:  # a missing INPUT fails fast, before Ray starts
        with _step(planner, "inputs", resolved):
            check_inputs(config.input, config.storage_options, config.listing)
    ensure_ray()
    laps = _Laps()
    with _step(planner, "list", resolved):
        listing = make_listing(config, table, resolved.run_id, items)
    plan: Plan | None = None
    try:
        laps.lap("list_s")
        plan = planner.plan(resolved, table, dt, listing)
        laps.lap("plan_s")
        if plan.stop:
            return RunOutcome(resolved, plan, None, phases=laps.rounded())
        processed: Processed | None = None
        if plan.todo:
            with _step(planner, "process", resolved, plan.todo):
                processed = process_items(resolved, plan.source, table, plan.skip)
        laps.lap("process_s")
        written = WrittenRun(resolved.run_id)
        written.merge(plan.adopted)
        if processed is not None:
            written.merge(processed.written)
        outcome = RunOutcome(resolved, plan, None, processed=plan.todo, phases=laps.phases)
        extra = dict(plan.extra)
        if plan.expected is not None:  # the planned inputs that got no row (in Ray tasks, by key)
            distinct, keys = run_keys(table, [a.path for a in written.adds])
            outcome.processed = distinct - plan.adopted.rows
            lost = count_todo(plan.expected, keys)[0] if plan.expected.total else 0
            outcome.lost = extra["lost"] = lost
        outcome.counts = written.counts()
        summary = RunSummary(
            run_id=resolved.run_id, input=config.input, output=config.output, checkpoint=config.checkpoint,
            checkpoint_sha256=(processed.checkpoint_sha256 if processed else None) or resolved.checkpoint.sha256,
            task=resolved.task, align=resolved.align, device=processed.device if processed else config.device,
            listed=plan.listed, skipped=plan.skipped, processed=outcome.processed, counts=outcome.counts,
            stages=stage_dict(processed.timings if processed else {}),
            operators=processed.operators if processed else [], started_at=started.isoformat(),
            code_version=code_version(), adopted=plan.adopted.rows, not_inputs=dict(sorted(listing.not_inputs.items())),
            kind=planner.kind, model_family=resolved.checkpoint.family, n_iters=resolved.n_iters,
            alignment=alignment_signature(config, resolved.align), phases=laps.phases,
        )
        with _step(planner, "commit", resolved):
            outcome.summary = commit_summary(table, written, resolved.checkpoint.n_styles, summary, dt.version(), t0,
                                             remove_ids=plan.remove_ids, extra=extra)
        laps.lap("commit_s")
        summary.phases = outcome.phases = laps.rounded()
        return outcome
    finally:
        listing.discard()
        if plan is not None and isinstance(plan.source, Listing):
            plan.source.discard()


# ------------------------------------------------------------------------------------------------
# The commands


def run_invert(config: InvertConfig, items: Sequence[Any] | None = None) -> RunSummary:
    """Run `psp invert`: every input gets exactly one row (status + error) in the output table at
    `config.output` (with `--faces all`, one per face), committed in one Delta commit; inputs whose
    rows there all have a final status are skipped, others (new, or a transient failure) processed
    and their old rows replaced. Rows a crashed run wrote for the same input bytes and checkpoint
    are adopted, not redone.

    items: process exactly these (`SourceItem`s or dicts of its fields) instead of listing
    `config.input`. Misconfiguration raises `pipelines.config.ConfigError` before any Ray work; a
    concurrent run that committed some of the same inputs first raises
    `pipelines.table.ConcurrentRunError` (nothing committed).
    """
    outcome = execute(config, InvertPlanner(), None if items is None else _coerce_items(items))
    assert outcome.summary is not None  # an invert plan never stops early
    return outcome.summary


def run_nightly(
    config: InvertConfig,
    reprocess_on_model_change: bool = False,
    retry_failed: bool = False,
    dry_run: bool = False,
    resume: bool = True,
) -> NightlyResult:
    """One nightly run of `config.input` into the output table at `config.output` (its `run_id`
    is used if set). Raises `pipelines.plan.NightlyError` (nothing committed) when listing, the
    pipeline, or the commit fails, and `pipelines.config.ConfigError` for a misconfiguration."""
    planner = NightlyPlanner(reprocess_on_model_change, retry_failed, dry_run, resume)
    outcome = execute(config, planner)
    plan, summary = outcome.plan, outcome.summary
    result = NightlyResult(run_id=outcome.resolved.run_id, plan=planner.diff, adopted=plan.adopted.rows,
                           live=planner.rows_before)
    result.timings = outcome.phases
    if summary is None:  # a dry run
        return result
    result.processed, result.lost, result.status_counts = outcome.processed, outcome.lost, outcome.counts
    result.committed = summary.version is not None
    result.version, result.replaced = summary.version, summary.replaced
    result.live = planner.rows_before + outcome.processed + plan.adopted.rows - summary.replaced
    return result


def _coerce_items(items: Sequence[Any]) -> list[SourceItem]:
    out = []
    for it in items:
        if isinstance(it, SourceItem):
            out.append(it)
        elif isinstance(it, Mapping):
            fields = SourceItem.__dataclass_fields__
            out.append(SourceItem(**{k: v for k, v in it.items() if k in fields}))
        else:
            raise TypeError(f"items must be SourceItem or dicts of its fields, got {type(it).__name__}")
    return out


__all__ = ["ConcurrentRunError", "NightlyError", "NightlyResult", "RunOutcome", "RunSummary", "execute",
           "record_summary", "run_invert", "run_nightly"]
