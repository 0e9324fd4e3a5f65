"""Bulk latent editing: W+ of an output table x strengths -> edited W+ and images, one row each.

The trip, each stage a plain callable on a batch dict (testable without Ray):

    read_outputs (status ok) -> expand_strengths -> EditLatents (decoder-only model pool: edit,
    decode, uint8 on the device) -> EncodeEditImages (CPU: PNG/JPEG, edits-schema table)
    -> write_edits

`run_edit(config)` is a run as `pipelines.run` describes it, with its own plan and table: check
(fail fast) -> plan (`latent_plan`: the ok latents of TABLE, file by file) -> process (the stages
above on Ray Data) -> write + commit (`write_edits`: Ray's Delta sink appends and commits once) ->
summary (`pipelines.run.record_summary`, as every run). `fit_direction_from_labels` backs
`psp direction`.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.options import ConfigError, check_options, option, shared
from psp_core.uris import open_uri
from schemas.outputs import IMAGE_FORMATS

DEFAULT_GPU_BATCH = 32
DEFAULT_CPU_BATCH = 8


def parse_strengths(text: str | Sequence[float]) -> list[float]:
    """`"-3,0,3"` (or a list) -> [-3.0, 0.0, 3.0]; ConfigError naming --strengths when unusable."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip() != ""]
    except ValueError:
        raise ConfigError(f"--strengths {text!r}: expected comma-separated numbers, e.g. -3,0,3") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--strengths {text!r}: expected at least one finite number, e.g. -3,0,3")
    if len(set(np.float32(values).tolist())) != len(values):
        raise ConfigError(f"--strengths {text!r}: repeated value (each strength gives one row per input)")
    return values


def parse_ganspace_edit(text: str | Sequence[int] | None) -> tuple[int, int, int | None] | None:
    """`"54,7,8"` -> (54, 7, 8): GANSpace component, first style, end style (exclusive)."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ConfigError(
            f"--ganspace-edit {text!r}: expected COMPONENT,START[,END] (END exclusive, as in e4e's "
            "tuples), e.g. 54,7,8"
        ) from None
    return (values[0], values[1], values[2] if len(values) == 3 else None)


# ----------------------------------------------------------------------------------------------
# Stages


def _w_plus_batch(values: Any, n_styles: int) -> np.ndarray:
    """A batch's w_plus column in any form Ray hands over -> float32 [B, n_styles, 512]."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        arr = values
    else:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in values]) if len(values) else np.zeros((0, n_styles, 512))
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(len(arr), n_styles, 512)


def expand_strengths(batch: Mapping[str, Any], strengths: Sequence[float], n_styles: int) -> dict[str, np.ndarray]:
    """Rows (image_id, source_uri, w_plus) -> one row per (row, strength), strengths innermost,
    with a float32 `strength` column."""
    w = _w_plus_batch(batch["w_plus"], n_styles)
    s = np.asarray(strengths, dtype=np.float32)
    k = len(s)
    return {
        "image_id": np.repeat(np.asarray(batch["image_id"], dtype=object), k),
        "source_uri": np.repeat(np.asarray(batch["source_uri"], dtype=object), k),
        "w_plus": np.repeat(w, k, axis=0),
        "strength": np.tile(s, len(w)),
    }


