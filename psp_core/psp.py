"""pSp (pixel2style2pixel): an IR-SE50 encoder into StyleGAN2's W+, plus checkpoint loading.

``load_psp`` reads the released ``psp_*.pt`` files unchanged (``{'state_dict', 'opts',
'latent_avg'}``) from a local path or any fsspec URI, applies the reference scripts' legacy opts
defaults, ignores the stored ``opts['device']`` and loads both halves strictly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from psp_core.encoders import ENCODER_TYPES, build_encoder
from psp_core.stylegan2 import Generator

__all__ = [
    "CheckpointError",
    "PSP",
    "load_psp",
    "load_stylegan2",
    "n_styles_for",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

STYLE_DIM = 512
ENCODER_INPUT_SIZE = 256
W_ENCODERS = ("BackboneEncoderUsingLastLayerIntoW",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as asked; the message says what to do instead."""


def n_styles_for(output_size: int) -> int:
    """Number of W+ style vectors for a generator of ``output_size``: ``2*log2(size) - 2``."""
    return int(math.log(output_size, 2)) * 2 - 2


class PSP(nn.Module):
    """The pSp network: ``encoder`` (IR-SE50 variant), ``decoder`` (StyleGAN2 ``Generator``) and
    ``face_pool`` (``AdaptiveAvgPool2d((256, 256))``).

    Args:
        opts: the checkpoint's opts (plain dict). Used keys: ``encoder_type``, ``input_nc``,
            ``output_size``, ``start_from_latent_avg``, ``learn_in_w`` (legacy defaults applied).
        latent_avg: ``[512]``, ``[1, 512]`` or ``[n_styles, 512]``, or None.
    """

    def __init__(self, opts: Mapping[str, Any], latent_avg: torch.Tensor | None = None):
        super().__init__()
        self.opts = _normalise_opts(dict(opts))
        self.output_size = int(self.opts["output_size"])
        self.n_styles = n_styles_for(self.output_size)
        self.input_nc = int(self.opts["input_nc"])
        self.encoder_type = self.opts["encoder_type"]
        self.encoder = build_encoder(self.encoder_type, input_nc=self.input_nc, n_styles=self.n_styles)
        self.decoder = Generator(self.output_size, STYLE_DIM, 8)
        self.face_pool = nn.AdaptiveAvgPool2d((256, 256))
        self.latent_avg = latent_avg
        self.checkpoint_sha256: str | None = None
        self.checkpoint_path: str | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.decoder.input.input.device

    @property
    def start_from_latent_avg(self) -> bool:
        return bool(self.opts["start_from_latent_avg"])

    def _apply(self, fn, recurse=True):  # keep latent_avg (a plain attribute) on the module's device
        super()._apply(fn, recurse)
        if self.latent_avg is not None:
            self.latent_avg = fn(self.latent_avg)
        return self

    # -- the original forward -----------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        resize: bool = True,
        latent_mask: Sequence[int] | None = None,
        input_code: bool = False,
        randomize_noise: bool = True,
        inject_latent: torch.Tensor | None = None,
        return_latents: bool = False,
        alpha: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reference ``pSp.forward`` (spec §2.5).

        Args:
            x: images ``[B, input_nc, 256, 256]`` (float, the model's dtype), or with
                ``input_code=True`` Z codes ``[B, 512]`` (mapped by the decoder's mapping network).
            resize: average-pool the output to 256x256 (``face_pool``).
            latent_mask: indices into dim 1 of the code, exactly as the original: for a W+ code
                ``[B, n_styles, 512]`` they name styles; for a 2-D code ``[B, 512]`` (a
                ``BackboneEncoderUsingLastLayerIntoW`` trained with ``--learn_in_w``, or Z with
                ``input_code=True``) they name W (or Z) *dimensions*. The named entries are
                replaced by ``inject_latent`` (mixed by ``alpha`` when given) or, without
                ``inject_latent``, zeroed. To mix *styles* of a W encoder use :meth:`mix`.
            inject_latent: ``[B or 1, n_styles, 512]`` for a W+ code (``[B or 1, 512]`` for a
                2-D code; a W+ ``inject_latent`` on a 2-D code raises ValueError, where the
                original fails with a shape error).
            return_latents: also return the decoder's W+ ``[B, n_styles, 512]``.

        Returns:
            images ``[B, 3, H, W]`` (H = 256 if ``resize`` else ``output_size``), or
            ``(images, latents)``.

        Deviations from the original, outputs unchanged: the mask is applied to a copy (the
        original writes into ``codes`` in place, which with ``input_code=True`` is the caller's
        tensor); bad mask indices, dtypes and shapes raise ValueError before any work. A W
        encoder trained without ``--learn_in_w`` (``latent_avg [n_styles, 512]``) gives
        ``codes.unsqueeze(1) + latent_avg`` (W+) at any batch size; the original gives the same
        at B=1 and fails (or, at B = n_styles, mixes rows across the batch) otherwise.
        """
        mask = None
        if input_code:
            self._check_dtype(x, "x (a Z code, input_code=True)")
            code_shape = tuple(x.shape)
        else:
            self._check_input(x)
            code_shape = (x.shape[0], self.n_styles, STYLE_DIM) if self._code_is_w_plus() else (x.shape[0], STYLE_DIM)
        if latent_mask is not None:  # checked before the (costly) encoder runs
            mask = self._check_forward_mask(code_shape, latent_mask, inject_latent, input_code)
        codes = x if input_code else self._encode_raw(x)
        if mask is not None:
            codes = self._apply_latent_mask(codes, mask, inject_latent, alpha)
        images, latents = self.decoder(
            [codes],
            input_is_latent=not input_code,
            randomize_noise=randomize_noise,
            return_latents=return_latents,
        )
        if resize:
            images = self.face_pool(images)
        if return_latents:
            return images, latents
        return images

    # -- convenience API ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, input_nc, 256, 256]`` -> W+ ``[B, n_styles, 512]`` (``latent_avg`` added
        when ``start_from_latent_avg``; a W encoder's code ``[B, 512]`` is repeated over the
        styles -- what the decoder does with it -- so every encoder type gives W+ here).
        """
        codes = self._encode_raw(x)
        if codes.ndim == 2:
            codes = codes.unsqueeze(1).repeat(1, self.n_styles, 1)
        return codes

    def decode(
        self, w_plus: torch.Tensor, resize: bool = True, randomize_noise: bool = False
    ) -> torch.Tensor:
        """W+ ``[B, n_styles, 512]`` -> images ``[B, 3, H, W]`` (about [-1, 1], not clamped);
        H = 256 with ``resize`` (box mean / pixel replication), else ``output_size``.
        """
        if w_plus.ndim != 3 or tuple(w_plus.shape[1:]) != (self.n_styles, STYLE_DIM):
            raise ValueError(
                f"w_plus has shape {tuple(w_plus.shape)}: expected [B, {self.n_styles}, {STYLE_DIM}] "
                f"for this {self.output_size}px model"
            )
        images, _ = self.decoder([w_plus], input_is_latent=True, randomize_noise=randomize_noise)
        if resize:
            images = self.face_pool(images)
        return images

    def mix(
        self,
        x: torch.Tensor,
        n_outputs: int,
        latent_mask: Sequence[int],
        mix_alpha: float | None = None,
        seed: int | Sequence[int] = 0,
        resize: bool = True,
        randomize_noise: bool = False,
        *,
        w_plus: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Style mixing (multi-modal synthesis) as in the reference ``style_mixing.py``, seeded.

        For sample b, ``n_outputs`` z vectors ``[n_outputs, 512]`` are drawn from
        ``torch.Generator().manual_seed(seed_b)`` (on CPU, so results do not depend on the device
        or on the other rows of the batch); their W replaces (or, with ``mix_alpha``, is blended
        into) the styles in ``latent_mask`` of the sample's own W+.

        Args:
            x: ``[B, input_nc, 256, 256]``.
            seed: one int used for every sample, or a list of B ints (one per sample).
            w_plus: ``encode(x)`` when the caller already has it ``[B, n_styles, 512]``: the
                encoder is not run again (``x`` may then be None).

        Works on W+ for every encoder type: a W encoder's code is repeated over the styles first
        (our documented extension; the original's ``forward`` cannot inject into a W code).

        Returns:
            ``(images [B, n_outputs, 3, H, W], w_plus [B, n_outputs, n_styles, 512])``.
        """
        mask = self._check_latent_mask(latent_mask)
        if n_outputs < 1:
            raise ValueError(f"n_outputs={n_outputs}: expected >= 1")
        codes = self.encode(x) if w_plus is None else w_plus  # [B, n, 512]
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (self.n_styles, STYLE_DIM):
            raise ValueError(f"w_plus has shape {tuple(codes.shape)}: expected [B, {self.n_styles}, {STYLE_DIM}]")
        batch = codes.shape[0]
        seeds = [int(seed)] * batch if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"seed has {len(seeds)} values for a batch of {batch}: give one int or B ints")
        z = torch.stack(
            [torch.randn(n_outputs, STYLE_DIM, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device=codes.device, dtype=codes.dtype)  # [B, n_outputs, 512]
        # == forward(z, input_code=True, return_latents=True)'s W, without running the synthesis.
        inject = self.decoder.get_latent(z.reshape(-1, STYLE_DIM)).reshape(batch, n_outputs, STYLE_DIM)
        mixed = codes.unsqueeze(1).repeat(1, n_outputs, 1, 1)  # [B, n_outputs, n, 512]
        for i in mask:
            if mix_alpha is not None:
                mixed[:, :, i] = mix_alpha * inject + (1 - mix_alpha) * mixed[:, :, i]
            else:
                mixed[:, :, i] = inject
        images = self.decode(
            mixed.reshape(batch * n_outputs, self.n_styles, STYLE_DIM),
            resize=resize,
            randomize_noise=randomize_noise,
        )
        return images.reshape(batch, n_outputs, *images.shape[1:]), mixed

    # -- helpers ------------------------------------------------------------------------------
    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output plus ``latent_avg``: W+ ``[B, n_styles, 512]``, or W ``[B, 512]`` for a W
        encoder with a one-row ``latent_avg`` (``--learn_in_w``)."""
        self._check_input(x)
        codes = self.encoder(x)
        if self.start_from_latent_avg:
            if self.latent_avg is None:
                raise CheckpointError(
                    "start_from_latent_avg is set but the model has no latent_avg: load a checkpoint "
                    "that has 'latent_avg' or set opts['start_from_latent_avg'] = False"
                )
            avg = self.latent_avg.to(codes.dtype)
            if codes.ndim == 3:
                # Broadcast equivalent of the original's latent_avg.repeat(B, 1, 1).
                codes = codes + avg.reshape(1, -1, STYLE_DIM)
            elif avg.ndim == 2 and avg.shape[0] == self.n_styles:
                # W encoder trained without --learn_in_w (the coach repeats latent_avg to
                # [n_styles, 512]): W -> W+. Equals the original at B=1, where it works.
                codes = codes.unsqueeze(1) + avg.unsqueeze(0)
            else:
                # --learn_in_w: the original's latent_avg.repeat(B, 1).
                codes = codes + avg.reshape(1, STYLE_DIM)
        return codes

    def _check_dtype(self, x: torch.Tensor, name: str) -> None:
        expected = self.decoder.input.input.dtype
        if x.dtype == expected:
            return
        cast = "x.float()" if expected == torch.float32 else f"x.to({expected})"
        if x.dtype == torch.uint8:
            hint = (
                "a uint8 image is not a model input: use the task's transform "
                "(psp_core.get_task(dataset_type).transform(pil_image)), which gives float32 "
                "[C, 256, 256] normalised as the checkpoint was trained"
            )
        elif not x.is_floating_point():
            hint = (
                "an integer tensor (a one-hot or label map?) is not a model input: segmentation "
                "checkpoints take a one-hot float map [B, label_nc, 256, 256], as the task's "
                f"transform gives; convert a one-hot tensor with {cast}"
            )
        else:
            hint = f"convert it with {cast} (or move the model to that dtype)"
        raise ValueError(f"{name} has dtype {x.dtype} but the model's weights are {expected}: {hint}")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"input has shape {tuple(x.shape)}: expected [B, {self.input_nc}, 256, 256]")
        if x.shape[1] != self.input_nc:
            raise ValueError(
                f"input has {x.shape[1]} channels but this checkpoint ({self.opts.get('dataset_type')}) "
                f"expects input_nc={self.input_nc}: use the task's transform for this checkpoint"
            )
        if tuple(x.shape[2:]) != (ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE):
            raise ValueError(
                f"input is {x.shape[2]}x{x.shape[3]}: the pSp encoder needs 256x256 inputs "
                "(align/resize the image to 256x256 first)"
            )
        self._check_dtype(x, "input")

    def _code_is_w_plus(self) -> bool:
        """Whether ``_encode_raw`` gives W+ ``[B, n_styles, 512]`` (else W ``[B, 512]``)."""
        if self.encoder_type not in W_ENCODERS:
            return True
        avg = self.latent_avg
        return bool(
            self.start_from_latent_avg and avg is not None and avg.ndim == 2 and avg.shape[0] == self.n_styles
        )

    def _check_forward_mask(
        self,
        code_shape: tuple[int, ...],
        latent_mask: Sequence[int],
        inject_latent: torch.Tensor | None,
        input_code: bool,
    ) -> list[int]:
        """Check that the original's ``codes[:, i] = ...`` loop can run on codes of ``code_shape``."""
        mask = [int(i) for i in latent_mask]
        if len(code_shape) == 2:
            what = "Z dimensions (input_code=True)" if input_code else (
                "W dimensions (this W encoder's code is W [B, 512]; to mix styles use PSP.mix)"
            )
        else:
            what = "styles"
        size = code_shape[1]
        bad = [i for i in mask if not -size <= i < size]
        if bad:
            raise ValueError(f"latent_mask {mask} has indices {bad} outside 0..{size - 1}: they name {what}")
        if inject_latent is None:
            return mask
        fits = f"[B or 1, {', '.join(str(d) for d in code_shape[1:])}]"
        if len(code_shape) == 2 and inject_latent.ndim != 2:
            raise ValueError(
                f"inject_latent has shape {tuple(inject_latent.shape)} but the code it is injected into is "
                f"2-D {tuple(code_shape)}, so latent_mask names {what}; the original pSp fails here "
                "(a [B] <- [1, 512] assignment). To mix styles of a W encoder use "
                "PSP.mix(x, n_outputs, latent_mask), which works on W+, or use a W+ encoder checkpoint"
            )
        if inject_latent.ndim < 2 or not all(-inject_latent.shape[1] <= i < inject_latent.shape[1] for i in mask):
            raise ValueError(f"inject_latent has shape {tuple(inject_latent.shape)}: expected {fits} to inject entries {mask}")
        dst, src = (code_shape[0], *code_shape[2:]), (inject_latent.shape[0], *inject_latent.shape[2:])
        try:
            ok = torch.broadcast_shapes(dst, src) == dst
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"inject_latent has shape {tuple(inject_latent.shape)}, which does not fit codes of shape "
                f"{tuple(code_shape)}: expected {fits}"
            )
        return mask

    @staticmethod
    def _apply_latent_mask(
        codes: torch.Tensor, mask: list[int], inject_latent: torch.Tensor | None, alpha: float | None
    ) -> torch.Tensor:
        """The original's ``codes[:, i] = ...`` loop, on a copy."""
        codes = codes.clone()
        if inject_latent is not None:
            inject_latent = inject_latent.to(device=codes.device, dtype=codes.dtype)
        for i in mask:
            if inject_latent is not None:
                if alpha is not None:
                    codes[:, i] = alpha * inject_latent[:, i] + (1 - alpha) * codes[:, i]
                else:
                    codes[:, i] = inject_latent[:, i]
            else:
                codes[:, i] = 0
        return codes

    def _check_latent_mask(self, latent_mask: Sequence[int]) -> list[int]:
        mask = [int(i) for i in latent_mask]
        bad = [i for i in mask if not 0 <= i < self.n_styles]
        if bad:
            raise ValueError(
                f"latent_mask {mask} has indices {bad} outside 0..{self.n_styles - 1} "
                f"(this model has {self.n_styles} styles)"
            )
        return mask


# ---------------------------------------------------------------------------------------------
# Loading


def _normalise_opts(opts: dict[str, Any]) -> dict[str, Any]:
    # The reference scripts' legacy defaults (the released files lack these keys).
    opts.setdefault("output_size", 1024)
    opts.setdefault("learn_in_w", False)
    opts.setdefault("encoder_type", "GradualStyleEncoder")
    opts.setdefault("input_nc", 3)
    opts.setdefault("start_from_latent_avg", False)
    opts.pop("device", None)  # stored as 'cuda:0'; the device is chosen at load time
    if opts["encoder_type"] not in ENCODER_TYPES:
        raise CheckpointError(
            f"opts['encoder_type']={opts['encoder_type']!r} is not a pSp encoder: "
            f"expected one of {sorted(ENCODER_TYPES)}"
        )
    size = int(opts["output_size"])
    if size < 8 or 2 ** int(math.log2(size)) != size:
        raise CheckpointError(f"opts['output_size']={size}: expected a power of two such as 256 or 1024")
    if "n_styles" in opts and opts["n_styles"] is not None and int(opts["n_styles"]) != n_styles_for(size):
        raise CheckpointError(
            f"opts['n_styles']={opts['n_styles']} does not match output_size {size} "
            f"({n_styles_for(size)} styles)"
        )
    return opts


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _sha256_file(path: str) -> str:
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
    if _is_local(uri):
        local = uri[len("file://") :] if uri.startswith("file://") else uri
        if not os.path.exists(local):
            raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
        if os.path.isdir(local):
            found = sorted(n for n in os.listdir(local) if n.endswith((".pt", ".pth", ".ckpt")))
            raise CheckpointError(
                f"checkpoint {uri!r} is a directory, not a checkpoint file: give the path of the .pt "
                "file itself" + (f" (this directory holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''})" if found else "")
            )
        return _torch_load(local, uri), _sha256_file(local)

    import fsspec  # checkpoint loading is the one place psp_core touches fsspec

    with tempfile.TemporaryDirectory(prefix="psp_ckpt_") as tmp:
        local = os.path.join(tmp, "checkpoint.pt")
        h = hashlib.sha256()
        try:
            with fsspec.open(uri, "rb", **dict(storage_options or {})) as src, open(local, "wb") as dst:
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


def load_psp(
    path_or_uri: str | os.PathLike,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> PSP:
    """Load a pSp checkpoint in the official format, in eval mode on ``device``.

    Args:
        path_or_uri: local path or fsspec URI (``s3://``, ``gs://``, ``file://``, ``memory://``).
        device: where the model runs (the checkpoint's stored ``opts['device']`` is ignored).
        storage_options: passed to fsspec for remote URIs (e.g. ``{"endpoint_url": ...}``).

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
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"checkpoint {uri!r} holds a {type(ckpt).__name__}, not a dict: expected a pSp checkpoint "
            "{'state_dict', 'opts', 'latent_avg'}"
        )
    if "state_dict" not in ckpt:
        if "g_ema" in ckpt:
            raise CheckpointError(
                f"checkpoint {uri!r} is a StyleGAN2 generator checkpoint ('g_ema'), not a pSp model: "
                "use load_stylegan2 / --decoder-only"
            )
        raise CheckpointError(
            f"checkpoint {uri!r} has no 'state_dict': is it a StyleGAN checkpoint? "
            "use load_stylegan2 / --decoder-only"
        )
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
        # key carries the prefix (then nothing is ambiguous); a partial prefix is an error below.
        logger.info("checkpoint %s: stripping the 'module.' prefix (DataParallel) from every key", uri)
        state = {k[len("module.") :]: v for k, v in state.items()}
    implied = _weights_output_size(state)
    stated = opts.get("output_size")
    if implied is not None and int(stated if stated is not None else 1024) != implied[0]:
        size, n_rgb = implied
        if stated is None:
            raise CheckpointError(
                f"checkpoint {uri!r} has no opts['output_size'], so it is read as 1024 (the legacy default "
                "of the reference scripts, right for the released 1024 px models), but its decoder weights "
                f"are for output_size {size} ({n_rgb} decoder.to_rgbs layers): set opts['output_size'] = {size} "
                f"and re-save: ckpt = torch.load(path, weights_only=True); ckpt['opts']['output_size'] = {size}; "
                "torch.save(ckpt, path)"
            )
        raise CheckpointError(
            f"checkpoint {uri!r}: its opts say output_size={stated} but its decoder weights are for output_size "
            f"{size} ({n_rgb} decoder.to_rgbs layers): fix opts['output_size'] (and opts['n_styles'] if present) "
            "and re-save the checkpoint"
        )
    latent_avg = ckpt.get("latent_avg")
    try:
        opts = _normalise_opts(dict(opts))
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {uri!r}: {e}") from None
    n_styles = n_styles_for(int(opts["output_size"]))
    if not opts["start_from_latent_avg"]:
        # The original ignores latent_avg then: keep a tensor (unused), whatever its shape.
        if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
            logger.warning("checkpoint %s: ignoring a non-tensor 'latent_avg' (%s)", uri, type(latent_avg).__name__)
            latent_avg = None
        elif latent_avg is not None:
            latent_avg = latent_avg.detach().float().clone()
    elif latent_avg is not None:
        latent_avg = _check_latent_avg(latent_avg, opts, n_styles, uri)
    else:
        raise CheckpointError(
            f"checkpoint {uri!r} was trained with start_from_latent_avg but has no 'latent_avg': "
            "re-save it with the generator's average latent, ckpt['latent_avg'] = "
            "decoder.mean_latent(100000)[0] (the original crashes on such files, pSp issue #271)"
        )

    with torch.device("meta"):
        net = PSP(opts)
    hint = (
        f" (opts: encoder_type={opts['encoder_type']}, input_nc={opts['input_nc']}, "
        f"output_size={opts['output_size']}{' [legacy default]' if 'output_size' not in ckpt['opts'] else ''})"
    )
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
    net.latent_avg = latent_avg
    net.checkpoint_sha256 = sha
    net.checkpoint_path = uri
    logger.debug(
        "loaded pSp %s: %s, input_nc %d, output %d, sha256 %s",
        uri, opts["encoder_type"], net.input_nc, net.output_size, sha,
    )
    return net.to(device).eval()


def _check_latent_avg(latent_avg: Any, opts: Mapping[str, Any], n_styles: int, uri: str) -> torch.Tensor:
    if not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"checkpoint {uri!r}: 'latent_avg' is a {type(latent_avg).__name__}, expected a tensor")
    shape = tuple(latent_avg.shape)
    # A W encoder trained with --learn_in_w has [1, 512]; without it the coach repeats the average
    # to [n_styles, 512] (the W code then becomes W+; see PSP._encode_raw).
    w_learn = opts["encoder_type"] in W_ENCODERS and opts["learn_in_w"]
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
