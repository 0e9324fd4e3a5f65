"""`psp train`: pSp's training (`psp_core.training`) on a Ray cluster, with Ray Train.

    TrainConfig (every option declared once)  ->  check_train_config (fails fast, before Ray)
      -> list_training_items (driver: what to train on, the listing code of `pipelines.sources`)
      -> TorchTrainer(train_worker, N workers; Gloo on CPU, NCCL on GPU; RunConfig(RUN_DIR/ray,
         FailureConfig(max_failures)))
           each worker: PspTrainer + DDP + BatchNorm statistics and decoder noise made independent
           of the batch split (`pipelines.sync`), its own Ray Data stream of samples (`TrainSamples`)
      -> RUN_DIR: checkpoints/iteration_N.pt and best_model.pt (the official format `psp invert`
         and the original code load), metrics.jsonl / metrics.csv, images/{train,val}/N.png,
         config.json; Ray Train's checkpoints (resume.pt: model, optimizer, step) under ray/

Global batch = workers x --batch-size. Sample number g (0, 1, 2, ...) is the g-th sample of the
whole run: step s trains samples s*G .. s*G+G-1, worker k the k-th slice of b. Sample g is item
`perm_e[g mod N]` of the training list (perm_e: a seeded permutation per epoch e = g // N); its
random transform (flip, super-resolution factor: `psp_core.training.data.sample_rng(seed, g)`) and
its decoder noise are seeded by (seed, g). So a run's result depends on the seed and the global
batch only, not on how many workers share it (BatchNorm statistics cover the global batch), and a
run resumed from its checkpoint at step s trains exactly the samples of steps s+1.. that the
uninterrupted run would have.

Steps are counted as the original counts them: 0, 1, ..., max_steps (the original's loop trains
step 0 and stops after step max_steps); validation runs at steps that are multiples of
--val-interval and at the last step, checkpoints at multiples of --save-interval and at the last.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pipelines.items import KIND_CONTAINER, KIND_PARQUET, InputError, escape_name
from pipelines.options import ConfigError, check_options, option, shared
from pipelines.read import object_column, read_batch
from pipelines.sources import list_inputs
from psp_core.training.options import DATASETS, TrainOptions, get_dataset_config
from psp_core.training.weights import TrainingWeights
from psp_core.uris import filesystem_for

#: The original's option defaults (psp_core.training.options), shown by --help and used here.
_D = TrainOptions()
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("ranger", "adam")
ENCODER_TYPES = ("GradualStyleEncoder", "BackboneEncoderUsingLastLayerIntoW", "BackboneEncoderUsingLastLayerIntoWPlus")
#: Tries per sample: an input that cannot be read or decoded is replaced by the next item of the
#: epoch's order (deterministic), at most this many times.
SAMPLE_TRIES = 16
RAY_DIR = "ray"  # RUN_DIR/ray: Ray Train's storage (its checkpoints, the run snapshot resume reads)
AUTO_CHECKPOINT_STEPS = 1000  # --save-interval default when the original's (None: only the end) is too rare


def _check_resize_factors(text: str) -> None:
    factors = [int(f) for f in str(text).split(",")]
    if not factors or any(f < 1 for f in factors):
        raise ValueError("expected comma-separated positive integers such as 1,2,4,8,16,32")


def _check_uris(uris: Sequence[str]) -> None:
    for u in [uris] if isinstance(uris, str) else uris:
        if not isinstance(u, str) or not u:
            raise ValueError("expected a folder, file or URI (repeat the flag for more)")


@dataclass
class TrainConfig:
    """One `psp train` run. Hyperparameters keep the original's names and defaults
    (`psp_core.training.options.TrainOptions`); `train_options()` builds those options.

    data: what to train on: a psp output table (its aligned faces, written with --save-aligned),
        a folder / object prefix / image / `.tar` shard / `.parquet` file / `.txt` manifest, any
        fsspec URI; or a list of them.
    """

    data: str | list[str]
    run_dir: str = option(None, "the run folder (local or s3://...): checkpoints, metrics, image grids",
                          required=True, metavar="DIR")
    task: str = option(_D.dataset_type, "dataset_type: the per-task data transforms and input channels",
                       choices=tuple(DATASETS))
    target: list[str] | None = option(
        None, "paired tasks (sketch, segmentation): the target images, paired with DATA's sources in "
        "sorted order as the original pairs them (repeatable)", kind="append", check=_check_uris, metavar="URI")
    val_data: list[str] | None = option(
        None, "validation images (the original's test set; repeatable; default: the first "
        "--val-samples training items)", kind="append", check=_check_uris, metavar="URI")
    val_target: list[str] | None = option(None, "paired tasks: targets of --val-data (repeatable)",
                                          kind="append", check=_check_uris, metavar="URI")
    val_samples: int = option(64, "at most this many validation samples", parse=int, minimum=1, metavar="N")
    image_column: str | None = option(None, "Parquet inputs: the image-bytes column (default: autodetect)")
    # -- pretrained files (never downloaded) ----------------------------------------------------
    stylegan_weights: str | None = option(
        None, "StyleGAN2 generator (rosinality format: 'g_ema', 'latent_avg'); the decoder starts from "
        "it (not needed with --checkpoint)", metavar="FILE")
    alexnet_weights: str | None = option(None, "torchvision AlexNet state dict (LPIPS's features)", metavar="FILE")
    lpips_weights: str | None = option(None, "LPIPS v0.1 linear heads (richzhang's alex.pth)", metavar="FILE")
    ir_se50_weights: str | None = option(
        None, "IR-SE50 model_ir_se50.pth: the encoder's start and the ID loss", metavar="FILE")
    moco_weights: str | None = option(None, "MoCo v2 moco_v2_800ep_pretrain.pt (the MoCo loss)", metavar="FILE")
    checkpoint: str | None = option(None, "fine-tune this pSp checkpoint (the original's --checkpoint_path)",
                                    metavar="FILE")
    # -- the original's training options -----------------------------------------------------------
    encoder_type: str = option(_D.encoder_type, "encoder architecture", choices=ENCODER_TYPES)
    output_size: int = option(_D.output_size, "generator output size (a power of two)", parse=int, minimum=8)
    batch_size: int = option(_D.batch_size, "samples per worker per step (global batch = --workers x this)",
                             parse=int, minimum=1)
    test_batch_size: int = option(_D.test_batch_size, "validation samples per worker per batch", parse=int, minimum=1)
    learning_rate: float = option(_D.learning_rate, "optimizer learning rate", parse=float, minimum=0.0)
    optim: str = option(_D.optim_name, "optimizer: ranger (RAdam + Lookahead) or adam", choices=OPTIMIZERS)
    lpips_lambda: float = option(_D.lpips_lambda, "LPIPS loss weight", parse=float, minimum=0.0)
    id_lambda: float = option(_D.id_lambda, "ID (IR-SE50) loss weight", parse=float, minimum=0.0)
    l2_lambda: float = option(_D.l2_lambda, "L2 loss weight", parse=float, minimum=0.0)
    w_norm_lambda: float = option(_D.w_norm_lambda, "W-norm loss weight", parse=float, minimum=0.0)
    lpips_lambda_crop: float = option(_D.lpips_lambda_crop, "LPIPS on the inner face crop", parse=float, minimum=0.0)
    l2_lambda_crop: float = option(_D.l2_lambda_crop, "L2 on the inner face crop", parse=float, minimum=0.0)
    moco_lambda: float = option(_D.moco_lambda, "MoCo loss weight (non-face domains)", parse=float, minimum=0.0)
    start_from_latent_avg: bool = option(False, "add the average W to the encoder's codes", kind="flag")
    learn_in_w: bool = option(False, "learn one W instead of W+", kind="flag")
    train_decoder: bool = option(False, "also train the StyleGAN2 decoder", kind="flag")
    resize_factors: str | None = option(None, "super-resolution factors (default 1,2,4,8,16,32)",
                                        check=_check_resize_factors)
    max_steps: int = option(_D.max_steps, "last step (steps 0..N are trained, as the original)", parse=int,
                            minimum=0, metavar="N")
    board_interval: int = option(_D.board_interval, "log training losses every N steps", parse=int, minimum=1,
                                 metavar="N")
    image_interval: int = option(_D.image_interval, "write a train image grid every N steps", parse=int,
                                 minimum=1, metavar="N")
    val_interval: int = option(_D.val_interval, "validate every N steps", parse=int, minimum=1, metavar="N")
    save_interval: int | None = option(
        None, f"checkpoint every N steps (default {AUTO_CHECKPOINT_STEPS}; and always at the last step)",
        parse=int, minimum=1, metavar="N")
    seed: int = option(0, "seed of the data order, the random transforms and the decoder noise", parse=int)
    # -- the cluster -------------------------------------------------------------------------------
    workers: int = option(1, "Ray Train workers (data-parallel; one GPU each with --device cuda)",
                          parse=int, minimum=1, metavar="N")
    device: str = option("auto", "cuda: one GPU per worker (NCCL); cpu: Gloo; auto: cuda when the "
                         "cluster has GPUs", choices=DEVICES)
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker (its torch threads)", parse=float,
                                    minimum=0.0)
    data_cpus: float = option(0.5, "CPUs of each data reader actor (read, decode, PIL transforms)", parse=float,
                              minimum=0.0)
    data_actors: int = option(1, "data reader actors per worker (more when the readers cannot keep up)",
                              parse=int, minimum=1, metavar="N")
    max_failures: int = option(3, "restarts from the last checkpoint after a worker or node is lost",
                               parse=int, minimum=-1)
    resume: bool = option(False, "continue the run in --run-dir from its last checkpoint", kind="flag")
    storage_options: dict[str, Any] | None = shared("storage_options")

    def train_options(self) -> TrainOptions:
        """The original's options for this run (what the checkpoint's `opts` records)."""
        cfg = get_dataset_config(self.task)
        return TrainOptions(
            exp_dir=self.run_dir, dataset_type=self.task, encoder_type=self.encoder_type,
            input_nc=cfg.input_nc, label_nc=cfg.label_nc, output_size=self.output_size,
            batch_size=self.batch_size, test_batch_size=self.test_batch_size,
            learning_rate=self.learning_rate, optim_name=self.optim, train_decoder=self.train_decoder,
            start_from_latent_avg=self.start_from_latent_avg, learn_in_w=self.learn_in_w,
            lpips_lambda=self.lpips_lambda, id_lambda=self.id_lambda, l2_lambda=self.l2_lambda,
            w_norm_lambda=self.w_norm_lambda, lpips_lambda_crop=self.lpips_lambda_crop,
            l2_lambda_crop=self.l2_lambda_crop, moco_lambda=self.moco_lambda,
            stylegan_weights=self.stylegan_weights or _D.stylegan_weights, checkpoint_path=self.checkpoint,
            max_steps=self.max_steps, image_interval=self.image_interval, board_interval=self.board_interval,
            val_interval=self.val_interval, save_interval=self.checkpoint_every,
            resize_factors=self.resize_factors,
        )

    def training_weights(self) -> TrainingWeights:
        return TrainingWeights(
            stylegan=self.stylegan_weights, alexnet=self.alexnet_weights, lpips=self.lpips_weights,
            ir_se50=self.ir_se50_weights, moco=self.moco_weights, storage_options=dict(self.storage_options or {}),
        )

    @property
    def checkpoint_every(self) -> int:
        return self.save_interval or AUTO_CHECKPOINT_STEPS

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size


# -- what the weights flags are called, for the error that names the missing ones -----------------
_WEIGHT_FLAGS = {
    "checkpoint_path": "--checkpoint", "stylegan": "--stylegan-weights", "alexnet": "--alexnet-weights",
    "lpips": "--lpips-weights", "ir_se50": "--ir-se50-weights", "moco": "--moco-weights",
}


def check_train_config(config: TrainConfig) -> TrainOptions:
    """Fail fast, before Ray does any work: flag values, option combinations the original refuses,
    every missing pretrained file (one error naming each, with its flag), a run folder that already
    holds a run (without --resume) or none (with it). Returns the run's `TrainOptions`."""
    check_options(config)
    if not config.data:
        raise ConfigError("psp train needs DATA: an output table, a folder, shards or a Parquet file")
    dataset = get_dataset_config(config.task)
    if dataset.paired and not config.target:
        raise ConfigError(f"--task {config.task} trains on pairs: give the targets with --target URI "
                          "(paired with DATA's sources in sorted order)")
    if config.target and not dataset.paired:
        raise ConfigError(f"--target: --task {config.task} takes its target from the source image itself")
    if config.val_data and dataset.paired and not config.val_target:
        raise ConfigError(f"--val-data: --task {config.task} needs --val-target too")
    opts = config.train_options()
    try:
        opts.check()
    except ValueError as e:
        raise ConfigError(str(e).replace("id_lambda", "--id-lambda").replace("moco_lambda", "--moco-lambda")) from None
    weights = config.training_weights()
    missing = []
    for what, path in weights.required(opts).items():
        key = what.split(" ")[0]
        flag = _WEIGHT_FLAGS.get(key, key)
        if path is None or (key == "stylegan" and config.stylegan_weights is None):
            missing.append(f"{flag} ({what.split('(', 1)[1].rstrip(')')}): not given")
        elif not _file_exists(str(path), config.storage_options):
            missing.append(f"{flag} {path!r}: does not exist")
    if missing:
        raise FileNotFoundError(
            "pSp training needs these pretrained files (nothing is downloaded; give each as a path or "
            "fsspec URI):\n  " + "\n  ".join(dict.fromkeys(missing))
        )
    if config.checkpoint is not None and _file_exists(config.checkpoint, config.storage_options):
        _check_fine_tuning(config)
    has_run = _run_exists(config)
    if has_run and not config.resume:
        raise ConfigError(f"--run-dir {config.run_dir!r} already holds a training run: pass --resume to "
                          "continue it from its last checkpoint, or choose another --run-dir")
    if config.resume and not has_run:
        raise ConfigError(f"--resume: --run-dir {config.run_dir!r} holds no training run to continue")
    return opts