class EditLatents:
    """Batch dict stage on the model pool: (w_plus, strength) rows -> edited W+ and uint8 images.

    In: image_id, source_uri, w_plus [B, n_styles, 512], strength [B].
    Out: those plus w_plus (edited), image uint8 [B, H, W, 3], status, error, direction,
    direction_kind, direction_sha256, generator_sha256. A row whose decode fails gets
    status 'edit_error' (the batch is retried row by row to isolate it) and a zero image.
    """

    def __init__(
        self,
        generator: str,
        direction: Any,
        device: str = "auto",
        storage_options: Mapping[str, Any] | None = None,
        image_size: str = "256",
        cpu_threads: int | None = None,
    ):
        import torch

        from psp_core.editing import load_decoder

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(cpu_threads or max(1, os.cpu_count() or 1))
        else:  # fp32 stays fp32 (TF32 would move images past the 1e-4 fidelity promise)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.device = device
        self.decoder = load_decoder(generator, device=device, storage_options=storage_options)
        self.direction = direction
        self.resize = str(image_size) != "full"
        direction.check(self.decoder.n_styles)

    def _decode(self, w):
        import torch

        from psp_core.tasks import images_to_uint8

        with torch.inference_mode():
            return images_to_uint8(self.decoder(w.to(self.decoder.device), resize=self.resize)).cpu().numpy()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        from psp_core.editing import edit

        n_styles = self.decoder.n_styles
        w = torch.from_numpy(_w_plus_batch(batch["w_plus"], n_styles))
        strength = np.asarray(batch["strength"], dtype=np.float32)
        n = len(w)
        edited = edit(w.to(self.decoder.device), self.direction, torch.from_numpy(strength))
        size = 256 if self.resize else self.decoder.output_size
        images = np.zeros((n, size, size, 3), np.uint8)
        status = np.array(["ok"] * n, dtype=object)
        error = np.array([None] * n, dtype=object)
        try:
            images[:] = self._decode(edited)
        except Exception:
            for i in range(n):  # isolate the failing row(s)
                try:
                    images[i] = self._decode(edited[i:i + 1])[0]
                except Exception as e:
                    status[i] = "edit_error"
                    error[i] = f"{batch['source_uri'][i]}: decoding the edited latent failed ({type(e).__name__}: {e})"
        d = self.direction
        return {
            "image_id": np.asarray(batch["image_id"], dtype=object),
            "source_uri": np.asarray(batch["source_uri"], dtype=object),
            "strength": strength,
            "w_plus": edited.float().cpu().numpy(),
            "image": images,
            "status": status,
            "error": error,
            "direction": np.array([d.name] * n, dtype=object),
            "direction_kind": np.array([d.kind] * n, dtype=object),
            "direction_sha256": np.array([d.sha256] * n, dtype=object),
            "generator_sha256": np.array([self.decoder.checkpoint_sha256] * n, dtype=object),
        }


class EncodeEditImages:
    """Batch dict stage on CPU: EditLatents' output -> an edits-schema pyarrow table (images
    encoded as PNG/JPEG, or dropped with 'none')."""

    def __init__(self, run_id: str, n_styles: int, image_format: str = "png", code_version: str | None = None):
        from pipelines.config import code_version as _code_version

        if image_format not in IMAGE_FORMATS:
            raise ConfigError(f"--images {image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}")
        self.run_id = run_id
        self.n_styles = int(n_styles)
        self.image_format = image_format
        self.code_version = code_version or _code_version()

    def __call__(self, batch: Mapping[str, Any]):
        from pipelines.outputs import encode_image
        from schemas.edits import edit_columns_to_table

        n = len(batch["image_id"])
        status = [str(s) for s in batch["status"]]
        ok = [s == "ok" for s in status]
        fmt = self.image_format
        images = [encode_image(np.asarray(batch["image"][i]), fmt) if ok[i] else None for i in range(n)]
        columns = {
            "image_id": [str(v) for v in batch["image_id"]],
            "source_uri": [str(v) for v in batch["source_uri"]],
            "direction": [str(v) for v in batch["direction"]],
            "direction_kind": list(batch["direction_kind"]),
            "direction_sha256": list(batch["direction_sha256"]),
            "strength": np.asarray(batch["strength"], dtype=np.float32),
            "status": status,
            "error": [None if ok[i] else str(batch["error"][i]) for i in range(n)],
            "w_plus": _w_plus_batch(batch["w_plus"], self.n_styles),
            "image": images,
            "image_format": [fmt if ok[i] else None for i in range(n)],
            "generator_sha256": list(batch["generator_sha256"]),
            "code_version": [self.code_version] * n,
            "run_id": [self.run_id] * n,
        }
        return edit_columns_to_table(columns, self.n_styles)


# ----------------------------------------------------------------------------------------------
# Writing


