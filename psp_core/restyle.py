"""ReStyle: a residual encoder applied iteratively, over a pSp or an e4e encoder.

Iteration t encodes the input concatenated with the current reconstruction (6 channels) and adds
the result to the current W+: ``w_1 = E(x, avg_image) + latent_avg``, ``w_t = E(x, y_{t-1}) +
w_{t-1}``, ``y_t = G(w_t)``. ``avg_image`` is ``G(latent_avg)`` pooled to 256x256. Cars
checkpoints (``dataset_type='cars_encode'``, 512x512 generator, 192x256 inputs) keep rows
H/8 .. 7H/8 of every image (the 384x512 car inside the square output), as the original does, and
feed the next iteration that crop pooled to 192x256.

The checkpoint format is pSp's, with ``opts['input_nc'] = 6`` and ``opts['encoder_type']`` one of
``BackboneEncoder`` / ``ResNetBackboneEncoder`` / ``GradualStyleEncoder`` (family
``restyle_psp``) or ``ProgressiveBackboneEncoder`` / ``ResNetProgressiveBackboneEncoder``
(``restyle_e4e``). Load with ``psp_core.checkpoint.load_psp``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from psp_core.encoders import ENCODER_TYPES
from psp_core.psp import PSP, STYLE_DIM

__all__ = ["DEFAULT_N_ITERS", "ReStyle", "check_n_iters", "restyle_family"]

# scripts/inference_iterative.py's --n_iters_per_batch default.
DEFAULT_N_ITERS = 5


def restyle_family(encoder_type: str) -> str:
    """'restyle_e4e' for the progressive encoders, else 'restyle_psp'."""
    return "restyle_e4e" if encoder_type in ENCODER_TYPES["restyle_e4e"] else "restyle_psp"


class ReStyle(PSP):
    """The ReStyle network (``encoder``, ``decoder``, ``face_pool`` as in :class:`PSP`).

    ``input_nc`` is the image's channels (3; the encoder takes ``opts['input_nc']`` = 6),
    ``n_iters`` the number of refinement steps :meth:`encode` runs (default 5, settable), and
    ``avg_image`` ``[1, 3, H, W]`` the first iteration's reconstruction (set by the loader,
    :meth:`set_avg_image`).
    """

    def __init__(self, opts: Mapping[str, Any], latent_avg: torch.Tensor | None = None, n_iters: int = DEFAULT_N_ITERS):
        super().__init__(opts, latent_avg)
        self.encoder_input_nc = int(self.opts["input_nc"])
        self.input_nc = self.encoder_input_nc - 3
        self.n_iters = check_n_iters(n_iters)
        self.avg_image: torch.Tensor | None = None

    @property
    def family(self) -> str:  # type: ignore[override]
        return restyle_family(self.encoder_type)

    @property
    def crops_cars(self) -> bool:
        return self.opts.get("dataset_type") == "cars_encode"

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.avg_image is not None:
            self.avg_image = fn(self.avg_image)
        return self

    def _code_is_w_plus(self) -> bool:
        return True

    # -- the original's pieces ------------------------------------------------------------------
    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        """Cars: rows H/8 .. H - H/8 (the original's [64:448] at 512, [32:224] at 256)."""
        if not self.crops_cars:
            return images
        h = images.shape[2]
        return images[:, :, h // 8 : h - h // 8, :]

    @torch.no_grad()
    def set_avg_image(self) -> torch.Tensor:
        """Decode ``latent_avg`` (fixed noise), pool to 256x256 (cars: then crop to 192x256) and keep
        it as ``avg_image [1, 3, H, W]``; returns it."""
        if self.latent_avg is None:
            raise ValueError("ReStyle needs latent_avg (its first iteration starts from it); the model has none")
        avg = self.latent_avg.to(device=self.device, dtype=self.decoder.input.input.dtype)
        images, _ = self.decoder([avg.unsqueeze(0)], input_is_latent=True, randomize_noise=False)
        self.avg_image = self._crop(self.face_pool(images)).detach()
        return self.avg_image

    def forward(
        self,
        x: torch.Tensor,
        latent: torch.Tensor | None = None,
        resize: bool = True,
        randomize_noise: bool = True,
        return_latents: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One refinement step, the original ``forward``: ``x [B, 6, H, W]`` (image and current
        reconstruction); adds the encoder's output to ``latent`` ``[B, n_styles, 512]``, or to
        ``latent_avg`` when ``latent`` is None. Returns images (and the W+ with ``return_latents``)."""
        codes = self.encoder(x)
        if x.shape[1] == 6 and latent is not None:
            codes = codes + latent
        else:
            codes = codes + self.latent_avg.to(codes.dtype).reshape(1, -1, STYLE_DIM)
        images, _ = self.decoder([codes], input_is_latent=True, randomize_noise=randomize_noise)
        if resize:
            images = self.face_pool(images)
        return (images, codes) if return_latents else images

    # -- the shared interface -------------------------------------------------------------------
    def refine(
        self, x: torch.Tensor, n_iters: int | None = None, resize: bool = True, randomize_noise: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the iterative refinement (the original ``run_on_batch``).

        Args:
            x: images ``[B, 3, H, W]`` (``input_size``; the task's transform).
            n_iters: refinement steps (default ``self.n_iters``).
            resize: pool each reconstruction to 256x256 (the original's ``--resize_outputs``).

        Returns:
            ``(w_plus, images)``: one entry per iteration, ``[B, n_styles, 512]`` and
            ``[B, 3, H, W]`` (cars cropped to H*3/4 x H).
        """
        n_iters = self.n_iters if n_iters is None else check_n_iters(n_iters)
        self._check_input(x)
        if self.avg_image is None:
            self.set_avg_image()
        y = self.avg_image.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        latent = None
        codes_per_iter, images_per_iter = [], []
        for _ in range(n_iters):
            images, latent = self(torch.cat([x, y], dim=1), latent=latent, resize=resize,
                                  randomize_noise=randomize_noise, return_latents=True)
            images = self._crop(images)
            codes_per_iter.append(latent)
            images_per_iter.append(images)
            y = F.adaptive_avg_pool2d(images, self.input_size)
        return codes_per_iter, images_per_iter

    def encode_iterations(self, x: torch.Tensor, n_iters: int | None = None) -> list[torch.Tensor]:
        """W+ ``[B, n_styles, 512]`` after each iteration (``n_iters`` entries; the last is :meth:`encode`).

        Runs the decoder once per iteration (the next iteration needs the reconstruction)."""
        return self.refine(x, n_iters)[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> the last iteration's W+ ``[B, n_styles, 512]``."""
        return self.encode_iterations(x)[-1]

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


def check_n_iters(n_iters: Any) -> int:
    """``n_iters`` if it is a positive int, else ValueError."""
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters={n_iters!r}: expected a positive integer (ReStyle's default is {DEFAULT_N_ITERS})")
    return n_iters