#: The options that define the model: a fine-tuned checkpoint's must be repeated on the command line.
_MODEL_FLAGS = {"encoder_type": "--encoder-type", "output_size": "--output-size",
                "start_from_latent_avg": "--start-from-latent-avg", "learn_in_w": "--learn-in-w"}


def _check_fine_tuning(config: TrainConfig) -> None:
    """--checkpoint: the model flags must describe the checkpoint's model (read from its opts only,
    not its weights); ConfigError naming the flags to pass."""
    from psp_core.checkpoint import CheckpointError, checkpoint_family, model_opts, read_checkpoint_header

    try:
        raw = read_checkpoint_header(config.checkpoint, config.storage_options).opts
        opts = model_opts(raw)
        family = checkpoint_family(raw)
    except (CheckpointError, KeyError, TypeError, ValueError, OSError, AttributeError) as e:
        raise ConfigError(f"--checkpoint {config.checkpoint!r} is not a readable pSp checkpoint ({e})") from None
    if family != "psp":
        raise ConfigError(f"--checkpoint {config.checkpoint!r} is a {family} checkpoint: psp train fine-tunes pSp ones")
    differ = {k: opts[k] for k in _MODEL_FLAGS if opts[k] != getattr(config, k)}
    if differ:
        flags = " ".join(f"{_MODEL_FLAGS[k]} {opts[k]}" if not isinstance(opts[k], bool) else
                         (_MODEL_FLAGS[k] if opts[k] else f"(no {_MODEL_FLAGS[k]})") for k in differ)
        raise ConfigError(f"--checkpoint {config.checkpoint!r} holds another model than the flags describe: "
                          f"pass {flags} to fine-tune it")


