"""The Ray Data wiring: read -> decode+align (CPU actors) -> invert (GPU or CPU actors) -> outputs
(CPU actors) -> the run's files in the output table (not committed).

`build_dataset` is the one short function that wires the stages (plain callables on batch dicts:
`pipelines.sources.read_batch`, `pipelines.align.AlignFaces`, `pipelines.model.InvertFaces`,
`pipelines.outputs.EncodeOutputs`); `process_items` runs it for one run -- the process and write
steps of `pipelines.run.execute` -- and hands back the uncommitted files, the per-stage timings
(stages report to a small `StageClock` actor) and the status counts. `pipeline_resources` decides
what the actor pools ask Ray for; `ensure_ray` connects to (or starts) the cluster.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.config import ConfigError, ResolvedConfig, code_version
from pipelines.items import SourceItem
from pipelines.listing import Listing, listing_datasource
from pipelines.model import ModelOptions
from pipelines.secrets import WORKER_SETUP_HOOK, redacted_rows
from pipelines.table import OutputTable
from pipelines.writer import WrittenRun, estimated_row_bytes, write_run

STAGES = ("read", "decode", "align", "invert", "outputs")
FINAL_STAGE = "outputs"  # the stage that reports each row's final status
ALIGN_BATCH = 4
READ_BATCH = 16
# Rows per block without face detection (--align none): every stage then costs well under a
# millisecond per row, and Ray's cost per block (a task or actor call per operator, the
# executor's bookkeeping: about 0.1 s of CPU per block over the six operators) must be spread
# over many rows. Fewer where a block would pass BLOCK_BYTES (`block_rows`).
UNALIGNED_BATCH = 512
# Rows per call of the model and outputs stages, at least: their work per row is small next to
# Ray's cost per call (the model's forward passes stay --batch-size images within a call).
MODEL_BLOCK_ROWS = 32
# What one block of the align or model stage's output should hold at most, about: Ray's own
# target block size (in-flight blocks are what the head's object store holds).
BLOCK_BYTES = 128 * 2**20
# A small run is cut into at least this many blocks, so its stages overlap (and its first files
# are written, adoptable after a crash, while the rest is in flight).
MIN_BLOCKS = 8
# How long Ray keeps an idle worker process. Ray's default (1 s) applies whenever a node has
# fewer whole CPUs free than idle workers, which is always the case while the actor pools hold
# fractions of its CPUs: then each fractional-CPU read or write task that finds no warm worker
# starts a fresh Python process (its imports cost 1-2 s of CPU), every few seconds of a run --
# 48-53 workers for 60,000 inputs on 2 cores where 17 suffice, a third of the run's CPU. A local
# cluster (`ensure_ray`) keeps them a minute; infra/Dockerfile sets the same for Ray clusters.
RAY_WORKER_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def keep_idle_workers() -> None:
    """Set `RAY_WORKER_ENV` in this process's environment (what a user set wins), before a local
    cluster is started from it: its raylet inherits the values."""
    for name, value in RAY_WORKER_ENV.items():
        os.environ.setdefault(name, value)


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
# Each stage's options


@dataclass(frozen=True)
class ReadOptions:
    """The keywords of the read stage, `pipelines.sources.read_batch`."""

    storage_options: Mapping[str, Any] | None
    timeout_s: float | None


@dataclass(frozen=True)
class AlignOptions:
    """The constructor keywords of the align stage, `pipelines.align.AlignFaces` (see its docstring)."""

    mode: str
    gray: bool
    aligner_kwargs: Mapping[str, Any] | None
    decode_timeout_s: float | None
    task: str
    resize_factor: int | None
    keep_aligned: bool
    faces: str
    min_face: int


@dataclass(frozen=True)
class OutputOptions:
    """The constructor keywords of the outputs stage, `pipelines.outputs.EncodeOutputs`."""

    task: str
    run_id: str
    n_styles: int
    images: str
    metrics: bool
    save_aligned: bool
    code_version: str


@dataclass(frozen=True)
class StageOptions:
    """Each stage's slice of a run's options, and the rows per block each operator takes."""

    checkpoint: str
    read: ReadOptions
    align: AlignOptions
    model: ModelOptions
    outputs: OutputOptions
    limit: int | None  # at most this many inputs
    read_rows: int
    align_rows: int
    model_rows: int  # rows per call of the model and outputs stages (a multiple of model.forward_rows)
    align_actors: int


def forward_rows(config, device: str) -> int:
    """Images per forward pass of the model: --batch-size, or 32 on a GPU and 8 on a CPU."""
    from pipelines.model import DEFAULT_CPU_BATCH, DEFAULT_GPU_BATCH

    return config.batch_size or (DEFAULT_GPU_BATCH if device == "cuda" else DEFAULT_CPU_BATCH)


def stage_options(resolved: ResolvedConfig, device: str, rows: int | None = None) -> StageOptions:
    """The one place a run's resolved options are split into what each stage takes. device: where
    the model actors run ('cpu' or 'cuda', as `pipeline_resources` decided). rows: the run's
    inputs, if known (a small run gets smaller blocks: at least MIN_BLOCKS of them)."""
    from psp_core.tasks import get_task

    c = resolved.config
    detect = resolved.align != "none"
    task = get_task(resolved.task)
    keep_aligned = c.metrics or c.save_aligned
    cap = max(1, math.ceil(rows / MIN_BLOCKS)) if rows else UNALIGNED_BATCH
    aligned_bytes = math.prod(task.prepared_shape) + (CROP_BYTES if keep_aligned else 0)
    read_rows, align_rows = ((READ_BATCH, ALIGN_BATCH) if detect
                             else (UNALIGNED_BATCH, block_rows(aligned_bytes, UNALIGNED_BATCH)))
    read_rows, align_rows = min(read_rows, cap), min(align_rows, cap)
    forward = forward_rows(c, device)
    # what a row holds after the model: W+ (per mixed sample too) and the generated images
    mix = c.mix or 0
    side = resolved.checkpoint.output_size if str(c.image_size) == "full" else 256
    model_bytes = ((1 + mix) * (resolved.checkpoint.n_styles * 512 * 4 + (side * side * 3 if c.images != "none" else 0))
                   + (CROP_BYTES if keep_aligned else 0))
    model_rows = min(max(align_rows, min(MODEL_BLOCK_ROWS, cap)), block_rows(model_bytes, UNALIGNED_BATCH))
    return StageOptions(
        checkpoint=c.checkpoint,
        read=ReadOptions(storage_options=c.storage_options, timeout_s=c.read_timeout),
        align=AlignOptions(
            mode=resolved.align, gray=task.label_nc > 0,
            aligner_kwargs={"detect_size": c.align_detect_size} if c.align_detect_size else None,
            decode_timeout_s=c.decode_timeout, task=resolved.task, resize_factor=c.resize_factor,
            keep_aligned=keep_aligned, faces=c.faces, min_face=c.min_face),
        model=ModelOptions(
            task=resolved.task, device=device, storage_options=c.storage_options, images=c.images,
            image_size=c.image_size, metrics=c.metrics, mix=c.mix, latent_mask=resolved.latent_mask,
            mix_alpha=c.mix_alpha, seed=c.seed, precision=c.precision, cpu_threads=c.cpu_threads,
            n_iters=c.n_iters, keep_iterations=c.keep_iterations, forward_rows=forward),
        outputs=OutputOptions(
            task=resolved.task, run_id=resolved.run_id, n_styles=resolved.checkpoint.n_styles, images=c.images,
            metrics=c.metrics, save_aligned=c.save_aligned, code_version=code_version()),
        limit=c.limit, read_rows=read_rows, align_rows=align_rows,
        # the model's forward passes stay `forward` images; its calls (and the outputs stage's) take
        # at least MODEL_BLOCK_ROWS rows, so Ray's cost per call is not paid per 8 rows, and at
        # most what keeps its output blocks within BLOCK_BYTES (a multiple of `forward`)
        model_rows=forward * max(1, math.ceil(model_rows / forward)),
        align_actors=c.align_actors,
    )


CROP_BYTES = 256 * 256 * 3  # the aligned crop, where a run keeps it (--metrics, --save-aligned)


def block_rows(row_bytes: int, most: int) -> int:
    """Rows of a block of rows of `row_bytes` each: `most`, or fewer (at least MODEL_BLOCK_ROWS)
    where the block would pass BLOCK_BYTES."""
    return max(MODEL_BLOCK_ROWS, min(most, BLOCK_BYTES // max(1, row_bytes)))


# ------------------------------------------------------------------------------------------------
# The graph


def build_dataset(source: Listing | Sequence[SourceItem], stages: StageOptions, resources: Mapping[str, Any],
                  clock=None, skip=None):
    """The Ray Data graph for `source` (not executed): read -> decode+align -> invert -> outputs.

    source: a `pipelines.listing.Listing` (read lazily, one read task per shard, dropping the
    inputs in `skip`, an ObjectRef to `pipelines.listing.done_keys`, and `stages.limit` applied),
    or explicit `SourceItem`s (a short list: the nightly plan's inputs, tests).

    Read is a task operator (fractional CPU, I/O bound); align, invert and outputs are separate
    actor pools (different compute and resources, so Ray does not fuse them): the align actors do
    detection and the PIL part of the task transform, the model actors only tensor work on their
    device, the outputs actors PNG/JPEG encoding, metrics and the table. Each pool scales on its own.
    stages: `stage_options(...)`. resources: `pipeline_resources(...)`. clock: a `StageClock`.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.align import AlignFaces
    from pipelines.model import InvertFaces
    from pipelines.outputs import EncodeOutputs
    from pipelines.read import read_batch

    model, outputs = resources["model"], resources["outputs"]
    if isinstance(source, Listing):
        ds = ray.data.read_datasource(listing_datasource(source, stages.align_rows, skip), num_cpus=0.25)
        if stages.limit is not None:
            ds = ds.limit(stages.limit)
    else:
        rows = [item.to_row() for item in source]
        # Small blocks so alignment and inversion overlap from the start; capped for long lists.
        blocks = max(1, min(math.ceil(len(rows) / stages.align_rows), 1000))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(read_batch, fn_kwargs={**asdict(stages.read), "stage_clock": clock},
                        batch_size=stages.read_rows, batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(AlignFaces,
                        fn_constructor_kwargs={**asdict(stages.align), "stage_clock": clock},
                        compute=ActorPoolStrategy(min_size=1, max_size=stages.align_actors),
                        batch_size=stages.align_rows, batch_format="numpy", num_cpus=0.5)
    ds = ds.map_batches(InvertFaces,
                        fn_constructor_kwargs={"checkpoint": stages.checkpoint, "options": stages.model,
                                               "stage_clock": clock},
                        compute=ActorPoolStrategy(min_size=1, max_size=model["actors"]),
                        batch_size=stages.model_rows, batch_format="numpy",
                        num_gpus=model["num_gpus"], num_cpus=model["num_cpus"],
                        **({"memory": model["memory"]} if model.get("memory") else {}))
    return ds.map_batches(EncodeOutputs, fn_constructor_kwargs={**asdict(stages.outputs), "stage_clock": clock},
                          compute=ActorPoolStrategy(min_size=1, max_size=outputs["actors"]),
                          batch_size=stages.model_rows, batch_format="numpy", num_cpus=outputs["num_cpus"])


def pipeline_resources(cluster_resources: Mapping[str, Any], resolved: ResolvedConfig) -> dict[str, dict[str, Any]]:
    """What the model and outputs actors request on this cluster (pure; ValueError when the config
    cannot run there, e.g. --precision fp16 without GPUs). The model actor requests the host
    memory it uses (`model_actor_memory`, from the checkpoint's size)."""
    from pipelines.model import invert_resources, model_actor_memory
    from pipelines.outputs import outputs_resources

    config = resolved.config
    model = invert_resources(cluster_resources, config.device, config.gpus, precision=config.precision)
    memory = model_actor_memory(resolved.checkpoint.size_bytes or 0, resolved.checkpoint.output_size,
                                forward_rows(config, model["device"]), model["device"], config.mix)
    # Never more than half the cluster's memory: an unschedulable actor would hang the run.
    cluster_memory = float(cluster_resources.get("memory", 0) or 0)
    model["memory"] = int(min(memory, cluster_memory / 2)) if cluster_memory else memory
    return {"model": model, "outputs": outputs_resources(cluster_resources, config.output_actors)}


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (e.g. `auto`, `ray://head:10001`; set for Ray Jobs), or
    start a private local one -- never silently join another local cluster. The local cluster
    runs with token auth disabled unless RAY_AUTH_MODE says otherwise (Ray 2.59+ requires a
    token by default), and keeps idle workers as `RAY_WORKER_ENV` says (unless set)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        keep_idle_workers()
    # Worker log records are redacted too (a Ray Job's own runtime_env carries the same hook).
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK} if address == "local" else None
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address == "local" else None,
             runtime_env=runtime_env)


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

    config = resolved.config
    ensure_ray()
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
        rows = source.total if isinstance(source, Listing) else len(source)
        stages = stage_options(resolved, resources["model"]["device"], rows)
        ds = redacted_rows(build_dataset(source, stages, resources, clock, skip), config.storage_options)
        written = write_run(ds, table, resolved.run_id, resolved.checkpoint.n_styles, row_bytes=estimated_row_bytes(
            resolved.checkpoint.n_styles, config.images, config.image_size, resolved.checkpoint.output_size,
            config.mix or 0), expected_rows=rows)
        timings, counts, meta = clock.collect(written.rows)
        operators = _operator_names(ds)
    finally:
        ray.kill(clock_actor)
    return Processed(written, timings, counts, operators, meta.get("checkpoint_sha256"),
                     resources["model"]["device"])


__all__ = ["Processed", "StageClock", "StageOptions", "StageTiming", "build_dataset", "ensure_ray", "pipeline_resources",
           "process_items", "stage_options"]