def write_edits(ds, output_uri: str, run_id: str, n_styles: int, storage_options: Mapping[str, Any] | None = None) -> None:
    """Append a Ray Dataset of edits-schema tables to the Delta table at `output_uri` (created by
    the first run): Ray's write tasks write the Parquet files and the driver commits once; a failed
    block fails the write (`max_errored_blocks = 0`). `run_id` is on every row."""
    from ray.data import DataContext

    from schemas.table import delta_storage_options, table_uri

    DataContext.get_current().max_errored_blocks = 0
    ds.write_delta(table_uri(output_uri), mode="append",
                   storage_options=delta_storage_options(output_uri, storage_options))


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class EditConfig:
    """`psp edit TABLE OUTPUT`: every option declared once, here (the CLI is generated from it)."""

    table: str
    output: str
    generator: str = option(None, "pSp checkpoint (its decoder is used) or rosinality StyleGAN2 file (g_ema)",
                            required=True, scope="edit")
    direction: str = option(None, "direction file (.pt, .npy, .npz), path or fsspec URI", required=True,
                            scope="edit")
    strengths: Sequence[float] | str = option(
        "-3,0,3", "comma-separated strengths, one row each (default -3,0,3)", check=parse_strengths, scope="edit")
    ganspace_edit: Any = option(
        None, "GANSpace PCA files: component and styles START..END-1 (END exclusive, e4e's tuples without the "
        "strength), e.g. 54,7,8", check=parse_ganspace_edit, metavar="C,START,END", scope="edit")
    direction_name: str | None = option(None, "direction name recorded on rows (default: file name)",
                                        flag="--name", scope="edit")
    device: str = shared("device", scope="edit")
    batch_size: int | None = shared("batch_size", help="rows per decode batch (default 32 GPU / 8 CPU)",
                                    scope="edit")
    gpus: int | None = shared("gpus", scope="edit")
    images: str = shared("images", scope="edit")
    image_size: str = shared("image_size", scope="edit")
    limit: int | None = shared("limit", help="edit at most the first N ok latents", scope="edit")
    storage_options: Mapping[str, Any] | None = shared("storage_options", scope="edit")
    run_id: str | None = shared("run_id", scope="edit")
    cpu_threads: int | None = shared("cpu_threads", scope="edit")


@dataclass
class DirectionConfig:
    """`psp direction TABLE`: fit a direction on W+ against a boolean label."""

    table: str
    labels: str = option(None, "Parquet or CSV with image_id (or source_uri) and the label column",
                         required=True, scope="direction")
    label: str = option("label", "the boolean column (default: label)", metavar="COLUMN", scope="direction")
    output: str = option(None, "where to write the direction (.npy)", short="-o", required=True,
                         scope="direction")
    method: str = option("logistic", "logistic regression or the difference of the class means",
                         choices=("logistic", "mean_difference"), scope="direction")
    storage_options: Mapping[str, Any] | None = shared("storage_options", scope="direction")
    shared: bool = option(False, "one [512] offset for every style (fit on the mean over styles); default "
                          "[n_styles, 512]", kind="flag", scope="direction")


