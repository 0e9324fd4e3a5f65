"""The Ray wiring: list -> read -> decode+align (CPU actors) -> invert (GPU or CPU actors) -> outputs
(CPU actors) -> one commit to the Delta output table.

`run_invert(config)` is the whole run: validate on the driver (fail fast), list the inputs in Ray
tasks into Parquet shards (`pipelines.listing`: the driver holds shard names and counts), skip what
the output table already holds (in the read tasks), build the dataset with `build_dataset` (the one
short function that wires the stages), write the run's files and commit them to the output table in
one Delta commit (`pipelines.table`), and return a `RunSummary` (counts per status, rows and rows/s
per stage, wall time per phase).
Stages report their time to a small `StageClock` actor. `process_items` (write, no commit) is what
the nightly job runs too.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import ConfigError, InvertConfig, ResolvedConfig, code_version, resolve_config
from pipelines.listing import (
    LISTING_DIR,
    Listing,
    check_inputs,
    count_todo,
    done_keys,
    items_listing,
    list_to_shards,
    listing_datasource,
    read_user_listing,
)
from pipelines.reuse import alignment_signature
from pipelines.secrets import WORKER_SETUP_HOOK, redact, redacted_rows
from pipelines.sources import SourceItem
from pipelines.table import (
    ConcurrentRunError,
    OutputTable,
    TableMismatchError,
    WrittenRun,
    adoptable_rows,
    commit_run,
    estimated_row_bytes,
    run_metadata,
    uncommitted_runs,
    write_run,
    write_run_summary,
)
from schemas.ids import image_id_for
from schemas.status import FINAL_STATUSES  # what a rerun skips: properties of the input itself

STAGES = ("read", "decode", "align", "invert", "outputs")
FINAL_STAGE = "outputs"  # the stage that reports each row's final status
ALIGN_BATCH = 4
READ_BATCH = 16
# Rows per block without face detection (--align none): every stage then costs well under a
# millisecond per row, and Ray's cost per block (a task or actor call per operator, the
# executor's bookkeeping) must be spread over many rows.
UNALIGNED_BATCH = 128


@dataclass
class StageTiming:
    """One stage: rows through it, summed time inside the stage callables (`busy_s`, over all
    actors) and the wall-clock span from its first batch start to its last batch end."""

    rows: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


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


# ------------------------------------------------------------------------------------------------
# Stage timing


def _clock_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class StageClockActor:
        def __init__(self):
            self.stages: dict[str, list[float]] = {}
            self.statuses: Counter = Counter()
            self.meta: dict = {}

        def record(self, stage: str, rows: int, seconds: float, end: float, statuses: dict, meta: dict,
                   parts: dict | None = None) -> None:
            for name, secs in [(stage, seconds), *(parts or {}).items()]:
                s = self.stages.setdefault(name, [0, 0.0, math.inf, -math.inf])
                s[0] += rows
                s[1] += secs
                s[2] = min(s[2], end - secs)
                s[3] = max(s[3], end)
            self.statuses.update(statuses)
            self.meta.update(meta)

        def snapshot(self) -> tuple[dict, dict, dict]:
            return {k: list(v) for k, v in self.stages.items()}, dict(self.statuses), dict(self.meta)

    return StageClockActor


class StageClock:
    """Picklable handle the stages call: `record(stage, rows, seconds, statuses=None, meta=None)`
    (statuses: counts of final row statuses; meta: facts such as the checkpoint sha256)."""

    def __init__(self, actor):
        self.actor = actor

    def record(
        self,
        stage: str,
        rows: int,
        seconds: float,
        statuses: Mapping[str, int] | None = None,
        meta: Mapping[str, Any] | None = None,
        parts: Mapping[str, float] | None = None,
    ) -> None:
        """`parts`: time of named parts of the same rows' work (e.g. invert_device), in the same call."""
        self.actor.record.remote(stage, int(rows), float(seconds), time.time(), dict(statuses or {}), dict(meta or {}),
                                 {k: float(v) for k, v in (parts or {}).items()})

    def collect(self, expected_rows: int, timeout_s: float = 10.0) -> tuple[dict[str, StageTiming], dict[str, int], dict]:
        """Stage timings, status counts and meta, waiting until the final stage reported
        `expected_rows` (records are fire-and-forget and may still be in flight after the write)."""
        import ray

        deadline = time.time() + timeout_s
        while True:
            stages, statuses, meta = ray.get(self.actor.snapshot.remote())
            done = stages.get(FINAL_STAGE, [0])[0]
            if done >= expected_rows or time.time() > deadline:
                break
            time.sleep(0.1)
        timings = {
            name: StageTiming(rows=int(v[0]), busy_s=float(v[1]), wall_s=max(0.0, float(v[3] - v[2])))
            for name, v in stages.items()
        }
        return timings, statuses, meta