def _file_exists(uri: str, storage_options) -> bool:
    try:
        fs, path = filesystem_for(uri, storage_options)
        return fs.isfile(path)
    except Exception:  # noqa: BLE001 - a store that cannot answer: the error names the file
        return False


def _run_exists(config: TrainConfig) -> bool:
    fs, root = filesystem_for(config.run_dir, config.storage_options)
    return fs.exists(f"{root.rstrip('/')}/config.json")


# ------------------------------------------------------------------------------------------------
# What to train on (driver)


ITEM_COLUMNS = ("uri", "kind", "column", "offset", "size", "source_uri")


def _table_items(uri: str, storage_options) -> list[dict]:
    """The ok rows of a psp output table as Parquet-row items of its `aligned_image` column."""
    from pipelines.table import OutputTable

    table = OutputTable(uri, storage_options)
    dt = table.load()
    state = table.state(dt, columns=("image_id", "source_uri", "status"))
    root = uri.rstrip("/") if "://" in uri else "file://" + os.path.abspath(uri)
    items = []
    rows: dict[str, int] = {}
    for source, status, path in zip(state["source_uri"].to_pylist(), state["status"].to_pylist(),
                                    state["_file"].to_pylist()):
        row = rows.get(path, 0)
        rows[path] = row + 1
        if status == "ok":
            items.append({"uri": f"{escape_name(root + '/' + path)}#row={row}", "kind": KIND_PARQUET,
                          "column": "aligned_image", "offset": -1, "size": -1, "source_uri": source})
    if not items:
        raise InputError(f"output table {uri!r} has no ok rows to train on")
    first = table.read_file(state["_file"][0].as_py(), columns=["aligned_image"]).column(0)
    if first.null_count == len(first):
        raise InputError(f"output table {uri!r} holds no aligned faces: write it with psp invert --save-aligned "
                         "(or train from the input images)")
    return items