@dataclass
class EditSummary:
    """What a `psp edit` run wrote: `inputs` latents x `strengths` -> `rows` (`counts` per status)."""

    run_id: str
    table: str
    output: str
    direction: str
    direction_kind: str
    strengths: list[float]
    inputs: int
    rows: int
    counts: dict[str, int] = field(default_factory=dict)
    device: str = ""
    wall_s: float = 0.0

    def format(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        return (
            f"edit run {self.run_id}: {self.inputs} latents x {len(self.strengths)} strengths "
            f"({', '.join(f'{s:g}' for s in self.strengths)}) of {self.direction} ({self.direction_kind}) "
            f"-> {self.rows} rows in {self.output} [{counts}] on {self.device}, {self.wall_s:.1f}s"
        )


LATENT_COLUMNS = ["image_id", "source_uri", "w_plus"]


def _latent_files(uri: str, storage_options: Mapping[str, Any] | None):
    """The output table's data files and its n_styles; ConfigError naming TABLE when there is none."""
    from pipelines.scan import table_files
    from schemas.outputs import schema_n_styles

    try:
        files = table_files(uri, storage_options)
    except FileNotFoundError as e:
        raise ConfigError(f"TABLE {uri!r}: {e}") from None
    return files, schema_n_styles(files.schema)


def _ok():
    import pyarrow.compute as pc

    return pc.field("status") == "ok"


def latent_plan(files, limit: int | None) -> list[dict]:
    """[{path, limit}] of the files holding the table's ok rows, in file order, up to `limit` rows
    in all (the first `limit` ok latents; -1: all of a file), from a scan of the status column."""
    from pipelines.scan import RowsPerFile, scan_table

    per_file = scan_table(files, ["status"], RowsPerFile, filter=_ok()).rows
    plan, left = [], limit
    for path in files.paths:
        n = per_file.get(path, 0)
        if not n or left == 0:
            continue
        plan.append({"path": path, "limit": -1 if left is None or left >= n else left})
        left = None if left is None else left - min(n, left)
    return plan


def run_edit(config: EditConfig) -> EditSummary:
    """Run `psp edit`: every ok row of `config.table` x every strength -> one edits row under
    `config.output`. Misconfiguration (direction file, generator, styles, strengths) raises
    ConfigError before any Ray work."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.dataflow import ensure_ray
    from pipelines.model import invert_resources
    from psp_core.checkpoint import CheckpointError
    from psp_core.editing import DirectionError, load_decoder, load_direction
    from schemas.edits import read_edits
    from schemas.ids import make_run_id

    t0 = time.perf_counter()
    strengths = parse_strengths(config.strengths)
    check_options(config)  # what the CLI would have refused, for library callers
    run_id = config.run_id or make_run_id()
    try:
        direction = load_direction(config.direction, parse_ganspace_edit(config.ganspace_edit),
                                   name=config.direction_name, storage_options=config.storage_options)
    except (DirectionError, FileNotFoundError) as e:
        raise ConfigError(f"--direction: {e}") from None
    files, n_styles = _latent_files(config.table, config.storage_options)
    try:
        # On the meta device: shapes only, to fail here rather than in every actor.
        meta = load_decoder(config.generator, device="meta", storage_options=config.storage_options)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"--generator: {e}") from None
    if meta.n_styles != n_styles:
        raise ConfigError(
            f"--generator {config.generator!r} has {meta.n_styles} styles ({meta.output_size}px) but the latents "
            f"in {config.table!r} have {n_styles}: use the generator of the model that made them"
        )
    try:
        direction.check(n_styles)
    except DirectionError as e:
        raise ConfigError(f"--direction: {e}") from None

    plan = latent_plan(files, config.limit)  # after every check: a scan may start Ray tasks
    n_inputs = 0
    counts: dict[str, int] = {}
    device = config.device
    if plan:
        ensure_ray()
        try:
            resources = invert_resources(ray.cluster_resources(), config.device, config.gpus)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        device = resources["device"]
        on_gpu = device == "cuda"
        batch_size = config.batch_size or (DEFAULT_GPU_BATCH if on_gpu else DEFAULT_CPU_BATCH)
        from pipelines.scan import read_files

        # The driver holds the file list; Ray tasks read the ok latents, file by file.
        ds = ray.data.from_items(plan, override_num_blocks=len(plan))
        ds = ds.map_batches(read_files, fn_kwargs={"files": files, "columns": LATENT_COLUMNS, "filter": _ok()},
                            batch_size=1, batch_format="numpy", num_cpus=0.25)
        ds = ds.map_batches(expand_strengths, fn_kwargs={"strengths": strengths, "n_styles": n_styles},
                            batch_format="numpy", num_cpus=0.25)
        ds = ds.map_batches(
            EditLatents,
            fn_constructor_kwargs={
                "generator": config.generator, "direction": direction, "device": device,
                "storage_options": config.storage_options, "image_size": config.image_size,
                "cpu_threads": config.cpu_threads,
            },
            compute=ActorPoolStrategy(min_size=1, max_size=resources["actors"]),
            batch_size=batch_size, batch_format="numpy",
            num_gpus=resources["num_gpus"], num_cpus=resources["num_cpus"],
        )
        ds = ds.map_batches(EncodeEditImages, fn_constructor_kwargs={
            "run_id": run_id, "n_styles": n_styles, "image_format": config.images,
        }, compute=ActorPoolStrategy(min_size=1, max_size=2), batch_format="numpy", num_cpus=0.5)
        write_edits(ds, config.output, run_id, n_styles, config.storage_options)
        import pyarrow.compute as pc

        written = read_edits(config.output, config.storage_options, columns=["status", "run_id"])
        written = written.filter(pc.equal(written["run_id"], run_id))
        counts = dict(Counter(written["status"].to_pylist()))
        n_inputs = sum(counts.values()) // len(strengths)
    summary = EditSummary(
        run_id=run_id, table=config.table, output=config.output, direction=direction.name,
        direction_kind=direction.kind, strengths=strengths, inputs=n_inputs,
        rows=sum(counts.values()), counts=dict(sorted(counts.items())), device=device,
        wall_s=round(time.perf_counter() - t0, 3),
    )
    if plan:  # OUTPUT/_runs/<run_id>.json, written as every run's summary is
        from pipelines.run import record_summary
        from pipelines.table import OutputTable
        from schemas.edits import EDITS_SCHEMA_VERSION

        table = OutputTable(config.output, config.storage_options)
        doc = asdict(summary)
        doc["input"] = doc.pop("table")  # "table" holds the edits table's counts, as for every run
        doc.update(kind="edit", schema_version=EDITS_SCHEMA_VERSION,
                   written_at=_dt.datetime.now(_dt.timezone.utc).isoformat())
        record_summary(table, doc, table.load().version())
    return summary


# ----------------------------------------------------------------------------------------------
# `psp direction`: fit a direction from labels


def read_labels(path: str, column: str, storage_options: Mapping[str, Any] | None = None):
    """A labels file (Parquet or CSV) with `image_id` (or `source_uri`) and a boolean `column`
    -> (key column name, {key: bool}). Rows with a missing label are dropped."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        with open_uri(path, "rb", storage_options) as f:
            table = pcsv.read_csv(f) if path.lower().endswith((".csv", ".csv.gz")) else pq.read_table(f)
    except FileNotFoundError:
        raise ConfigError(f"--labels {path!r} does not exist") from None
    except Exception as e:
        raise ConfigError(f"--labels {path!r}: not a readable Parquet or CSV file ({type(e).__name__}: {e})") from None
    key = "image_id" if "image_id" in table.column_names else "source_uri" if "source_uri" in table.column_names else None
    if key is None or column not in table.column_names:
        raise ConfigError(
            f"--labels {path!r} has columns {table.column_names}: it needs image_id (or source_uri) and the "
            f"--label column {column!r}"
        )
    labels: dict[str, bool] = {}
    for k, v in zip(table[key].to_pylist(), table[column].to_pylist()):
        if k is None or v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if isinstance(v, str):
            low = v.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"--label {column!r}: value {v!r} for {k!r} is not a boolean (true/false, 1/0)")
            v = low in ("true", "1", "yes")
        elif v not in (0, 1, True, False):
            raise ConfigError(f"--label {column!r}: value {v!r} for {k!r} is not a boolean (true/false, 1/0)")
        labels[str(k)] = bool(v)
    return key, labels


