"""Reading checkpoints: one reader, one set of legacy defaults, one loader for every family.

``load_psp`` reads the released pSp, e4e and ReStyle files unchanged (``{'state_dict': encoder.* +
decoder.*, 'opts', 'latent_avg'}``) from a local path or any fsspec URI with
``torch.load(weights_only=True)``, applies the legacy opts defaults the original inference
scripts apply, ignores the stored ``opts['device']``, loads both halves strictly (missing,
unexpected and mis-shaped keys are reported together) and returns a :class:`~psp_core.psp.PSP`
(an :class:`~psp_core.e4e.E4E` or :class:`~psp_core.restyle.ReStyle` for those families).
``load_stylegan2`` reads rosinality generator files (``{'g_ema', 'latent_avg'}``).

Which family a file belongs to is read from its opts (:func:`checkpoint_family`):
ReStyle's encoder types (``BackboneEncoder``, ``ResNetBackboneEncoder`` -> 'restyle_psp';
``ProgressiveBackboneEncoder``, ``ResNetProgressiveBackboneEncoder`` -> 'restyle_e4e'; a
6-channel ``GradualStyleEncoder`` -> 'restyle_psp'), e4e's (``Encoder4Editing``,
``SingleStyleCodeEncoder``, or any opts with e4e's ``stylegan_size``) -> 'e4e', else 'psp'.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from psp_core.e4e import E4E
from psp_core.encoders import ENCODER_TYPES
from psp_core.psp import PSP, STYLE_DIM, encoder_input_size, n_styles_for
from psp_core.restyle import DEFAULT_N_ITERS, ReStyle, check_n_iters
from psp_core.stylegan2 import Generator
from psp_core.uris import filesystem_for, is_local
from psp_core.zero_time import ZERO_TIME_KEY, ZeroTimeModel

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "CheckpointHeader",
    "ModelSpec",
    "checkpoint_family",
    "load_psp",
    "load_stylegan2",
    "model_opts",
    "model_spec",
    "read_checkpoint",
    "read_checkpoint_header",
    "sha256_file",
]

logger = logging.getLogger(__name__)

FAMILIES = ("psp", "e4e", "restyle_psp", "restyle_e4e")
W_ENCODERS = ("BackboneEncoderUsingLastLayerIntoW",)
_MODEL_CLASSES: dict[str, type[PSP]] = {"psp": PSP, "e4e": E4E, "restyle_psp": ReStyle, "restyle_e4e": ReStyle}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as asked; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------
# Opts: family and legacy defaults


def checkpoint_family(opts: Mapping[str, Any]) -> str:
    """'psp', 'e4e', 'restyle_psp' or 'restyle_e4e', from a checkpoint's raw opts."""
    encoder_type = opts.get("encoder_type")
    if encoder_type in ENCODER_TYPES["restyle_e4e"]:
        return "restyle_e4e"
    if encoder_type in ("BackboneEncoder", "ResNetBackboneEncoder"):
        return "restyle_psp"
    if encoder_type in ("Encoder4Editing", "SingleStyleCodeEncoder") or "stylegan_size" in opts:
        return "e4e"
    if encoder_type == "GradualStyleEncoder" and int(opts.get("input_nc") or 3) == 6:
        return "restyle_psp"
    return "psp"