def list_training_items(uris: str | Sequence[str], storage_options=None, image_column: str | None = None) -> list[dict]:
    """The training inputs under `uris`, in a fixed order (each location's listing order): dicts
    with `ITEM_COLUMNS` (what `pipelines.read.read_batch` reads). A psp output table gives its
    ok rows' aligned faces; anything else is listed by `pipelines.sources.list_inputs`."""
    from schemas.table import table_exists

    items: list[dict] = []
    for uri in [uris] if isinstance(uris, str) else list(uris):
        if table_exists(uri, storage_options):
            items.extend(_table_items(uri, storage_options))
            continue
        for item in list_inputs(uri, storage_options, image_column):
            if item.kind != KIND_CONTAINER:
                items.append(item.to_row())
    if not items:
        raise InputError(f"no training images under {uris!r}")
    return items


def _pair(sources: list[dict], targets: list[dict], what: str) -> list[dict]:
    if len(sources) != len(targets):
        raise InputError(f"{what}: {len(sources)} sources but {len(targets)} targets: the original pairs them "
                         "by sorted position, so both lists must have the same length")
    return [{**s, **{f"target_{k}": t[k] for k in ITEM_COLUMNS}} for s, t in zip(sources, targets)]


def training_lists(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) of a run; paired tasks carry target_* columns."""
    so, col = config.storage_options, config.image_column
    train = list_training_items(config.data, so, col)
    if config.target:
        train = _pair(train, list_training_items(config.target, so, col), "--target")
    if config.val_data:
        val = list_training_items(config.val_data, so, col)
        if config.val_target:
            val = _pair(val, list_training_items(config.val_target, so, col), "--val-target")
    else:
        val = train
    return train, val[: config.val_samples]


# ------------------------------------------------------------------------------------------------
# Samples: which item sample g is, and its tensors


def epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The item order of one epoch: a permutation of range(n_items) from numpy's PCG64."""
    return np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, int(epoch), 0x7053])).permutation(n_items)


