"""What one `psp invert` run does (`InvertConfig`), and the checks that fail fast before Ray starts.

Everything that is a misconfiguration -- a missing checkpoint, a bad flag, a task the checkpoint
cannot serve, super-resolution without a factor, an output location that cannot be written -- is
caught here by `resolve_config`, with a message that says what to do. What can fail per image (an
unreadable file, no face) never raises: it becomes the row's `status`.
"""
from __future__ import annotations

import io
import pickle
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from schemas.ids import check_run_id, make_run_id
from schemas.outputs import IMAGE_FORMATS

ALIGN_MODES = ("dlib", "none")
DEVICES = ("auto", "cpu", "cuda")
IMAGE_SIZES = ("256", "full")


class ConfigError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


@dataclass
class InvertConfig:
    """One `psp invert` run.

    input: URI of a folder / object prefix / file / manifest (`.txt`, one URI per line), or a list of
        URIs. Local paths, `s3://`, `gs://` and any other fsspec protocol.
    output: URI of the output Delta table (created by the first run; one row per input).
    checkpoint: pSp `.pt` checkpoint, a path or fsspec URI.
    task: dataset_type to use; None = the checkpoint's `opts['dataset_type']`.
    align: 'dlib' (FFHQ alignment) or 'none' (resize only: sketches, seg maps, pre-aligned faces);
        None = 'dlib' for face-photo tasks, 'none' for sketch/seg.
    device: 'auto' (cuda when the invert actor sees a GPU), 'cpu' or 'cuda'.
    batch_size: rows per invert batch (None: 32 on GPU, 8 on CPU).
    gpus: at most this many GPU invert actors (None: every GPU in the cluster).
    align_actors: at most this many alignment actors (dlib detection is the CPU-bound stage).
    images: output image encoding, 'png', 'jpeg' or 'none'.
    image_size: '256' (the pSp face_pool output) or 'full' (the generator's output_size).
    metrics: compute mse/psnr/ssim (and identity distance) between input crop and reconstruction.
    mix: N > 0 = multi-modal synthesis, N style-mixed outputs per input (list columns).
    latent_mask: style indices to mix, e.g. [8, ..., 17] (parse '8-17' with `parse_latent_mask`).
    mix_alpha: blend weight of the injected style (None = replace).
    seed: base seed; each row's seed derives from (seed, image_id), independent of batching.
    resize_factor: super-resolution downsampling factor (required for celebs_super_resolution).
    limit: process at most this many (new) inputs.
    storage_options: fsspec options for input, output and checkpoint (e.g. s3 endpoint/keys).
    run_id: recorded on every row; None = a fresh one.
    image_column: Parquet inputs: the column holding image bytes (None = autodetect).
    save_aligned: also store the aligned 256x256 input crop (PNG) in `aligned_image`.
    cpu_threads: torch threads in a CPU invert actor (None = the node's core count).
    align_detect_size: opt-in fast alignment: run the face detector on a copy whose longest side is
        at most this many pixels (landmarks stay full resolution). None = the original's exact
        detection. See `psp_core.align.FaceAligner(detect_size=...)` for the measured deviation.
    """

    input: str | list[str]
    output: str
    checkpoint: str
    task: str | None = None
    align: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    gpus: int | None = None
    align_actors: int = 2
    images: str = "png"
    image_size: str = "256"
    metrics: bool = False
    mix: int = 0
    latent_mask: str | list[int] | None = None
    mix_alpha: float | None = None
    seed: int = 0
    resize_factor: int | None = None
    limit: int | None = None
    storage_options: dict[str, Any] | None = None
    run_id: str | None = None
    image_column: str | None = None
    save_aligned: bool = False
    cpu_threads: int | None = None
    align_detect_size: int | None = None
    progress: bool | None = None  # Ray progress bars; None = when stderr is a terminal


@dataclass(frozen=True)
class CheckpointInfo:
    """What the driver needs to know about a checkpoint without loading its weights."""

    uri: str
    dataset_type: str
    input_nc: int
    label_nc: int
    output_size: int
    n_styles: int


@dataclass(frozen=True)
class ResolvedConfig:
    """An `InvertConfig` after validation, with the derived choices filled in."""

    config: InvertConfig
    checkpoint: CheckpointInfo
    task: str
    align: str
    latent_mask: tuple[int, ...] | None
    run_id: str


def parse_latent_mask(text: str | Sequence[int] | None) -> list[int] | None:
    """'8-17' / '8,9,10' / '1,3-5' / [8, 9] -> sorted unique ints (None stays None)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return sorted({int(i) for i in text})
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ConfigError(
                f"--latent-mask {text!r}: expected style indices like '8-17' or '8,9,10'"
            ) from None
    if not out:
        raise ConfigError(f"--latent-mask {text!r} names no style index: use e.g. '8-17'")
    return sorted(out)


def row_seed(seed: int, image_id: str) -> int:
    """The per-row seed for style mixing: a function of (--seed, image_id) only, so a row's result
    does not depend on which batch or actor it lands in."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------