# ------------------------------------------------------------------------------------------------
# The graph


def build_dataset(source: Listing | Sequence[SourceItem], resolved: ResolvedConfig, resources: Mapping[str, Any],
                  clock=None, stored_alignment=None, skip=None):
    """The Ray Data graph for `source` (not executed): read -> decode+align -> invert -> outputs.

    source: a `pipelines.listing.Listing` (read lazily, one read task per shard, dropping the
    inputs in `skip`, an ObjectRef to `pipelines.listing.done_keys`, and `config.limit` applied),
    or explicit `SourceItem`s (a short list: the nightly plan's inputs, tests).

    Read is a task operator (fractional CPU, I/O bound); align, invert and outputs are separate
    actor pools (different compute and resources, so Ray does not fuse them): the align actors do
    detection and the PIL part of the task transform, the model actors only tensor work on their
    device, the outputs actors PNG/JPEG encoding, metrics and the table. Each pool scales on its own.
    resources: `{"model": invert_resources(...), "outputs": outputs_resources(...)}`.
    stored_alignment: an ObjectRef to the `pipelines.reuse.StoredAlignment` the align actors reuse.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.align import AlignFaces
    from pipelines.invert import DEFAULT_CPU_BATCH, DEFAULT_GPU_BATCH, InvertFaces
    from pipelines.outputs import DEFAULT_OUTPUT_BATCH, EncodeOutputs
    from pipelines.sources import read_batch
    from psp_core.tasks import get_task

    config = resolved.config
    model, outputs = resources["model"], resources["outputs"]
    on_gpu = model["device"] == "cuda"
    batch_size = config.batch_size or (DEFAULT_GPU_BATCH if on_gpu else DEFAULT_CPU_BATCH)
    detect = resolved.align != "none"
    read_rows, align_rows = (READ_BATCH, ALIGN_BATCH) if detect else (UNALIGNED_BATCH, UNALIGNED_BATCH)
    if isinstance(source, Listing):
        ds = ray.data.read_datasource(listing_datasource(source, align_rows, skip), num_cpus=0.25)
        if config.limit is not None:
            ds = ds.limit(config.limit)
    else:
        rows = [item.to_row() for item in source]
        # Small blocks so alignment and inversion overlap from the start; capped for long lists.
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(math.ceil(len(rows) / align_rows), 1000)))
    ds = ds.map_batches(
        read_batch,
        fn_kwargs={"storage_options": config.storage_options, "stage_clock": clock,
                   "timeout_s": config.read_timeout},
        batch_size=read_rows,
        batch_format="numpy",
        num_cpus=0.25,
    )
    ds = ds.map_batches(
        AlignFaces,
        fn_constructor_kwargs={
            "mode": resolved.align,
            "gray": get_task(resolved.task).label_nc > 0,
            "aligner_kwargs": {"detect_size": config.align_detect_size} if config.align_detect_size else None,
            "stage_clock": clock,
            "decode_timeout_s": config.decode_timeout,
            "task": resolved.task,
            "resize_factor": config.resize_factor,
            "keep_aligned": config.metrics or config.save_aligned,
            "faces": config.faces,
            "min_face": config.min_face,
            "stored_alignment": stored_alignment,
        },
        compute=ActorPoolStrategy(min_size=1, max_size=config.align_actors),
        batch_size=align_rows,
        batch_format="numpy",
        num_cpus=0.5,
    )
    memory = {"memory": model["memory"]} if model.get("memory") else {}
    ds = ds.map_batches(
        InvertFaces,
        fn_constructor_kwargs={
            "checkpoint": config.checkpoint,
            "task": resolved.task,
            "device": model["device"],
            "storage_options": config.storage_options,
            "images": config.images,
            "image_size": config.image_size,
            "metrics": config.metrics,
            "mix": config.mix,
            "latent_mask": resolved.latent_mask,
            "mix_alpha": config.mix_alpha,
            "seed": config.seed,
            "precision": config.precision,
            "cpu_threads": config.cpu_threads,
            "stage_clock": clock,
            "n_iters": config.n_iters,
            "keep_iterations": config.keep_iterations,
        },
        compute=ActorPoolStrategy(min_size=1, max_size=model["actors"]),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=model["num_gpus"],
        num_cpus=model["num_cpus"],
        **memory,
    )
    return ds.map_batches(
        EncodeOutputs,
        fn_constructor_kwargs={
            "task": resolved.task,
            "run_id": resolved.run_id,
            "n_styles": resolved.checkpoint.n_styles,
            "images": config.images,
            "metrics": config.metrics,
            "save_aligned": config.save_aligned,
            "code_version": code_version(),
            "stage_clock": clock,
        },
        compute=ActorPoolStrategy(min_size=1, max_size=outputs["actors"]),
        batch_size=DEFAULT_OUTPUT_BATCH,
        batch_format="numpy",
        num_cpus=outputs["num_cpus"],
    )


def pipeline_resources(cluster_resources: Mapping[str, Any], resolved: ResolvedConfig) -> dict[str, dict[str, Any]]:
    """What the model and outputs actors request on this cluster (pure; ValueError when the config
    cannot run there, e.g. --precision fp16 without GPUs). The model actor requests the host
    memory it uses (`model_actor_memory`, from the checkpoint's size)."""
    from pipelines.invert import DEFAULT_CPU_BATCH, DEFAULT_GPU_BATCH, invert_resources, model_actor_memory
    from pipelines.outputs import outputs_resources

    config = resolved.config
    model = invert_resources(cluster_resources, config.device, config.gpus, precision=config.precision)
    batch = config.batch_size or (DEFAULT_GPU_BATCH if model["device"] == "cuda" else DEFAULT_CPU_BATCH)
    memory = model_actor_memory(
        resolved.checkpoint.size_bytes or 0, resolved.checkpoint.output_size, batch, model["device"], config.mix
    )
    # Never more than half the cluster's memory: an unschedulable actor would hang the run.
    cluster_memory = float(cluster_resources.get("memory", 0) or 0)
    model["memory"] = int(min(memory, cluster_memory / 2)) if cluster_memory else memory
    return {"model": model, "outputs": outputs_resources(cluster_resources, config.output_actors)}


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (e.g. `auto`, `ray://head:10001`; set for Ray Jobs), or
    start a private local one -- never silently join another local cluster. The local cluster
    runs with token auth disabled unless RAY_AUTH_MODE says otherwise (Ray 2.59+ requires a
    token by default)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Worker log records are redacted too (a Ray Job's own runtime_env carries the same hook).
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK} if address == "local" else None
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address == "local" else None,
             runtime_env=runtime_env)


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