def step_samples(step: int, rank: int, world: int, batch: int) -> list[int]:
    """The global sample numbers worker `rank` trains at `step`."""
    start = step * world * batch + rank * batch
    return list(range(start, start + batch))


class TrainSamples:
    """Batch dict stage: sample numbers -> the prepared (uint8) source and target of each sample.

    In: `sample` (int64 global sample numbers). Out: `sample`, `target` uint8 [B, 256, 256, 3],
    `source` uint8 [B, 256, 256(, 3)] (not for encode tasks, whose source is the target),
    `source_uri`, `replaced` (how many unreadable items were skipped for it). The PIL part of the
    task's transforms (`psp_core.training.data.TrainTransforms.prepare_*`) with sample g's own
    random draw (`sample_rng(seed, g)`); the tensor part runs on the worker's device. Reading and
    decoding reuse `pipelines.read.read_batch` and `pipelines.decode.DecodeImages`; an item that
    cannot be read, decoded or transformed is replaced by the next one of the epoch's order, so a
    bad input never stops training and the batch keeps its size.
    """

    def __init__(self, items: Any, opts: Mapping[str, Any], seed: int, train: bool = True,
                 storage_options: Mapping[str, Any] | None = None):
        import pyarrow as pa

        from psp_core.training.data import TrainTransforms

        if isinstance(items, list) and len(items) == 1 and type(items[0]).__name__ == "ObjectRef":
            import ray

            items = ray.get(items[0])  # an ObjectRef in a list (Ray Data does not resolve it)
        self.items = items if isinstance(items, pa.Table) else pa.Table.from_pylist(list(items))
        opts = TrainOptions.from_dict(opts, strict=False) if isinstance(opts, Mapping) else opts
        self.transforms = TrainTransforms(opts, train=train)
        self.seed = int(seed)
        self.train = train
        self.storage_options = dict(storage_options or {})
        self.paired = "target_uri" in self.items.column_names
        self._orders: dict[int, np.ndarray] = {}

    def _item(self, sample: int, shift: int) -> int:
        n = self.items.num_rows
        if not self.train:  # validation: the listed order
            return (sample + shift) % n
        epoch, pos = divmod(sample, n)
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_order(n, self.seed, epoch)
            self._orders = {epoch: order}
        return int(order[(pos + shift) % n])

    def _images(self, rows: list[int], prefix: str) -> tuple[list, list]:
        from pipelines.decode import DecodeImages

        cols = {c: self.items.column(prefix + c).take(rows).to_pylist() for c in ITEM_COLUMNS}
        batch = {c: np.asarray(v, dtype=object if c not in ("offset", "size") else np.int64) for c, v in cols.items()}
        decoded = DecodeImages()(read_batch(batch, self.storage_options))
        return list(decoded["image"]), list(decoded["error"])

    def _prepare(self, sample: int, source, target) -> tuple[np.ndarray | None, np.ndarray]:
        from psp_core.training.data import sample_rng

        t = self.transforms
        draw = t.draw(sample_rng(self.seed, sample))
        tgt = t.prepare_target(target, draw)
        src = t.prepare_source(None if t.source_is_target else source, draw)
        return src, tgt

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = [int(s) for s in batch["sample"]]
        prepared: list = [None] * len(samples)
        shifts = [0] * len(samples)
        pending = list(range(len(samples)))
        errors: list[str] = []
        while pending:
            rows = [self._item(samples[i], shifts[i]) for i in pending]
            src, err = self._images(rows, "")
            tgt, terr = self._images(rows, "target_") if self.paired else (src, err)
            again = []
            for i, s, t, e1, e2 in zip(pending, src, tgt, err, terr):
                problem = e1 or e2 or "not decoded"
                if s is not None and t is not None:
                    try:
                        prepared[i] = self._prepare(samples[i], s, t)
                        continue
                    except ValueError as e:  # e.g. a segmentation map with labels >= label_nc
                        problem = f"{self.items.column('source_uri')[rows[pending.index(i)]].as_py()}: {e}"
                errors.append(problem)
                shifts[i] += 1
                if shifts[i] >= min(SAMPLE_TRIES, self.items.num_rows):
                    raise RuntimeError(f"{shifts[i]} training inputs in a row could not be used: "
                                       f"{'; '.join(errors[-3:])}")
                again.append(i)
            pending = again
        uris = [self.items.column("source_uri")[self._item(g, k)].as_py() for g, k in zip(samples, shifts)]
        out = {
            "sample": np.asarray(samples, dtype=np.int64),
            "target": np.stack([p[1] for p in prepared]),
            "source_uri": object_column(uris),
            "replaced": np.asarray(shifts, dtype=np.int32),
        }
        if not self.transforms.source_is_target:
            out["source"] = np.stack([p[0] for p in prepared])
        return out

    def tensors(self, batch: Mapping[str, np.ndarray], device) -> tuple[Any, Any]:
        """(x, y) float tensors on `device` of a batch this stage made (the transforms' tensor part)."""
        import torch

        target = torch.from_numpy(np.ascontiguousarray(batch["target"])).to(device)
        source = batch.get("source")
        source = None if source is None else torch.from_numpy(np.ascontiguousarray(source)).to(device)
        return self.transforms.to_tensors(source, target)