def model_opts(opts: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's opts with the legacy defaults its family's inference script applies, in
    one vocabulary: ``output_size`` (e4e's ``stylegan_size``), ``input_nc`` (the encoder's
    channels: 6 for ReStyle), ``encoder_type``, ``start_from_latent_avg``, ``learn_in_w``;
    ``device`` dropped. Raises CheckpointError for opts no model can be built from.
    """
    family = checkpoint_family(opts)
    opts = dict(opts)
    if family == "psp":
        # pSp's scripts/inference.py; the released files lack output_size and learn_in_w.
        opts.setdefault("output_size", 1024)
        opts.setdefault("encoder_type", "GradualStyleEncoder")
        opts.setdefault("input_nc", 3)
    elif family == "e4e":
        # e4e's opts name the generator size stylegan_size (train default 1024); its encoders take RGB.
        opts["output_size"] = opts.get("stylegan_size") or 1024
        opts.setdefault("encoder_type", "Encoder4Editing")
        opts.setdefault("input_nc", 3)
    else:
        opts.setdefault("output_size", 1024)
        opts.setdefault("input_nc", 6)
    opts.setdefault("learn_in_w", False)
    opts.setdefault("start_from_latent_avg", False)
    opts.pop("device", None)  # stored as 'cuda:0'; the device is chosen at load time
    types = ENCODER_TYPES[family]
    if opts["encoder_type"] not in types:
        raise CheckpointError(
            f"opts['encoder_type']={opts['encoder_type']!r} is not a {family} encoder: expected one of "
            f"{sorted(types)} (supported families: {', '.join(FAMILIES)})"
        )
    size = int(opts["output_size"])
    key = "stylegan_size" if family == "e4e" else "output_size"
    if size < 8 or 2 ** int(math.log2(size)) != size:
        raise CheckpointError(f"opts[{key!r}]={size}: expected a power of two such as 256 or 1024")
    if "n_styles" in opts and opts["n_styles"] is not None and int(opts["n_styles"]) != n_styles_for(size):
        raise CheckpointError(
            f"opts['n_styles']={opts['n_styles']} does not match {key} {size} ({n_styles_for(size)} styles)"
        )
    expected_nc = {"e4e": 3, "restyle_psp": 6, "restyle_e4e": 6}.get(family)
    if expected_nc is not None and int(opts["input_nc"]) != expected_nc:
        raise CheckpointError(
            f"opts['input_nc']={opts['input_nc']}: a {family} encoder takes {expected_nc} channels"
            + (" (the image and the current reconstruction)" if expected_nc == 6 else "")
        )
    return opts


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint's opts say about the model, without its weights.

    ``input_nc``/``input_size``: the image ``encode`` takes (channels, (H, W)); ``n_iters``: the
    default number of encoder passes (5 for ReStyle, else 1).
    """

    family: str
    encoder_type: str
    dataset_type: str
    output_size: int
    n_styles: int
    input_nc: int
    input_size: tuple[int, int]
    n_iters: int


def model_spec(opts: Mapping[str, Any]) -> ModelSpec:
    """:class:`ModelSpec` of a checkpoint's raw opts (the legacy defaults applied)."""
    family = checkpoint_family(opts)
    full = model_opts(opts)
    restyle = family.startswith("restyle")
    dataset_type = str(full.get("dataset_type") or "ffhq_encode")
    return ModelSpec(
        family=family,
        encoder_type=str(full["encoder_type"]),
        dataset_type=dataset_type,
        output_size=int(full["output_size"]),
        n_styles=n_styles_for(int(full["output_size"])),
        input_nc=int(full["input_nc"]) - (3 if restyle else 0),
        input_size=encoder_input_size(dataset_type),
        n_iters=DEFAULT_N_ITERS if restyle else 1,
    )


# ---------------------------------------------------------------------------------------------
# The reader


def sha256_file(path: str) -> str:
    """sha256 hex of a local file's bytes (the ``checkpoint_sha256`` of a loaded model)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(
    path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str]:
    """``torch.load`` a checkpoint with ``weights_only=True`` onto the CPU.

    Local paths are memory-mapped; any other fsspec URI (``s3://``, ``gs://``, ``memory://`` ...)
    is streamed to a temporary file (hashing as it goes) and loaded from there.

    Returns:
        ``(object, sha256 hex of the file bytes)``.
    """
    uri = os.fspath(path)
    if is_local(uri):
        local = uri[len("file://") :] if uri.startswith("file://") else uri
        if not os.path.exists(local):
            raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
        if os.path.isdir(local):
            found = sorted(n for n in os.listdir(local) if n.endswith((".pt", ".pth", ".ckpt")))
            raise CheckpointError(
                f"checkpoint {uri!r} is a directory, not a checkpoint file: give the path of the .pt "
                "file itself" + (f" (this directory holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''})" if found else "")
            )
        return _torch_load(local, uri), sha256_file(local)

    with tempfile.TemporaryDirectory(prefix="psp_ckpt_") as tmp:
        local = os.path.join(tmp, "checkpoint.pt")
        h = hashlib.sha256()
        try:
            fs, remote = filesystem_for(uri, storage_options)
            with fs.open(remote, "rb") as src, open(local, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    dst.write(chunk)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint {uri!r} does not exist") from None
        except IsADirectoryError:
            raise CheckpointError(
                f"checkpoint {uri!r} is a directory (prefix), not a checkpoint file: give the URI of the .pt file itself"
            ) from None
        # Tensors stay valid after the temporary file is removed (mmap keeps the inode alive).
        return _torch_load(local, uri), h.hexdigest()


def _torch_load(local: str, name: str) -> Any:
    try:
        try:
            return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (non-zip) format cannot be mapped
                raise
            return torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_weights_only_message(name, e)) from None
    except Exception as e:  # torch.load raises many types on damaged or foreign files
        raise CheckpointError(
            f"checkpoint {name!r} is not a readable torch checkpoint ({type(e).__name__}: {e}); "
            "check that the file is complete and was written by torch.save"
        ) from None


# ---------------------------------------------------------------------------------------------
# The header: opts, top-level keys, size and sha256 in one pass over the bytes, no weights loaded


@dataclass(frozen=True)
class CheckpointHeader:
    """What a driver needs of a checkpoint before any model loads it, from ONE read of its bytes.

    ``opts``: the raw opts dict (None when the file has none); ``keys``: the top-level keys
    (``state_dict``, ``opts``, ``latent_avg``; ``g_ema`` for a generator file); ``sha256``: of the
    whole file (what rows record as ``checkpoint_sha256``); ``size_bytes``: the file's size.
    """

    uri: str
    sha256: str
    size_bytes: int
    opts: Mapping[str, Any] | None
    keys: tuple[str, ...]


class _OptsUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's ``data.pkl`` without its tensors (they become None)."""

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


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header
_PREFIX_BYTES = 64 << 20  # data.pkl (the first member torch writes) is looked for in this much


def _pickle_record(prefix: bytes | bytearray) -> bytes | None:
    """The bytes of ``data.pkl`` when it is the zip's first member, stored, whole in ``prefix``."""
    if len(prefix) < _LOCAL_HEADER.size:
        return None
    sig, _, flags, method, _, _, _, csize, _, nlen, xlen = _LOCAL_HEADER.unpack_from(prefix)
    name = bytes(prefix[_LOCAL_HEADER.size:_LOCAL_HEADER.size + nlen]).decode("utf-8", "replace")
    start = _LOCAL_HEADER.size + nlen + xlen
    if sig != 0x04034B50 or method != 0 or flags & 0x08 or csize == 0xFFFFFFFF or not (
            name == "data.pkl" or name.endswith("/data.pkl")) or len(prefix) < start + csize:
        return None
    return bytes(prefix[start:start + csize])


def _pickle_from_zip(f) -> bytes | None:
    """``data.pkl`` read by random access (the zip's directory), or None when it has none."""
    with zipfile.ZipFile(f) as z:
        name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        return z.read(name) if name is not None else None


def read_checkpoint_header(
    path_or_uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
) -> CheckpointHeader:
    """Read a checkpoint's :class:`CheckpointHeader` in one streaming pass over its bytes (hashed
    as they come; the opts unpickled from the zip's ``data.pkl`` with every tensor left out), from a
    local path or any fsspec URI. A legacy (pre-zip) torch file is loaded whole, with
    ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file. CheckpointError: a directory, or not a torch checkpoint.
    """
    uri = os.fspath(path_or_uri)
    fs, path = filesystem_for(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
    if fs.isdir(path):
        raise CheckpointError(f"checkpoint {uri!r} is a directory (prefix), not a checkpoint file: give the "
                              "path of the .pt file itself")
    h, size, prefix, record = hashlib.sha256(), 0, bytearray(), None
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            size += len(chunk)
            if record is None and len(prefix) < _PREFIX_BYTES:
                prefix += chunk
                record = _pickle_record(prefix)
    if record is None and bytes(prefix[:4]) == b"PK\x03\x04":
        with fs.open(path, "rb") as f:  # an unusual zip layout: its directory says where data.pkl is
            try:
                record = _pickle_from_zip(f)
            except zipfile.BadZipFile:
                record = None
    if record is not None:
        try:
            top = _OptsUnpickler(io.BytesIO(record)).load()
        except Exception as e:
            raise CheckpointError(f"checkpoint {uri!r}: its data.pkl cannot be read ({e})") from None
    else:  # legacy torch format (no zip): only a full load says what it holds
        top, _ = read_checkpoint(uri, storage_options)
    if isinstance(top, Mapping):
        opts = top.get("opts")
        return CheckpointHeader(uri, h.hexdigest(), size, dict(opts) if isinstance(opts, Mapping) else None,
                                tuple(str(k) for k in top))
    return CheckpointHeader(uri, h.hexdigest(), size, None, ())


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _weights_only_message(name: str, error: Exception) -> str:
    """Explain a ``weights_only=True`` refusal with torch's own "Unsupported global" line and
    advice that fits the refused global (never by loading with ``weights_only=False``)."""
    text = _ANSI.sub("", str(error))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "Unsupported global" in ln), None)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    glob = match.group(1) if match else None
    head = f"checkpoint {name!r} cannot be loaded safely with weights_only=True"
    if detail is not None:
        head += f": it pickles a Python object that is not a tensor or plain container ({detail.split(' was not')[0]})"
    else:
        head += f" ({lines[-1] if lines else type(error).__name__})"
    resave = "If you trust the file, re-save it without that object: ckpt = torch.load(path, weights_only=False); "
    if glob == "argparse.Namespace":
        advice = (
            "The opts were saved as an argparse.Namespace. " + resave
            + "ckpt['opts'] = vars(ckpt['opts']); torch.save(ckpt, path)."
        )
    elif glob is not None and glob.startswith("numpy"):
        advice = (
            f"It holds numpy values ({glob}), e.g. numpy scalars in opts or a numpy latent_avg. " + resave
            + "convert them: scalars with v.item(), arrays with torch.from_numpy(a) (e.g. "
            "ckpt['opts'] = {k: (v.item() if isinstance(v, numpy.generic) else v) for k, v in ckpt['opts'].items()}); "
            "then torch.save(ckpt, path)."
        )
    elif glob is not None:
        advice = (
            resave + f"replace the {glob} object by a dict/list/str/number (or tensor); then torch.save(ckpt, path). "
            f"Or, if you trust {glob}, allowlist it before loading: torch.serialization.add_safe_globals([{glob}])."
        )
    else:
        advice = (
            "If you trust the file, re-save it holding only tensors and plain containers "
            "(dict, list, tuple, str, int, float, bool, None)."
        )
    return f"{head}. {advice}"


def _weights_output_size(state: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(output_size, number of to_rgbs layers)`` implied by a pSp state dict's decoder keys."""
    idx = {k.split(".")[2] for k in state if isinstance(k, str) and k.startswith("decoder.to_rgbs.")}
    if not idx:
        return None
    return 2 ** (len(idx) + 2), len(idx)


def _split_prefix(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _state_problems(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Differences between ``state`` and ``module.state_dict()``: missing/unexpected keys, shapes."""
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in state]
    unexpected = [prefix + k for k in state if k not in expected]
    mismatched = [
        f"{prefix}{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]

    def show(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {show(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {show(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {show(mismatched)}")
    return problems


def _assign_state(module: nn.Module, state: Mapping[str, torch.Tensor], device: str | torch.device) -> None:
    """Load a checked ``state`` into ``module`` (built on the meta device) by assignment.

    For a CPU model each tensor is copied once out of the memory-mapped file, so the model does
    not depend on the file staying unchanged on disk; other devices copy in ``.to(device)``.
    """
    expected = module.state_dict()
    copy_now = torch.device(device).type == "cpu"
    converted = {}
    for k, v in state.items():
        if v.dtype != expected[k].dtype:
            v = v.to(expected[k].dtype)
        elif copy_now:
            v = v.clone()
        converted[k] = v
    module.load_state_dict(converted, strict=True, assign=True)


def _opts_and_state(ckpt: Any, uri: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """A checkpoint's raw opts and state dict (the `module.` prefix stripped when every key has
    it), or CheckpointError saying what the file is instead."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"checkpoint {uri!r} holds a {type(ckpt).__name__}, not a dict: expected a pSp/e4e/ReStyle checkpoint "
            "{'state_dict', 'opts', 'latent_avg'}"
        )
    if "state_dict" not in ckpt:
        what = "is a StyleGAN2 generator checkpoint ('g_ema')" if "g_ema" in ckpt else "has no 'state_dict'"
        raise CheckpointError(f"checkpoint {uri!r} {what}, not a pSp model: load it with load_stylegan2(path)")
    opts = ckpt.get("opts")
    if not isinstance(opts, Mapping):
        raise CheckpointError(
            f"checkpoint {uri!r} has no 'opts' dict (found {type(opts).__name__}): pSp checkpoints store "
            "the training options, which name the encoder type, input channels and output size"
        )
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {uri!r}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        # Saved from an nn.DataParallel / DistributedDataParallel wrapper. Stripped only when EVERY
        # key carries the prefix (then nothing is ambiguous); a partial prefix is an error later.
        logger.info("checkpoint %s: stripping the 'module.' prefix (DataParallel) from every key", uri)
        state = {k[len("module.") :]: v for k, v in state.items()}
    return opts, state


def _check_output_size(uri: str, opts: Mapping[str, Any], state: Mapping[str, Any], size_key: str) -> None:
    """CheckpointError when the opts' output size (1024 when absent, the legacy default)
    contradicts the decoder weights, with how to fix the file."""
    implied = _weights_output_size(state)
    stated = opts.get(size_key)
    if implied is None or int(stated if stated is not None else 1024) == implied[0]:
        return
    size, n_rgb = implied
    if stated is None:
        raise CheckpointError(
            f"checkpoint {uri!r} has no opts[{size_key!r}], so it is read as 1024 (the legacy default "
            "of the reference scripts, right for the released 1024 px models), but its decoder weights "
            f"are for {size_key} {size} ({n_rgb} decoder.to_rgbs layers): set opts[{size_key!r}] = {size} "
            f"and re-save: ckpt = torch.load(path, weights_only=True); ckpt['opts'][{size_key!r}] = {size}; "
            "torch.save(ckpt, path)"
        )
    raise CheckpointError(
        f"checkpoint {uri!r}: its opts say {size_key}={stated} but its decoder weights are for {size_key} "
        f"{size} ({n_rgb} decoder.to_rgbs layers): fix opts[{size_key!r}] (and opts['n_styles'] if present) "
        "and re-save the checkpoint"
    )


def _latent_avg_for(latent_avg: Any, opts: Mapping[str, Any], family: str, uri: str) -> torch.Tensor | None:
    """The checkpoint's `latent_avg` as the model uses it (checked against the opts), or
    CheckpointError when the model needs one and the file has none."""
    n_styles = n_styles_for(int(opts["output_size"]))
    if family.startswith("restyle"):
        # ReStyle's first iteration always starts from latent_avg, whatever start_from_latent_avg says.
        if latent_avg is None:
            raise CheckpointError(
                f"checkpoint {uri!r} is a ReStyle checkpoint without 'latent_avg', which its first "
                "iteration starts from: re-save it with the generator's average latent, ckpt['latent_avg'] "
                "= decoder.mean_latent(100000)[0]"
            )
        return _check_latent_avg(latent_avg, opts, n_styles, uri)
    if not opts["start_from_latent_avg"]:
        # The original ignores latent_avg then: keep a tensor (unused), whatever its shape.
        if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
            logger.warning("checkpoint %s: ignoring a non-tensor 'latent_avg' (%s)", uri, type(latent_avg).__name__)
            return None
        return None if latent_avg is None else latent_avg.detach().float().clone()
    if latent_avg is None:
        raise CheckpointError(
            f"checkpoint {uri!r} was trained with start_from_latent_avg but has no 'latent_avg': "
            "re-save it with the generator's average latent, ckpt['latent_avg'] = "
            "decoder.mean_latent(100000)[0] (the original crashes on such files, pSp issue #271)"
        )
    return _check_latent_avg(latent_avg, opts, n_styles, uri)


def _build_model(family: str, opts: Mapping[str, Any], state: Mapping[str, Any], device, uri: str,
                 hint_size: str) -> PSP:
    """The family's model with `state` assigned on `device` (built on the meta device first, so
    nothing is initialised twice); CheckpointError listing every key/shape problem."""
    with torch.device("meta"):
        net = _MODEL_CLASSES[family](opts)
    hint = f" ({family} opts: encoder_type={opts['encoder_type']}, input_nc={opts['input_nc']}, {hint_size})"
    halves = {name: _split_prefix(state, name) for name in ("encoder", "decoder")}
    problems = [p for name, part in halves.items() for p in _state_problems(getattr(net, name), part, name + ".")]
    if problems:
        prefixed = sum(1 for k in state if isinstance(k, str) and k.startswith("module."))
        if prefixed:
            problems.append(
                f"{prefixed} of {len(state)} keys start with 'module.' (an nn.DataParallel wrapper's prefix): "
                "strip it from those keys, ckpt['state_dict'] = {k.removeprefix('module.'): v for k, v in "
                "ckpt['state_dict'].items()}, and re-save (load_psp strips it itself only when every key has it)"
            )
        raise CheckpointError(
            f"checkpoint {uri!r} does not match the architecture its opts describe{hint}: " + "; ".join(problems)
        )
    for name, part in halves.items():
        _assign_state(getattr(net, name), part, device)
    return net


def load_psp(
    path_or_uri: str | os.PathLike,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    n_iters: int | None = None,
) -> PSP:
    """Load a pSp, e4e or ReStyle checkpoint in its official format, in eval mode on ``device``.

    Args:
        path_or_uri: local path or fsspec URI (``s3://``, ``gs://``, ``file://``, ``memory://``).
        device: where the model runs (the checkpoint's stored ``opts['device']`` is ignored).
        storage_options: passed to fsspec for remote URIs (e.g. ``{"endpoint_url": ...}``).
        n_iters: ReStyle's refinement steps (default 5, as its inference script); other
            families run one encoder pass and accept only None or 1.

    Returns:
        :class:`PSP` for pSp files, :class:`E4E` for e4e, :class:`ReStyle` for ReStyle (its
        ``avg_image`` computed, except on the meta device); all with ``family``, ``n_iters``,
        ``encode``, ``decode`` and ``mix``. A benchmark's zero-time stand-in file
        (``psp_core.zero_time.write_zero_time_checkpoint``) loads as a ``ZeroTimeModel``.

    Beyond the original loader: a state dict whose keys ALL start with ``module.`` (saved from
    an ``nn.DataParallel`` wrapper) is loaded with the prefix stripped; ``latent_avg`` is ignored
    (kept, unused) when ``start_from_latent_avg`` is off, as the original ignores it; a W encoder
    trained without ``--learn_in_w`` (``latent_avg [n_styles, 512]``) is accepted.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a pSp checkpoint (with what to do), a directory, a file that needs
            ``weights_only=False`` (never used: the message names the refused object and how to
            re-save), opts that contradict the weights (e.g. legacy opts without
            ``output_size`` on a non-1024 model), or keys/shapes that do not match.
    """
    uri = os.fspath(path_or_uri)
    ckpt, sha = read_checkpoint(uri, storage_options)
    raw_opts, state = _opts_and_state(ckpt, uri)
    if raw_opts.get(ZERO_TIME_KEY) is True:  # a benchmark's stand-in file (psp_core.zero_time)
        logger.warning("checkpoint %s is a zero-time stand-in (no weights, constant W+): benchmarks only", uri)
        return ZeroTimeModel(int(raw_opts["output_size"]), sha, int(raw_opts.get("input_nc", 3)))
    family = checkpoint_family(raw_opts)
    size_key = "stylegan_size" if family == "e4e" else "output_size"
    _check_output_size(uri, raw_opts, state, size_key)
    try:
        opts = model_opts(raw_opts)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {uri!r}: {e}") from None
    restyle = family.startswith("restyle")
    if n_iters is not None and not restyle and n_iters != 1:
        raise CheckpointError(
            f"n_iters={n_iters}: only ReStyle checkpoints refine iteratively; {uri!r} is a {family} "
            "checkpoint (one encoder pass): leave n_iters unset"
        )
    if n_iters is not None:
        check_n_iters(n_iters)
    latent_avg = _latent_avg_for(ckpt.get("latent_avg"), opts, family, uri)

    net = _build_model(family, opts, state, device, uri,
                       hint_size=f"{size_key}={opts['output_size']}"
                       f"{' [legacy default]' if size_key not in raw_opts else ''}")
    net.latent_avg = latent_avg
    net.checkpoint_sha256 = sha
    net.checkpoint_path = uri
    logger.debug(
        "loaded %s %s: %s, input_nc %d, output %d, sha256 %s",
        family, uri, opts["encoder_type"], net.input_nc, net.output_size, sha,
    )
    net = net.to(device).eval()
    if restyle:
        net.n_iters = DEFAULT_N_ITERS if n_iters is None else n_iters
        if torch.device(device).type != "meta":
            net.set_avg_image()
    return net


def _check_latent_avg(latent_avg: Any, opts: Mapping[str, Any], n_styles: int, uri: str) -> torch.Tensor:
    if not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"checkpoint {uri!r}: 'latent_avg' is a {type(latent_avg).__name__}, expected a tensor")
    shape = tuple(latent_avg.shape)
    # A W encoder trained with --learn_in_w has [1, 512]; without it the coach repeats the average
    # to [n_styles, 512] (the W code then becomes W+; see PSP._encode_raw).
    w_learn = opts["encoder_type"] in W_ENCODERS and opts["learn_in_w"] and "stylegan_size" not in opts
    ok = {(STYLE_DIM,), (1, STYLE_DIM)} if w_learn else {(STYLE_DIM,), (1, STYLE_DIM), (n_styles, STYLE_DIM)}
    if shape not in ok:
        extra = (
            f" (a W encoder trained with --learn_in_w has one row; [{n_styles}, 512] belongs to one trained "
            "without it: set opts['learn_in_w'] = False if that is the case)"
            if w_learn and shape == (n_styles, STYLE_DIM) else ""
        )
        raise CheckpointError(
            f"checkpoint {uri!r}: 'latent_avg' has shape {list(shape)}; expected one of "
            f"{sorted(list(s) for s in ok)} for {opts['encoder_type']}"
            f"{' with learn_in_w' if w_learn else ''} at output_size {opts['output_size']}{extra}"
        )
    return latent_avg.detach().float().clone()


def load_stylegan2(
    path_or_uri: str | os.PathLike,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> Generator:
    """Load a rosinality StyleGAN2 checkpoint (``{'g_ema': ..., 'latent_avg': [512]}``, as written
    by its ``convert_weight.py``; ``train.py`` files too if they hold no pickled objects).

    The size, style dim, mapping depth and channel multiplier are read from the weights.
    The returned ``Generator`` (eval mode) carries ``latent_avg`` (``[512]`` tensor or None) and
    ``checkpoint_sha256``.
    """
    uri = os.fspath(path_or_uri)
    ckpt, sha = read_checkpoint(uri, storage_options)
    if not isinstance(ckpt, Mapping) or "g_ema" not in ckpt:
        what = "a pSp checkpoint ('state_dict'): use load_psp" if isinstance(ckpt, Mapping) and "state_dict" in ckpt else (
            f"keys {sorted(ckpt)[:8]}" if isinstance(ckpt, Mapping) else f"a {type(ckpt).__name__}"
        )
        raise CheckpointError(f"checkpoint {uri!r} has no 'g_ema' generator weights ({what})")
    state = ckpt["g_ema"]
    try:
        n_rgb = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
        size = 2 ** (n_rgb + 2)
        style_dim = state["style.1.weight"].shape[1]
        n_mlp = len({k.split(".")[1] for k in state if k.startswith("style.")})
        channel_multiplier = 2
        if size >= 64:
            # to_rgbs.j sits at resolution 2**(j+3); channels[64] = 256 * channel_multiplier.
            channel_multiplier = state["to_rgbs.3.conv.weight"].shape[2] // 256
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"checkpoint {uri!r}: 'g_ema' is not a rosinality StyleGAN2 generator ({e!r} missing)") from None
    with torch.device("meta"):
        gen = Generator(size, style_dim, n_mlp, channel_multiplier=channel_multiplier)
    problems = _state_problems(gen, state)
    if problems:
        raise CheckpointError(f"checkpoint {uri!r}: 'g_ema' does not match a StyleGAN2 generator of size {size}: " + "; ".join(problems))
    _assign_state(gen, state, device)
    latent_avg = ckpt.get("latent_avg")
    gen.latent_avg = latent_avg.detach().float().clone() if isinstance(latent_avg, torch.Tensor) else None
    gen.checkpoint_sha256 = sha
    gen = gen.to(device).eval()
    if gen.latent_avg is not None:
        gen.latent_avg = gen.latent_avg.to(device)
    return gen
