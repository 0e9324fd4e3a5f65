"""pSp (pixel2style2pixel): an IR-SE50 encoder into StyleGAN2's W+.

``PSP`` is also the interface every model family shares (e4e in ``psp_core.e4e``, ReStyle in
``psp_core.restyle``): ``encode(x) -> W+``, ``decode(w_plus)``, ``mix(...)``, ``family``,
``n_iters``. Checkpoints are read by ``psp_core.checkpoint.load_psp``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from psp_core.encoders import build_encoder
from psp_core.stylegan2 import Generator

__all__ = ["PSP", "encoder_input_size", "n_styles_for"]

logger = logging.getLogger(__name__)

STYLE_DIM = 512
ENCODER_INPUT_SIZE = 256
W_ENCODERS = ("BackboneEncoderUsingLastLayerIntoW",)


def n_styles_for(output_size: int) -> int:
    """Number of W+ style vectors for a generator of ``output_size``: ``2*log2(size) - 2``."""
    return int(math.log(output_size, 2)) * 2 - 2


def encoder_input_size(dataset_type: str | None) -> tuple[int, int]:
    """``(height, width)`` of the encoder's input: 192x256 for the cars checkpoints (their
    transforms resize to (192, 256)), 256x256 for every other task."""
    return (192, 256) if dataset_type == "cars_encode" else (ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE)


class PSP(nn.Module):
    """The pSp network: ``encoder`` (IR-SE50 variant), ``decoder`` (StyleGAN2 ``Generator``) and
    ``face_pool`` (``AdaptiveAvgPool2d((256, 256))``).

    Args:
        opts: the checkpoint's opts with the legacy defaults applied
            (``psp_core.checkpoint.model_opts``). Used keys: ``encoder_type``, ``input_nc``,
            ``output_size``, ``start_from_latent_avg``, ``learn_in_w``, ``dataset_type``.
        latent_avg: ``[512]``, ``[1, 512]`` or ``[n_styles, 512]``, or None.

    Attributes shared by every family: ``family`` ('psp', 'e4e', 'restyle_psp', 'restyle_e4e'),
    ``n_iters`` (encoder passes per image: 1 but for ReStyle), ``n_styles``, ``output_size``,
    ``input_nc`` (channels of the image ``encode`` takes), ``input_size`` ((H, W) it takes),
    ``latent_avg``, ``checkpoint_sha256``, ``checkpoint_path``.
    """

    family = "psp"
    n_iters = 1

    def __init__(self, opts: Mapping[str, Any], latent_avg: torch.Tensor | None = None):
        super().__init__()
        self.opts = dict(opts)
        self.opts.pop("device", None)  # stored as 'cuda:0'; the device is chosen at load time
        self.output_size = int(self.opts["output_size"])
        self.n_styles = n_styles_for(self.output_size)
        self.input_nc = int(self.opts["input_nc"])
        self.input_size = encoder_input_size(self.opts.get("dataset_type"))
        self.encoder_type = self.opts["encoder_type"]
        self.encoder = self._build_encoder()
        self.decoder = Generator(self.output_size, STYLE_DIM, 8)
        self.face_pool = nn.AdaptiveAvgPool2d((256, 256))
        self.latent_avg = latent_avg
        self.checkpoint_sha256: str | None = None
        self.checkpoint_path: str | None = None

    def _build_encoder(self) -> nn.Module:
        return build_encoder(self.encoder_type, input_nc=self.input_nc, n_styles=self.n_styles, family=self.family)

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
                raise ValueError(
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
        if tuple(x.shape[2:]) != self.input_size:
            h, w = self.input_size
            raise ValueError(
                f"input is {x.shape[2]}x{x.shape[3]}: this {self.family} encoder needs {h}x{w} inputs "
                f"(HxW; align/resize the image to {h}x{w} first: the task's transform does)"
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