def _operator_names(ds) -> list[str]:
    try:
        summary = ds.get_stats_summary()
        names = []
        while summary is not None:
            names = [op.operator_name for op in summary.operators_stats] + names
            summary = summary.parents[0] if summary.parents else None
        return names
    except Exception:  # stats are informative only
        return []


@dataclass
class Processed:
    """What `process_items` did: the run's uncommitted files, stage timings, statuses, facts."""

    written: WrittenRun
    timings: dict[str, StageTiming]
    counts: dict[str, int]
    operators: list[str]
    checkpoint_sha256: str | None
    device: str


def process_items(resolved: ResolvedConfig, source: Listing | Sequence[SourceItem], table: OutputTable,
                  skip=None) -> Processed:
    """Run the pipeline on `source` (a Listing, less the inputs in `skip`, or SourceItems) and write
    the rows as run `resolved.run_id`'s files in `table` (not committed: `pipelines.table.commit_run`
    does that)."""
    import ray

    from pipelines.reuse import load_stored_alignment, reuse_enabled

    config = resolved.config
    ensure_ray()
    items = source
    if isinstance(source, Listing):  # reuse looks up stored alignments by the inputs' ids
        items = ([_Uri(u) for u in source.read_table(["source_uri"])["source_uri"].to_pylist()]
                 if reuse_enabled(config, resolved.align) else [])
    stored = load_stored_alignment(resolved, items, table)
    try:
        resources = pipeline_resources(ray.cluster_resources(), resolved)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0  # a failed write must fail the run, not lose rows
    ctx.enable_progress_bars = sys.stderr.isatty() if config.progress is None else bool(config.progress)
    if not ctx.enable_progress_bars:  # asked for (or no terminal): not worth a warning line
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Pinned to the driver's node: a lost worker node must not take the run's stats with it.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    clock_actor = _clock_actor_class().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    clock = StageClock(clock_actor)
    try:
        # Credentials are masked in the rows' free text right before they are written.
        stored_ref = ray.put(stored) if stored is not None else None
        ds = redacted_rows(build_dataset(source, resolved, resources, clock, stored_ref, skip),
                           config.storage_options)
        written = write_run(ds, table, resolved.run_id, resolved.checkpoint.n_styles, row_bytes=estimated_row_bytes(
            resolved.checkpoint.n_styles, config.images, config.image_size, resolved.checkpoint.output_size,
            config.mix or 0), expected_rows=source.total if isinstance(source, Listing) else len(source))
        timings, counts, meta = clock.collect(written.rows)
        operators = _operator_names(ds)
    finally:
        ray.kill(clock_actor)
    return Processed(written, timings, counts, operators, meta.get("checkpoint_sha256"),
                     resources["model"]["device"])


