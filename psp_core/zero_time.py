"""A zero-time stand-in for the model, for benchmarks of everything around it (the CPU pools,
the data plane): a checkpoint file that says so in its opts, and the model it loads as.

`write_zero_time_checkpoint(path, output_size)` writes an official-format checkpoint with pSp opts,
no weights and `opts["zero_time_stand_in"] = True`. `psp_core.load_psp` loads such a file as a
`ZeroTimeModel`: `encode` returns a fixed W+ and `decode` the first batch's own input crops
(resized once to the output size, then reused), so a benchmark pays no model time, the PNG/JPEG
encoders see face-like pixels, and every Ray worker picks the stand-in up from the file alone
(no switch, no environment variable). Rows made with it record the stand-in file's sha256, never
a real model's. Not for real use: its W+ are constant.
"""
from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from psp_core.psp import STYLE_DIM, n_styles_for

ZERO_TIME_KEY = "zero_time_stand_in"


def write_zero_time_checkpoint(path: str | os.PathLike, output_size: int = 1024,
                               dataset_type: str = "ffhq_encode") -> str:
    """Write the stand-in checkpoint (a few KB) at `path`; returns the path."""
    from psp_core.testing import psp_opts

    opts = {**psp_opts(output_size=output_size, dataset_type=dataset_type), ZERO_TIME_KEY: True}
    torch.save({"opts": opts, "state_dict": {}, "latent_avg": None}, os.fspath(path))
    return os.fspath(path)


class ZeroTimeModel:
    """Stands in for a loaded `PSP` (encode / decode / face_pool / mix, output_size, n_styles,
    family, n_iters, checkpoint_sha256) at no model cost: outputs are views of tensors made once."""

    family = "psp"
    n_iters = 1

    def __init__(self, output_size: int, checkpoint_sha256: str, input_nc: int = 3):
        self.output_size = int(output_size)
        self.n_styles = n_styles_for(self.output_size)
        self.input_nc = input_nc
        self.checkpoint_sha256 = checkpoint_sha256
        self.w = torch.zeros(0, self.n_styles, STYLE_DIM)
        self.small = torch.zeros(0, 3, 256, 256)
        self.full = torch.zeros(0, 3, self.output_size, self.output_size)

    def _grow(self, x: torch.Tensor) -> None:
        """Keep >= len(x) outputs: W+ zeros, images from these input crops (made once per size)."""
        b = len(x)
        if len(self.w) >= b:
            return
        crops = x[:, :3].float().clamp(-1, 1)
        crops = crops.repeat(-(-b // len(crops)), 1, 1, 1)[:b] if len(crops) < b else crops
        self.w = torch.zeros(b, self.n_styles, STYLE_DIM, device=x.device)
        self.small = F.interpolate(crops, size=(256, 256), mode="bilinear", align_corners=False)
        self.full = (self.small if self.output_size == 256 else
                     F.interpolate(crops, size=(self.output_size,) * 2, mode="bilinear", align_corners=False))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._grow(x)
        return self.w[: len(x)]

    def decode(self, w_plus: torch.Tensor, resize: bool = True, randomize_noise: bool = False) -> torch.Tensor:
        src = self.small if resize else self.full
        b = len(w_plus)
        return src[:b] if b <= len(src) else src.repeat(-(-b // len(src)), 1, 1, 1)[:b]

    def face_pool(self, images: torch.Tensor) -> torch.Tensor:
        return self.small[: len(images)]

    def mix(self, x, n_outputs, latent_mask, mix_alpha=None, seed=0, resize=True, randomize_noise=False, *,
            w_plus=None):
        b = len(w_plus)
        images = self.decode(self.w.new_empty(b * n_outputs, 0), resize=resize)
        return images.reshape(b, n_outputs, *images.shape[1:]), w_plus.unsqueeze(1).expand(-1, n_outputs, -1, -1)
