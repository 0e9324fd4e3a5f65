"""What one `psp invert` run does (`InvertConfig`), and the checks that fail fast before Ray starts.

Everything that is a misconfiguration -- a missing checkpoint, a bad flag, a task the checkpoint
cannot serve, super-resolution without a factor, an output location that cannot be written -- is
caught here by `resolve_config`, with a message that says what to do. What can fail per image (an
unreadable file, no face) never raises: it becomes the row's `status`.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipelines.align import DEFAULT_MIN_FACE, FACE_MODES, check_faces
from pipelines.model import PRECISIONS, check_precision
from pipelines.options import ConfigError, check_options, option, shared
from pipelines.read import DEFAULT_READ_TIMEOUT_S
from psp_core.images import DEFAULT_DECODE_TIMEOUT_S
from psp_core.uris import filesystem_for
from schemas.ids import check_run_id, make_run_id

ALIGN_MODES = ("dlib", "none")


def _check_task(name: str) -> None:
    from psp_core.tasks import get_task

    get_task(name)


def _check_detect_size(size: int) -> None:
    from psp_core.align import check_detect_size

    check_detect_size(size)


def _check_resize_factor(factor: int) -> None:
    from psp_core.tasks import check_resize_factor

    check_resize_factor(factor)


def _check_latent_mask(text: str | Sequence[int]) -> None:
    parse_latent_mask(text)


def _check_table_uris(uris: str | Sequence[str]) -> None:
    for u in [uris] if isinstance(uris, str) else uris:
        if not isinstance(u, str) or not u:
            raise ValueError("expected the URI of a psp output table (repeat the flag for more)")


def _check_globs(patterns: str | Sequence[str]) -> None:
    for g in [patterns] if isinstance(patterns, str) else patterns:
        if not isinstance(g, str) or not g:
            raise ValueError("expected glob patterns such as '*.jpg' (repeat the flag for more)")


@dataclass
class InvertConfig:
    """One pipeline run (`psp invert`, `frontalize`, `nightly`): every option declared once, here.

    The command line is generated from these declarations (`pipelines.options.add_arguments`) and
    `resolve_config` runs the same checks, so a value accepted here never fails in an actor.

    input: URI of a folder / object prefix / file / manifest (`.txt`, one URI per line), or a list of
        URIs. Local paths, `s3://`, `gs://` and any other fsspec protocol.
    output: URI of the output table.
    The other fields are described by their `help`.
    """

    input: str | list[str]
    output: str
    checkpoint: str = option(None, "pSp, e4e or ReStyle checkpoint (.pt), a path or fsspec URI", required=True)
    task: str | None = option(
        None, "dataset_type (default: the checkpoint's): ffhq_encode, ffhq_frontalize, "
        "celebs_sketch_to_face, celebs_seg_to_face, celebs_super_resolution, toonify, cars_encode, "
        "church_encode, horse_encode, afhq_wild_encode", check=_check_task)
    align: str | None = option(
        None, "dlib FFHQ alignment, or none for sketches, seg maps and pre-aligned faces "
        "(default: dlib for face photos, none for sketch/seg tasks)", choices=ALIGN_MODES)
    device: str = shared("device")
    batch_size: int | None = shared("batch_size")
    gpus: int | None = shared("gpus")
    align_actors: int = option(2, "at most this many alignment actors", parse=int, minimum=1)
    align_detect_size: int | None = option(
        None, "opt-in speed mode: a coarse face scan on a copy reduced to about PX on its longest side (e.g. 512); "
        "where it shows one clear face, that face is re-detected in a small window on the original's pyramid "
        "grid; no face, several faces, a weak or small face or a close choice take the exact scan (landmarks: "
        "mean deviation under 1 percent of the inter-ocular distance on the bench photos; not bit-identical)",
        parse=int, check=_check_detect_size, metavar="PX")
    faces: str = option(
        "best", "which detected faces become rows: best (highest detector score, one row per input), "
        "largest (largest box), or all (one row per face of at least --min-face px, face_index 0 = best)",
        choices=FACE_MODES)
    min_face: int = option(
        DEFAULT_MIN_FACE, f"the smallest face considered by every --faces mode: its detection box's shorter "
        f"side in px (default {DEFAULT_MIN_FACE}; 0 keeps every face the detector finds, down to ~36 px, and "
        "scans every pyramid level as the original)", parse=int, minimum=0, metavar="PX")
    reuse_alignment: bool | None = option(
        None, "reuse the alignment an earlier run stored for the same input bytes (same source_sha256, same "
        "alignment options) in OUTPUT or an --alignment-from table, instead of detecting again; the crop is "
        "identical (default: on; --no-reuse-alignment detects every input)", kind="switch")
    alignment_from: list[str] | None = option(
        None, "also reuse alignments stored in this output table (e.g. another checkpoint's OUTPUT; "
        "repeatable; OUTPUT itself is always looked at first)", kind="append", check=_check_table_uris,
        metavar="TABLE")
    images: str = shared("images")
    image_size: str = shared("image_size")
    metrics: bool = option(False, "mse/psnr/ssim/identity of reconstruction vs input", kind="flag")
    mix: int = option(0, "N style-mixed outputs per input (multi-modal synthesis)", parse=int, minimum=0,
                      metavar="N")
    latent_mask: str | list[int] | None = option(None, "styles to mix, e.g. 8-17 or 8,9,10",
                                                 check=_check_latent_mask)
    mix_alpha: float | None = option(None, "blend weight of the injected styles (default: replace)",
                                     parse=float, minimum=0.0, maximum=1.0)
    seed: int = option(0, "base seed (per-row seeds derive from it and the image id)", parse=int)
    resize_factor: int | None = option(None, "super-resolution downsampling factor", parse=int,
                                       check=_check_resize_factor)
    image_column: str | None = option(None, "Parquet inputs: the image-bytes column (default: autodetect)")
    save_aligned: bool = option(False, "also store the aligned input crop (PNG)", kind="flag")
    cpu_threads: int | None = shared("cpu_threads")
    storage_options: dict[str, Any] | None = shared("storage_options")
    limit: int | None = shared("limit", scope="invert")
    run_id: str | None = shared("run_id", scope=("invert", "nightly"))
    progress: bool | None = option(None, "Ray progress bars (default: when stderr is a terminal)",
                                   kind="switch", scope="invert")
    listing: str | None = option(
        None, "take the inputs from this listing instead of walking INPUT: a Parquet or CSV file (or a "
        "folder of them) with a uri column, or an S3 Inventory report (bucket and key columns)", metavar="PATH")
    include: list[str] | None = option(
        None, "read only the files under INPUT matching GLOB (repeatable; without / it matches the file "
        "name, with / the path below INPUT); what is left out is counted in the run summary",
        kind="append", check=_check_globs, metavar="GLOB")
    exclude: list[str] | None = option(
        None, "leave out the files under INPUT matching GLOB (repeatable; matched as --include)",
        kind="append", check=_check_globs, metavar="GLOB")
    read_timeout: float | None = option(
        DEFAULT_READ_TIMEOUT_S, "seconds one input's read may take; over it the row is a read_error, retried "
        f"by a rerun (default {DEFAULT_READ_TIMEOUT_S:g})", parse=float, minimum=0.001, metavar="S")
    decode_timeout: float | None = option(
        DEFAULT_DECODE_TIMEOUT_S, "seconds one image's decode may take; over it the row is a decode_timeout, "
        f"retried by a rerun (default {DEFAULT_DECODE_TIMEOUT_S:g})", parse=float, minimum=0.001, metavar="S")
    precision: str = option(
        "fp32", "model arithmetic: fp32 (default, TF32 off: equals the original within 1e-4), tf32, bf16 or "
        "fp16 autocast (GPU; on CPU only fp32 and bf16)", choices=PRECISIONS)
    n_iters: int | None = option(
        None, "ReStyle checkpoints: refinement steps (default: 5, as ReStyle's inference script); "
        "pSp and e4e encode in one pass", parse=int, minimum=1, metavar="N")
    keep_iterations: bool = option(
        False, "ReStyle checkpoints: also record the W+ of every iteration (column iteration_w_plus)",
        kind="flag")
    output_actors: int | None = option(
        None, "at most this many CPU actors for PNG/JPEG encoding and metrics (default: half the CPUs)",
        parse=int, minimum=1)


@dataclass(frozen=True)
class CheckpointInfo:
    """What the driver needs to know about a checkpoint without loading its weights."""

    uri: str
    dataset_type: str
    input_nc: int
    label_nc: int
    output_size: int
    n_styles: int
    size_bytes: int | None = None  # the checkpoint file's size (sizes the model actor's memory request)
    family: str = "psp"  # psp, e4e, restyle_psp or restyle_e4e (psp_core.checkpoint.checkpoint_family)
    n_iters: int = 1  # the family's default encoder passes (ReStyle: 5)
    sha256: str | None = None  # of the file's bytes: what the run's rows record as checkpoint_sha256


@dataclass(frozen=True)
class ResolvedConfig:
    """An `InvertConfig` after validation, with the derived choices filled in."""

    config: InvertConfig
    checkpoint: CheckpointInfo
    task: str
    align: str
    latent_mask: tuple[int, ...] | None
    run_id: str
    n_iters: int = 1  # encoder passes of this run (--n-iters, else the family's default)


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


# ------------------------------------------------------------------------------------------------
# The checkpoint, read once per run


def read_checkpoint_info(uri: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """What a run needs to know of its checkpoint (task, channels, output size, family, size and
    sha256), from one read of the file (`psp_core.checkpoint.read_checkpoint_header`: the opts are
    unpickled from the zip's pickle record without the weights, the bytes hashed as they stream).

    Raises ConfigError when the file is missing or is not a pSp checkpoint.
    """
    from psp_core.checkpoint import CheckpointError, model_spec, read_checkpoint_header

    try:
        header = read_checkpoint_header(uri, storage_options)
    except FileNotFoundError:
        raise ConfigError(
            f"checkpoint {uri!r} does not exist: pass --checkpoint a pSp .pt file "
            "(e.g. psp_ffhq_encode.pt from the pSp release), a path or s3://... URI"
        ) from None
    except CheckpointError as e:
        raise ConfigError(f"{e} (--checkpoint)") from None
    except Exception as e:  # a bad protocol, options or credentials; a damaged file
        raise ConfigError(f"checkpoint {uri!r} could not be read ({type(e).__name__}: {e}): check the URI, "
                          "--storage-options, and that it is a pSp .pt file") from None
    opts = header.opts
    if opts is None:
        hint = " (it looks like a StyleGAN2 generator checkpoint)" if "g_ema" in header.keys else ""
        raise ConfigError(
            f"checkpoint {uri!r} has no pSp 'opts'{hint}: pass a pSp checkpoint such as psp_ffhq_encode.pt"
        )
    try:
        spec = model_spec(opts)  # the family's legacy defaults (e4e's stylegan_size, ReStyle's 6 channels)
    except CheckpointError as e:
        raise ConfigError(f"checkpoint {uri!r}: {e}") from None
    return CheckpointInfo(
        uri=uri,
        dataset_type=spec.dataset_type,
        input_nc=spec.input_nc,
        label_nc=int(opts.get("label_nc", 0)),
        output_size=spec.output_size,
        n_styles=spec.n_styles,
        size_bytes=header.size_bytes,
        family=spec.family,
        n_iters=spec.n_iters,
        sha256=header.sha256,
    )


# ------------------------------------------------------------------------------------------------
# Validation


def check_output_writable(output: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Create the output folder if needed and write/remove a probe object; ConfigError if not possible."""
    try:
        fs, path = filesystem_for(output, storage_options)
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


def _check_checkpoint_fits(config: InvertConfig, task_name: str, task, info: CheckpointInfo) -> None:
    """ConfigError when the options ask the checkpoint for something it cannot do."""
    if task.input_nc != info.input_nc or task.label_nc != info.label_nc:
        raise ConfigError(
            f"--task {task_name} expects {task.input_nc}-channel inputs (label_nc={task.label_nc}) but "
            f"checkpoint {config.checkpoint!r} was trained for {info.dataset_type} with input_nc="
            f"{info.input_nc}, label_nc={info.label_nc}: drop --task to use the checkpoint's own task, "
            "or pass the checkpoint trained for this task"
        )
    restyle = info.family.startswith("restyle")
    if not restyle and (config.n_iters is not None or config.keep_iterations):
        flag = "--n-iters" if config.n_iters is not None else "--keep-iterations"
        raise ConfigError(
            f"{flag} only applies to ReStyle checkpoints (iterative refinement); {config.checkpoint!r} is a "
            f"{info.family} checkpoint, which encodes in one pass: drop {flag}, or pass a ReStyle checkpoint "
            "(e.g. restyle_e4e_ffhq_encode.pt)"
        )
    if task.input_size != (256, 256) and config.metrics:
        raise ConfigError(
            f"--metrics compares 256x256 face crops; task {task_name} takes {task.input_size[0]}x"
            f"{task.input_size[1]} inputs: drop --metrics for this checkpoint"
        )
    if task.needs_factor and config.resize_factor is None:
        factors = ",".join(map(str, task.trained_factors)) or "1,2,4,8,16,32"
        raise ConfigError(
            f"task {task_name} (super-resolution) needs --resize-factor F, the downsampling factor to "
            f"simulate (trained with {factors}; the pSp demo uses 16)"
        )


def _latent_mask_for(config: InvertConfig, task, info: CheckpointInfo) -> tuple[int, ...] | None:
    """The style indices `--mix` mixes (the task's default when --latent-mask is absent), checked
    against the model's styles; None without --mix."""
    if not config.mix:
        if config.latent_mask is not None or config.mix_alpha is not None:
            raise ConfigError("--latent-mask / --mix-alpha only apply to style mixing: add --mix N")
        return None
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
    return tuple(mask)


def resolve_config(config: InvertConfig, check_output: bool = True) -> ResolvedConfig:
    """Validate `config` on the driver (no Ray), reading only the checkpoint's opts.

    Raises ConfigError with what to do for: bad flag values, a missing/unreadable checkpoint, a
    task the checkpoint cannot serve (input channels differ), super-resolution without a factor,
    a latent mask outside the model's styles, --n-iters / --keep-iterations with a checkpoint that
    is not ReStyle, --metrics on non-square inputs (cars), an output location that cannot be written.
    """
    from psp_core.tasks import get_task

    config = replace(config, image_size=str(config.image_size))
    check_options(config)  # the declared choices, bounds and the stages' own checks
    if config.device == "cpu":
        try:
            check_precision(config.precision, "cpu")
        except ValueError as e:
            raise ConfigError(f"--precision {config.precision}: {e}") from None
    if not config.input or not config.output:
        raise ConfigError("psp invert needs an INPUT and an OUTPUT location")

    info = read_checkpoint_info(config.checkpoint, config.storage_options)
    task_name = config.task or info.dataset_type
    task = get_task(task_name)  # a bad --task was refused by check_options
    _check_checkpoint_fits(config, task_name, task, info)
    n_iters = config.n_iters if config.n_iters is not None else info.n_iters
    latent_mask = _latent_mask_for(config, task, info)

    align = config.align or ("dlib" if task.needs_alignment else "none")
    try:
        check_faces(config.faces, align)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if check_output:
        check_output_writable(config.output, config.storage_options)
    try:
        run_id = check_run_id(config.run_id) if config.run_id else make_run_id()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ResolvedConfig(
        config=config,
        checkpoint=info,
        task=task_name,
        align=align,
        latent_mask=latent_mask,
        run_id=run_id,
        n_iters=n_iters,
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
    "check_output_writable",
    "code_version",
]