# Checkpoint opts without the weights


class _OptsUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's `data.pkl` without its tensors (they become None)."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return _Namespace  # a dict that accepts attributes (state_dict's _metadata)
        if module.startswith("torch"):
            return _ignore
        if module == "argparse" and name == "Namespace":
            return _Namespace
        if module in ("builtins", "_codecs") and name in ("set", "frozenset", "list", "dict", "tuple", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's opts")

    def persistent_load(self, pid):
        return None


def _ignore(*args, **kwargs):
    return None


class _Namespace(dict):
    """Stands in for argparse.Namespace / OrderedDict: keeps the items, ignores attributes."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _opts_from_zip(f) -> dict | None:
    with zipfile.ZipFile(f) as z:
        name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if name is None:
            return None
        obj = _OptsUnpickler(io.BytesIO(z.read(name))).load()
    return obj if isinstance(obj, dict) else None


def read_checkpoint_info(uri: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """Read a pSp checkpoint's opts (dataset_type, input_nc, label_nc, output_size) cheaply: only
    the pickle record of the torch zip file is fetched, not the weights (1.2 GB for released ones).

    Raises ConfigError when the file is missing or is not a pSp checkpoint.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    except Exception as e:  # bad protocol / options
        raise ConfigError(f"checkpoint {uri!r}: cannot open its filesystem ({e}); check --storage-options") from None
    try:
        exists = fs.exists(path)
    except Exception as e:
        raise ConfigError(f"checkpoint {uri!r} cannot be reached ({e}): check the URI and --storage-options") from None
    if not exists or fs.isdir(path):
        raise ConfigError(
            f"checkpoint {uri!r} does not exist: pass --checkpoint a pSp .pt file "
            "(e.g. psp_ffhq_encode.pt from the pSp release), a path or s3://... URI"
        )
    ckpt = None
    try:
        with fs.open(path, "rb") as f:
            ckpt = {"opts": None}
            top = _opts_from_zip(f)
            if top is not None:
                ckpt = top
    except zipfile.BadZipFile:
        ckpt = None
    except Exception as e:
        raise ConfigError(f"checkpoint {uri!r} could not be read ({e}): is it a pSp .pt file?") from None
    if ckpt is None:  # legacy (pre-zip) torch format: load it whole
        from psp_core.psp import read_checkpoint

        try:
            ckpt, _ = read_checkpoint(uri, storage_options)
        except Exception as e:
            raise ConfigError(f"checkpoint {uri!r} could not be read ({e}): is it a pSp .pt file?") from None
    opts = ckpt.get("opts") if isinstance(ckpt, dict) else None
    if not isinstance(opts, dict):
        hint = " (it looks like a StyleGAN2 generator checkpoint)" if isinstance(ckpt, dict) and "g_ema" in ckpt else ""
        raise ConfigError(
            f"checkpoint {uri!r} has no pSp 'opts'{hint}: pass a pSp checkpoint such as psp_ffhq_encode.pt"
        )
    from psp_core.psp import n_styles_for

    output_size = int(opts.get("output_size") or 1024)  # the reference scripts' legacy default
    return CheckpointInfo(
        uri=uri,
        dataset_type=str(opts.get("dataset_type") or "ffhq_encode"),
        input_nc=int(opts.get("input_nc", 3)),
        label_nc=int(opts.get("label_nc", 0)),
        output_size=output_size,
        n_styles=n_styles_for(output_size),
    )


# ------------------------------------------------------------------------------------------------
# Validation


def _check_choice(value: Any, choices: Sequence[str], flag: str) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(choices)}")


def check_output_writable(output: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Create the output folder if needed and write/remove a probe object; ConfigError if not possible."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(output, **dict(storage_options or {}))
        if fs.exists(path) and not fs.isdir(path):
            raise ConfigError(f"output {output!r} is a file: pass a folder or prefix for the Parquet output")
        fs.makedirs(path, exist_ok=True)
        probe = path.rstrip("/") + f"/_psp_write_probe_{uuid.uuid4().hex[:8]}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"output {output!r} cannot be written ({type(e).__name__}: {e}): check that the bucket or "
            "folder exists, the credentials and --storage-options"
        ) from None