@dataclass(frozen=True)
class _Uri:
    source_uri: str


def scratch_dir(table: OutputTable, run_id: str) -> str:
    """Where a run keeps its listing shards (removed when the run ends)."""
    return f"{table.uri.rstrip('/')}/{LISTING_DIR}/{run_id}"


def make_listing(config: InvertConfig, table: OutputTable, run_id: str,
                 items: Sequence[SourceItem] | None = None) -> Listing:
    """The run's listing: INPUT listed in Ray tasks, or `--listing PATH`, or explicit `items`."""
    ensure_ray()
    scratch = scratch_dir(table, run_id)
    so = config.storage_options
    try:
        if items is not None:
            return items_listing(items, scratch, so)
        if config.listing:
            return read_user_listing(config.listing, scratch, so)
        return list_to_shards(config.input, scratch, so, config.image_column, include=config.include or (),
                              exclude=config.exclude or (), output=config.output)
    except ray_task_error() as e:  # a listing task's InputError reads as the driver's would
        from pipelines.sources import InputError

        cause = e.as_instanceof_cause()
        if isinstance(cause, InputError):
            raise InputError(str(cause).strip().splitlines()[-1]) from None
        raise


def ray_task_error():
    import ray

    return ray.exceptions.RayTaskError


def open_output(resolved: ResolvedConfig) -> tuple[OutputTable, Any]:
    """The run's output table, created when missing (ConfigError when OUTPUT holds another
    model's table), and its current version (`DeltaTable`) the run plans against."""
    table = OutputTable(resolved.config.output, resolved.config.storage_options)
    try:
        return table, table.ensure(resolved.checkpoint.n_styles)
    except TableMismatchError as e:
        raise ConfigError(str(e)) from None


