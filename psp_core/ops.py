"""Pure-PyTorch versions of StyleGAN2's two custom CUDA ops: ``upfirdn2d`` and ``fused_leaky_relu``.

The reference code JIT-compiles these with nvcc at import time; here they are plain tensor code that
runs on any device and exports cleanly. Semantics follow the reference kernels exactly (spec §2.4).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["upfirdn2d", "fused_leaky_relu", "FusedLeakyReLU"]


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int = 1,
    down: int = 1,
    pad: Sequence[int] = (0, 0),
) -> torch.Tensor:
    """Upsample, FIR-filter and downsample every channel of ``x``.

    Args:
        x: ``[B, C, H, W]``.
        kernel: ``[kh, kw]`` FIR filter, applied as a *true* convolution (flipped), like the
            reference CUDA kernel.
        up: zero-insertion upsampling factor (``up - 1`` zeros after every sample).
        down: keep every ``down``-th output sample, starting with the first.
        pad: ``(p0, p1)`` padding before/after on both axes, applied after upsampling; negative
            values crop.

    Returns:
        ``[B, C, (H*up + p0 + p1 - kh)//down + 1, (W*up + p0 + p1 - kw)//down + 1]``.
    """
    p0, p1 = int(pad[0]), int(pad[1])
    batch, channels, height, width = x.shape
    if up > 1:
        # [B, C, H, 1, W, 1] padded with up-1 zeros after each row and column sample.
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    if p0 < 0 or p1 < 0:
        x = x[:, :, max(-p0, 0) : x.shape[2] - max(-p1, 0), max(-p0, 0) : x.shape[3] - max(-p1, 0)]
    kh, kw = kernel.shape
    # conv2d is a correlation: flip the kernel to get the reference's true convolution.
    weight = torch.flip(kernel, [0, 1]).to(dtype=x.dtype).reshape(1, 1, kh, kw)
    weight = weight.expand(channels, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=channels)


def fused_leaky_relu(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    negative_slope: float = 0.2,
    scale: float = math.sqrt(2),
) -> torch.Tensor:
    """``leaky_relu(x + bias, negative_slope) * scale`` with ``bias [C]`` added along dim 1.

    Args:
        x: ``[B, C, ...]`` (any number of trailing dims, including none).
        bias: ``[C]`` or None.
    """
    if bias is not None:
        shape = [1, bias.shape[0]] + [1] * (x.ndim - 2)
        x = x + bias.reshape(shape).to(dtype=x.dtype)
    return F.leaky_relu(x, negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Bias + leaky ReLU + gain, owning ``bias [channel]`` (state-dict key ``bias``)."""

    def __init__(self, channel: int, negative_slope: float = 0.2, scale: float = math.sqrt(2)):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)