def fit_direction_from_labels(
    table_uri: str,
    labels_path: str,
    column: str = "label",
    method: str = "logistic",
    shared: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit a direction on the W+ of `table_uri` (ok rows) against a boolean label joined by
    image_id (or source_uri). `shared`: fit on the mean over styles -> [512], else [n_styles, 512].
    Returns (unit float32 direction, info with the counts used)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.scan import Rows, scan_table
    from psp_core.editing import fit_direction
    from schemas import w_plus_to_numpy

    key, labels = read_labels(labels_path, column, storage_options)
    files, n_styles = _latent_files(table_uri, storage_options)
    # Only the labelled ok rows are read (their W+): memory follows the labels, not the table.
    wanted = _ok() & pc.field(key).isin(pa.array(sorted(labels), pa.string()))
    table = scan_table(files, [key, "w_plus"], Rows, filter=wanted).table(
        pa.schema([files.schema.field(key), files.schema.field("w_plus")], metadata=files.schema.metadata))
    keys = table[key].to_pylist()
    rows = list(range(len(keys)))
    if not rows:
        raise ConfigError(
            f"--labels {labels_path!r}: none of its {len(labels)} {key}s match an ok row of {table_uri!r}"
        )
    w = w_plus_to_numpy(table)
    y = np.array([labels[k] for k in keys])
    try:
        d = fit_direction(w.mean(axis=1) if shared else w, y, method=method)
    except ValueError as e:
        raise ConfigError(f"--label {column!r}: {e}") from None
    info = {"rows": len(rows), "true": int(y.sum()), "false": int((~y).sum()), "unmatched_labels": len(labels) - len(rows),
            "method": method, "shape": list(d.shape), "n_styles": n_styles}
    return d, info