def run_invert(config: InvertConfig, items: Sequence[SourceItem] | None = None) -> RunSummary:
    """Run `psp invert`: every input gets exactly one row (status + error) in the output table at
    `config.output` (with `--faces all`, one per face), committed in one Delta commit; inputs whose
    rows there all have a final status are skipped, others (new, or a transient failure) processed
    and their old rows replaced. Rows a crashed run wrote for the same input bytes and checkpoint
    are adopted, not redone.

    items: process exactly these instead of listing `config.input`. Misconfiguration raises
    `pipelines.config.ConfigError` before any Ray work; a concurrent run that committed some of
    the same inputs first raises `pipelines.table.ConcurrentRunError` (nothing committed).
    """
    started = _dt.datetime.now(_dt.UTC)
    t0 = time.perf_counter()
    resolved = resolve_config(config)
    config = resolved.config
    table, dt = open_output(resolved)
    if items is None:  # a missing INPUT fails fast, before Ray starts
        check_inputs(config.input, config.storage_options, config.listing)
    ensure_ray()
    lap = time.perf_counter()
    listing = make_listing(config, table, resolved.run_id, None if items is None else _coerce_items(items))
    try:
        return _run_listing(resolved, table, dt, listing, started, t0, {"list_s": time.perf_counter() - lap})
    finally:
        listing.discard()


def _run_listing(resolved: ResolvedConfig, table: OutputTable, dt, listing: Listing, started, t0: float,
                 phases: dict[str, float]) -> RunSummary:
    import ray

    config = resolved.config
    lap = time.perf_counter()
    done = inputs_done(table.state(dt, ("source_id", "status"), with_file=False))
    sha = resolved.checkpoint.sha256
    written = WrittenRun(resolved.run_id)
    if listing.total and uncommitted_runs(table, dt, resolved.run_id):  # a crashed run's rows to adopt
        written = _adopt(table, dt, listing, done, sha, resolved.run_id)
    adopted = written.rows
    skip = ray.put(done_keys(pa.concat_arrays([done, written.ids.cast(pa.string())])))
    todo, skipped = count_todo(listing, skip) if listing.total else (0, 0)
    skipped -= adopted
    todo = min(todo, config.limit) if config.limit is not None else todo
    phases["plan_s"], lap = time.perf_counter() - lap, time.perf_counter()
    processed = process_items(resolved, listing, table, skip) if todo else None
    phases["process_s"], lap = time.perf_counter() - lap, time.perf_counter()
    if processed is not None:
        written.merge(processed.written)
    summary = RunSummary(
        run_id=resolved.run_id, input=config.input, output=config.output, checkpoint=config.checkpoint,
        checkpoint_sha256=(processed.checkpoint_sha256 if processed else None) or sha, task=resolved.task,
        align=resolved.align, device=processed.device if processed else config.device, listed=listing.total,
        skipped=skipped, processed=todo, counts=written.counts(),
        stages=stage_dict(processed.timings if processed else {}),
        operators=processed.operators if processed else [], started_at=started.isoformat(),
        code_version=code_version(), adopted=adopted, not_inputs=dict(sorted(listing.not_inputs.items())),
        model_family=resolved.checkpoint.family, n_iters=resolved.n_iters,
        alignment=alignment_signature(config, resolved.align), phases=phases,
    )
    written.run_id = resolved.run_id
    summary = commit_summary(table, written, resolved.checkpoint.n_styles, summary, dt.version(), t0)
    phases["commit_s"] = time.perf_counter() - lap
    summary.phases = {k: round(v, 3) for k, v in phases.items()}
    return summary


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


def commit_summary(table: OutputTable, written: WrittenRun, n_styles: int, summary, read_version: int,
                   t0: float, remove_ids: Sequence[str] = (), extra: Mapping[str, Any] | None = None):
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
        write_run_summary(table, doc, result.version)
    return summary


def stage_dict(timings: Mapping[str, StageTiming]) -> dict[str, dict[str, float]]:
    return {
        k: {"rows": v.rows, "busy_s": round(v.busy_s, 3), "wall_s": round(v.wall_s, 3),
            "rows_per_s": round(v.rows_per_s, 3)}
        for k, v in timings.items()
    }


__all__ = ["FINAL_STATUSES", "ConcurrentRunError", "RunSummary", "build_dataset", "process_items", "run_invert"]