def resolve_config(config: InvertConfig, check_output: bool = True) -> ResolvedConfig:
    """Validate `config` on the driver (no Ray), reading only the checkpoint's opts.

    Raises ConfigError with what to do for: bad flag values, a missing/unreadable checkpoint, a
    task the checkpoint cannot serve (input channels differ), super-resolution without a factor,
    a latent mask outside the model's styles, an output location that cannot be written.
    """
    from psp_core.tasks import get_task

    _check_choice(config.device, DEVICES, "--device")
    _check_choice(config.images, IMAGE_FORMATS, "--images")
    _check_choice(str(config.image_size), IMAGE_SIZES, "--image-size")
    if config.align is not None:
        _check_choice(config.align, ALIGN_MODES, "--align")
    for name in ("batch_size", "gpus", "limit", "cpu_threads"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < (0 if name in ("gpus", "limit") else 1)):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")
    if not isinstance(config.align_actors, int) or config.align_actors < 1:
        raise ConfigError(f"--align-actors {config.align_actors!r}: expected a positive integer")
    if config.align_detect_size is not None and (
        not isinstance(config.align_detect_size, int) or config.align_detect_size < 64
    ):
        raise ConfigError(
            f"--align-detect-size {config.align_detect_size!r}: expected pixels >= 64 (e.g. 1024), "
            "or leave it out for the original's exact detection"
        )
    if not isinstance(config.mix, int) or config.mix < 0:
        raise ConfigError(f"--mix {config.mix!r}: expected the number of style-mixed outputs per input (>= 0)")
    if config.mix_alpha is not None and not 0.0 <= float(config.mix_alpha) <= 1.0:
        raise ConfigError(f"--mix-alpha {config.mix_alpha}: expected a blend weight in [0, 1]")
    if not config.input or not config.output:
        raise ConfigError("psp invert needs an INPUT and an OUTPUT location")

    info = read_checkpoint_info(config.checkpoint, config.storage_options)
    task_name = config.task or info.dataset_type
    try:
        task = get_task(task_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if task.input_nc != info.input_nc or task.label_nc != info.label_nc:
        raise ConfigError(
            f"--task {task_name} expects {task.input_nc}-channel inputs (label_nc={task.label_nc}) but "
            f"checkpoint {config.checkpoint!r} was trained for {info.dataset_type} with input_nc="
            f"{info.input_nc}, label_nc={info.label_nc}: drop --task to use the checkpoint's own task, "
            "or pass the checkpoint trained for this task"
        )
    if task.needs_factor and config.resize_factor is None:
        factors = ",".join(map(str, task.trained_factors)) or "1,2,4,8,16,32"
        raise ConfigError(
            f"task {task_name} (super-resolution) needs --resize-factor F, the downsampling factor to "
            f"simulate (trained with {factors}; the pSp demo uses 16)"
        )
    if config.resize_factor is not None and int(config.resize_factor) < 1:
        raise ConfigError(f"--resize-factor {config.resize_factor}: expected an integer >= 1")

    latent_mask = None
    if config.mix:
        mask = parse_latent_mask(config.latent_mask)
        if mask is None:
            default = [i for i in (task.default_latent_mask or range(8, 18)) if i < info.n_styles]
            if not default:
                raise ConfigError(
                    f"--mix needs --latent-mask: this {info.output_size}px model has only "
                    f"{info.n_styles} styles (0-{info.n_styles - 1}), e.g. --latent-mask "
                    f"{info.n_styles // 2}-{info.n_styles - 1}"
                )
            mask = default
        bad = [i for i in mask if not 0 <= i < info.n_styles]
        if bad:
            raise ConfigError(
                f"--latent-mask has style indices {bad} outside 0-{info.n_styles - 1} "
                f"(checkpoint {config.checkpoint!r} has {info.n_styles} styles)"
            )
        latent_mask = tuple(mask)
    elif config.latent_mask is not None or config.mix_alpha is not None:
        raise ConfigError("--latent-mask / --mix-alpha only apply to style mixing: add --mix N")

    align = config.align or ("dlib" if task.needs_alignment else "none")
    if check_output:
        check_output_writable(config.output, config.storage_options)
    try:
        run_id = check_run_id(config.run_id) if config.run_id else make_run_id()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ResolvedConfig(
        config=replace(config, image_size=str(config.image_size)),
        checkpoint=info,
        task=task_name,
        align=align,
        latent_mask=latent_mask,
        run_id=run_id,
    )


def code_version() -> str:
    """The installed psp-pipeline version (recorded on every row)."""
    try:
        from importlib.metadata import version

        return version("psp-pipeline")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


__all__ = [
    "InvertConfig",
    "ResolvedConfig",
    "CheckpointInfo",
    "ConfigError",
    "resolve_config",
    "read_checkpoint_info",
    "parse_latent_mask",
    "row_seed",
    "check_output_writable",
    "code_version",
]