def sample_stream(items_ref: Any, opts: Mapping[str, Any], seed: int, rank: int, world: int, batch: int,
                  first_step: int, last_step: int, data_cpus: float, storage_options=None, actors: int = 1):
    """This worker's samples for steps first_step..last_step, in step order, as a Ray Data stream
    (a batch of `batch` rows per step). Built inside the worker, from the step a restored
    checkpoint says, so nothing before it is read again."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    steps = last_step - first_step + 1
    n = steps * batch
    ds = ray.data.range(n, override_num_blocks=max(1, math.ceil(n / max(256, batch))))

    def to_samples(b: dict) -> dict:
        r = np.asarray(b["id"], dtype=np.int64)
        step = first_step + r // batch
        return {"sample": step * world * batch + rank * batch + r % batch}

    ds = ds.map_batches(to_samples, batch_format="numpy", num_cpus=0.05)
    ds = ds.map_batches(
        TrainSamples, fn_constructor_kwargs={"items": [items_ref], "opts": dict(opts), "seed": seed,
                                             "storage_options": storage_options},
        batch_size=batch, batch_format="numpy", num_cpus=data_cpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    return ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2, drop_last=False)


# ------------------------------------------------------------------------------------------------
# The run folder


class RunFolder:
    """RUN_DIR (any fsspec location): checkpoints/, metrics.jsonl + metrics.csv, images/, config.json.

    Written by worker 0 only. Metrics are kept in memory and rewritten whole (object stores cannot
    append); after a restart the records after the restored step are dropped, so each step has
    one line.
    """

    def __init__(self, uri: str, storage_options=None):
        self.fs, root = filesystem_for(uri, storage_options)
        self.root = root.rstrip("/")
        self.records: list[dict] = []

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        full = self.path(rel)
        self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{full}.tmp-{os.getpid()}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, full)

    def read_records(self, upto_step: int) -> None:
        try:
            text = self.fs.cat_file(self.path("metrics.jsonl")).decode()
        except FileNotFoundError:
            text = ""
        self.records = [r for r in map(json.loads, filter(None, text.splitlines())) if r["step"] <= upto_step]

    def log(self, record: dict) -> None:
        self.records.append(record)
        self.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.records)
        self.write_bytes("metrics.csv", buf.getvalue().encode())

    def save_checkpoint(self, rel: str, ckpt: Mapping[str, Any]) -> str:
        import torch

        buf = io.BytesIO()
        torch.save(dict(ckpt), buf)
        self.write_bytes(rel, buf.getvalue())
        return self.fs.unstrip_protocol(self.path(rel))

    def save_grid(self, rel: str, source, target, output, opts: TrainOptions) -> None:
        """A PNG grid, one row per sample: source | target | output (256x256 each)."""
        from PIL import Image

        rows = []
        for x, y, o in zip(source, target, output):
            tiles = [_source_image(x), _to_uint8(y), _to_uint8(o)]
            rows.append(np.concatenate([np.asarray(Image.fromarray(t).convert("RGB").resize((256, 256))) for t in tiles], axis=1))
        buf = io.BytesIO()
        Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG", compress_level=1)
        self.write_bytes(rel, buf.getvalue())


def _source_image(x) -> np.ndarray:
    """A source tensor as a picture: RGB in [-1, 1], a sketch in [0, 1], or a one-hot label map."""
    from psp_core.tasks import tensor2map, tensor2sketch

    if x.shape[0] == 3:
        return _to_uint8(x)
    return tensor2sketch(x) if x.shape[0] == 1 else tensor2map(x)


def _to_uint8(t) -> np.ndarray:
    """[-1, 1] float CHW -> uint8 HWC (the original's tensor2im)."""
    from psp_core.tasks import tensor2im

    return tensor2im(t)


# ------------------------------------------------------------------------------------------------
# The worker


def _mean_over_workers(values: Mapping[str, float], weight: float, world: int, device) -> dict[str, float]:
    """Weighted mean of each value over the workers (all must pass the same keys; NCCL needs the
    tensor on the worker's GPU)."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    if world == 1 or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}


def _prefetch(iterator, depth: int = 2):
    """Iterate `iterator` in a background thread, `depth` items ahead (exceptions re-raised here)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def pull() -> None:
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    threading.Thread(target=pull, daemon=True, name="psp-train-data").start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _should_image(step: int, interval: int) -> bool:
    return step % interval == 0 or (step < 1000 and step % 25 == 0)  # the original's rule


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: restore, then train steps until max_steps (the Ray Train loop)."""
    import ray.train
    import torch

    from pipelines.sync import PerSampleNoise, synchronize_batchnorm
    from psp_core.training.trainer import PspTrainer

    config: TrainConfig = loop_config["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = loop_config["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, int(round(config.cpus_per_worker))))
    opts = config.train_options()
    state = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            state = torch.load(os.path.join(folder, "resume.pt"), map_location=device, weights_only=True)
    first = 0 if state is None else int(state["step"]) + 1
    # The data stream starts (actor, first reads) while the model is built.
    stream = _prefetch(sample_stream(loop_config["items"], opts.to_opts_dict(), config.seed, rank, world,
                                     config.batch_size, first, config.max_steps, config.data_cpus,
                                     config.storage_options, config.data_actors))
    trainer = PspTrainer(opts, config.training_weights(), device=device, seed=config.seed)
    noise = PerSampleNoise(trainer.net.decoder, config.seed)
    if state is not None:
        trainer.load_state_dict(state["trainer"])
    if world > 1:
        synchronize_batchnorm(trainer.net, device)
        trainer.forward_module = torch.nn.parallel.DistributedDataParallel(
            trainer.net, device_ids=[device.index] if device.type == "cuda" else None)
    best = None if state is None else state.get("best_val")
    run = RunFolder(config.run_dir, config.storage_options) if rank == 0 else None
    if run is not None:
        run.read_records(first - 1)
        if state is not None:  # a restart is visible where the losses are
            run.log({"step": first - 1, "split": "resume", "restored_step": first - 1})

    samples = TrainSamples([], opts.to_opts_dict(), config.seed)  # its tensor part, on this device
    val_items = loop_config["val_items"]
    val_stage = TrainSamples(val_items, opts.to_opts_dict(), config.seed, train=False,
                             storage_options=config.storage_options)
    val_mine = list(range(rank, val_stage.items.num_rows, world))

    tick = time.perf_counter()
    for step, batch in zip(range(first, config.max_steps + 1), stream):
        expected = step_samples(step, rank, world, config.batch_size)
        if batch["sample"].tolist() != expected:  # the stream's order is the contract of resume and equivalence
            raise RuntimeError(f"worker {rank} got samples {batch['sample'].tolist()} at step {step}, expected {expected}")
        x, y = samples.tensors(batch, device)
        noise.set_samples(expected)
        losses = trainer.train_step(x, y)
        noise.set_samples(None)
        last = step == config.max_steps
        if step % config.board_interval == 0 or last:
            elapsed = time.perf_counter() - tick
            record = {"step": step, "split": "train", **_mean_over_workers(losses, len(expected), world, device)}
            record["samples_per_s"] = config.batch_size * world * (step - first + 1) / max(elapsed, 1e-9)
            record["time_s"] = elapsed  # since this worker group started (bench/train.py times steps with it)
            if run is not None:
                run.log(record)
        if run is not None and _should_image(step, config.image_interval):
            run.save_grid(f"images/train/{step:06d}.png", x[:4].cpu(), y[:4].cpu(), trainer.last_y_hat[:4].cpu(), opts)
        if step % config.val_interval == 0 or last:
            val = _validate(trainer, val_stage, val_mine, config, run, step, opts, world)
            if run is not None and val:
                run.log({"step": step, "split": "val", **val})
            if val and (best is None or val["loss"] < best):
                best = val["loss"]
                if run is not None:
                    run.save_checkpoint("checkpoints/best_model.pt", trainer.checkpoint_dict())
        if step % config.checkpoint_every == 0 or last:
            _report_checkpoint(trainer, run, step, best, losses)


def _validate(trainer, stage: TrainSamples, mine: list[int], config: TrainConfig, run: RunFolder | None,
              step: int, opts: TrainOptions, world: int) -> dict[str, float]:
    """Mean validation losses over every worker's share of the validation samples."""
    import torch

    weight = len(mine)
    mine = mine or [0]  # a worker without a share still takes part in the mean, with weight 0
    if not hasattr(stage, "_cache"):
        stage._cache = [stage({"sample": np.asarray(mine[i:i + config.test_batch_size])})
                        for i in range(0, len(mine), config.test_batch_size)]
    batches = [stage.tensors(b, trainer.device) for b in stage._cache]
    # eval mode, no collectives: the bare net (DDP's forward would wait for the other workers)
    forward, trainer.forward_module = trainer.forward_module, trainer.net
    try:
        losses = trainer.validate(batches)
        if run is not None and batches:
            with torch.no_grad():
                trainer.net.eval()
                y_hat = trainer.net(batches[0][0][:4].float().to(trainer.device))
                trainer.net.train()
            run.save_grid(f"images/val/{step:06d}.png", batches[0][0][:4].cpu(), batches[0][1][:4].cpu(), y_hat.cpu(), opts)
    finally:
        trainer.forward_module = forward
    return _mean_over_workers(losses, weight, world, trainer.device)


def _report_checkpoint(trainer, run: RunFolder | None, step: int, best, losses: Mapping[str, float]) -> None:
    """Checkpoint at `step`: the official file in RUN_DIR/checkpoints/, and Ray Train's checkpoint
    (resume.pt: model, optimizer, step) that a restarted worker group restores."""
    import ray.train
    import torch

    metrics = {"step": step, **{k: float(v) for k, v in losses.items()}}
    if run is None:
        ray.train.report(metrics, checkpoint=None)
        return
    official = trainer.checkpoint_dict()
    run.save_checkpoint(f"checkpoints/iteration_{step}.pt", official)
    with tempfile.TemporaryDirectory(prefix="psp-train-") as folder:
        torch.save({"trainer": trainer.state_dict(), "step": step, "best_val": best}, os.path.join(folder, "resume.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# ------------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainResult:
    """What a run left: its folder, the last step's official checkpoint, the last metrics."""

    run_dir: str
    checkpoint: str
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    items: int = 0

    def format(self) -> str:
        losses = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if k.startswith("loss"))
        return (f"trained to step {self.steps} on {self.items} inputs; checkpoint {self.checkpoint}"
                + (f" ({losses})" if losses else "") + f"; metrics and image grids in {self.run_dir}")


def _use_gpu(config: TrainConfig) -> bool:
    import ray

    if config.device == "cuda":
        return True
    if config.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


def _storage(config: TrainConfig):
    """(storage_path, storage_filesystem) of Ray Train: RUN_DIR/ray."""
    fs, root = filesystem_for(config.run_dir, config.storage_options)
    if "://" not in config.run_dir or config.run_dir.startswith("file://"):
        return os.path.join(os.path.abspath(root), RAY_DIR), None
    import pyarrow.fs as pafs

    return f"{root.rstrip('/')}/{RAY_DIR}", pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def run_train(config: TrainConfig) -> TrainResult:
    """Train as `config` says on the Ray cluster (RAY_ADDRESS, or a private local one)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.dataflow import ensure_ray

    check_train_config(config)
    train_items, val_items = training_lists(config)
    run = RunFolder(config.run_dir, config.storage_options)
    if not config.resume:
        run.write_bytes("config.json", json.dumps(_config_record(config), indent=1).encode())
    ensure_ray()
    use_gpu = _use_gpu(config)
    import pyarrow as pa

    items_ref = ray.put(pa.Table.from_pylist(train_items))
    storage_path, storage_fs = _storage(config)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "items": items_ref, "val_items": val_items, "use_gpu": use_gpu},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name="train", storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    step = int(metrics.get("step", config.max_steps))
    return TrainResult(run_dir=config.run_dir, checkpoint=run.fs.unstrip_protocol(run.path(f"checkpoints/iteration_{step}.pt")),
                       steps=step, metrics=metrics, items=len(train_items))


def _config_record(config: TrainConfig) -> dict:
    record = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "storage_options"}
    record["global_batch"] = config.global_batch
    record["opts"] = config.train_options().to_opts_dict()
    return record


__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainSamples",
    "RunFolder",
    "check_train_config",
    "list_training_items",
    "training_lists",
    "epoch_order",
    "step_samples",
    "sample_stream",
    "train_worker",
    "run_train",
]
