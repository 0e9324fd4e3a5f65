"""StyleGAN2 generator with the module layout and state-dict names of rosinality/stylegan2-pytorch.

Every class below is one concept of the paper; their parameter names match the original so that
the released pSp checkpoints (``decoder.*``) and rosinality ``g_ema`` weights load unchanged.
Only the generator is here (pSp needs no discriminator).
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from psp_core.ops import FusedLeakyReLU, fused_leaky_relu, upfirdn2d

__all__ = [
    "PixelNorm",
    "make_kernel",
    "Upsample",
    "Blur",
    "EqualLinear",
    "ModulatedConv2d",
    "NoiseInjection",
    "ConstantInput",
    "StyledConv",
    "ToRGB",
    "Generator",
    "set_modulated_conv_impl",
]

MODULATED_CONV_IMPLS = ("batched", "grouped")


class PixelNorm(nn.Module):
    """Normalise each vector to unit RMS over dim 1: ``x * rsqrt(mean(x**2, 1) + 1e-8)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


def make_kernel(k: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A 1-D kernel becomes its outer product; the result is normalised to sum 1. ``[kh, kw]``."""
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


class Upsample(nn.Module):
    """2x FIR upsampling (zero insertion + blur), as used on the ToRGB skip path."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        kernel = make_kernel(kernel) * (factor**2)
        self.register_buffer("kernel", kernel)
        p = kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, C, H*factor, W*factor]``."""
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass filter with explicit padding (follows the transposed conv when upsampling)."""

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        kernel = make_kernel(kernel)
        if upsample_factor > 1:
            kernel = kernel * (upsample_factor**2)
        self.register_buffer("kernel", kernel)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    """Linear layer with the equalised learning rate: weights stored as ``N(0,1)/lr_mul`` and
    scaled by ``lr_mul/sqrt(in_dim)`` at run time; bias scaled by ``lr_mul``.

    ``activation='fused_lrelu'`` applies ``fused_leaky_relu`` with the bias.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> [B, out_dim]``."""
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}"


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (StyleGAN2 weight (de)modulation).

    ``impl="batched"`` (default) scales the activations by the style, runs ONE convolution with the
    shared weight for the whole batch and demodulates the output; it is linear-algebra equivalent
    to the reference's ``impl="grouped"`` (a per-sample weight and a grouped conv with
    ``groups=B``), which is kept as the reference. Switch with the ``impl`` attribute or
    :func:`set_modulated_conv_impl`.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        impl: str = "batched",
    ):
        super().__init__()
        if impl not in MODULATED_CONV_IMPLS:
            raise ValueError(f"impl={impl!r}: expected one of {MODULATED_CONV_IMPLS}")
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.impl = impl
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            pad0 = (p + 1) // 2 + factor - 1
            pad1 = p // 2 + 1
            self.blur = Blur(blur_kernel, pad=(pad0, pad1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def extra_repr(self) -> str:
        return (
            f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, "
            f"upsample={self.upsample}, demodulate={self.demodulate}, impl={self.impl!r}"
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """``x [B, in, H, W]``, ``style [B, style_dim]`` -> ``[B, out, H', W']`` (H' = 2H if upsample)."""
        if self.impl == "grouped":
            return self._forward_grouped(x, style)
        return self._forward_batched(x, style)

    def _forward_batched(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        s = self.modulation(style)  # [B, in]
        weight = self.weight[0] * self.scale  # [out, in, k, k]
        x = x * s.reshape(batch, self.in_channel, 1, 1).to(x.dtype)
        w = weight.to(x.dtype)
        if self.upsample:
            out = F.conv_transpose2d(x, w.transpose(0, 1), padding=0, stride=2)
        else:
            out = F.conv2d(x, w, padding=self.padding)
        if self.demodulate:
            # sum_{in,kh,kw} (W[o,i] s[b,i])^2 = (s^2) @ (sum_k W^2)^T
            wsq = weight.pow(2).sum([2, 3])  # [out, in]
            demod = torch.rsqrt(s.pow(2) @ wsq.t() + self.eps)  # [B, out]
            out = out * demod.reshape(batch, self.out_channel, 1, 1).to(out.dtype)
        if self.upsample:
            out = self.blur(out)
        return out

    def _forward_grouped(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        batch, in_channel, height, width = x.shape
        k = self.kernel_size
        s = self.modulation(style).reshape(batch, 1, in_channel, 1, 1)
        weight = self.scale * self.weight * s  # [B, out, in, k, k]
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.reshape(batch, self.out_channel, 1, 1, 1)
        x = x.reshape(1, batch * in_channel, height, width)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight.to(x.dtype), padding=0, stride=2, groups=batch)
            out = out.reshape(batch, self.out_channel, out.shape[2], out.shape[3])
            return self.blur(out)
        weight = weight.reshape(batch * self.out_channel, in_channel, k, k)
        out = F.conv2d(x, weight.to(x.dtype), padding=self.padding, groups=batch)
        return out.reshape(batch, self.out_channel, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):
    """``x + weight * noise``; draws ``noise [B,1,H,W] ~ N(0,1)`` when none is given."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return image + self.weight.to(image.dtype) * noise.to(image.dtype)


class ConstantInput(nn.Module):
    """The learned 4x4 constant the synthesis network starts from, ``input [1, C, size, size]``."""

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Repeats the constant over ``latent.shape[0]``."""
        return self.input.repeat(latent.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    """ModulatedConv2d -> NoiseInjection -> FusedLeakyReLU (keys ``conv``, ``noise``, ``activate``)."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        demodulate: bool = True,
        impl: str = "batched",
    ):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel,
            out_channel,
            kernel_size,
            style_dim,
            upsample=upsample,
            blur_kernel=blur_kernel,
            demodulate=demodulate,
            impl=impl,
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(
        self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.conv(x, style)
        out = self.noise(out, noise=noise)
        return self.activate(out)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB + bias, plus the upsampled previous skip."""

    def __init__(
        self,
        in_channel: int,
        style_dim: int,
        upsample: bool = True,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        impl: str = "batched",
    ):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False, impl=impl)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(
        self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.conv(x, style) + self.bias.to(x.dtype)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """rosinality StyleGAN2 generator (config-f layout), ``size`` a power of two >= 8.

    ``n_latent = 2*log2(size) - 2`` style vectors; ``num_layers = 2*log2(size) - 3`` noise inputs
    (fixed copies in the ``noises.noise_i`` buffers).
    """

    def __init__(
        self,
        size: int,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        lr_mlp: float = 0.01,
        impl: str = "batched",
    ):
        super().__init__()
        log_size = int(math.log(size, 2))
        if size < 8 or 2**log_size != size:
            raise ValueError(f"Generator size={size}: expected a power of two >= 8 (e.g. 256, 1024)")
        self.size = size
        self.style_dim = style_dim
        layers: list[nn.Module] = [PixelNorm()]
        for _ in range(n_mlp):
            layers.append(EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu"))
        self.style = nn.Sequential(*layers)

        self.channels = {
            4: 512,
            8: 512,
            16: 512,
            32: 512,
            64: 256 * channel_multiplier,
            128: 128 * channel_multiplier,
            256: 64 * channel_multiplier,
            512: 32 * channel_multiplier,
            1024: 16 * channel_multiplier,
            2048: 8 * channel_multiplier,
        }
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(
            self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel, impl=impl
        )
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False, impl=impl)

        self.log_size = log_size
        self.num_layers = (log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2**res, 2**res))

        in_channel = self.channels[4]
        for i in range(3, log_size + 1):
            out_channel = self.channels[2**i]
            self.convs.append(
                StyledConv(
                    in_channel, out_channel, 3, style_dim, upsample=True,
                    blur_kernel=blur_kernel, impl=impl,
                )
            )
            self.convs.append(
                StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel, impl=impl)
            )
            self.to_rgbs.append(ToRGB(out_channel, style_dim, impl=impl))
            in_channel = out_channel
        self.n_latent = log_size * 2 - 2

    def make_noise(self) -> list[torch.Tensor]:
        """Fresh noise maps, one per noise layer: ``[1,1,4,4]``, then two of each ``[1,1,2^i,2^i]``."""
        device = self.input.input.device
        noises = [torch.randn(1, 1, 4, 4, device=device)]
        for i in range(3, self.log_size + 1):
            for _ in range(2):
                noises.append(torch.randn(1, 1, 2**i, 2**i, device=device))
        return noises

    def mean_latent(self, n_latent: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean W of ``n_latent`` random z: ``[1, style_dim]``."""
        z = torch.randn(n_latent, self.style_dim, generator=generator)
        z = z.to(self.input.input.device)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Mapping network: ``z [B, style_dim] -> w [B, style_dim]``."""
        return self.style(z)

    def forward(
        self,
        styles: list[torch.Tensor],
        return_latents: bool = False,
        inject_index: int | None = None,
        truncation: float = 1,
        truncation_latent: torch.Tensor | None = None,
        input_is_latent: bool = False,
        noise: list[torch.Tensor | None] | None = None,
        randomize_noise: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Synthesise images.

        Args:
            styles: list of one or two tensors, each ``[B, style_dim]`` (z, or w when
                ``input_is_latent``) or ``[B, n_latent, style_dim]`` (W+, with ``input_is_latent``).
                Two tensors mix at ``inject_index`` (random in [1, n_latent-1] when None).
            truncation, truncation_latent: ``w' = t_lat + truncation * (w - t_lat)`` when < 1.
            noise: per-layer noise (``num_layers`` entries); None uses the fixed buffers when
                ``randomize_noise`` is False, else fresh N(0,1) noise per call.

        Returns:
            ``(image [B, 3, size, size], latent [B, n_latent, style_dim] or None)``; the image is
            not clamped (about [-1, 1]).
        """
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            if randomize_noise:
                noise = [None] * self.num_layers
            else:
                noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]

        if len(styles) < 2:
            inject_index = self.n_latent
            if styles[0].ndim < 3:
                latent = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
            else:
                latent = styles[0]
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            latent = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
            latent2 = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
            latent = torch.cat([latent, latent2], 1)

        out = self.input(latent)
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        # Latent index 1 feeds both to_rgb1 and the first upsampling conv (as in the original).
        i = 1
        for conv_up, conv, noise1, noise2, to_rgb in zip(
            self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs
        ):
            out = conv_up(out, latent[:, i], noise=noise1)
            out = conv(out, latent[:, i + 1], noise=noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip, (latent if return_latents else None)


def set_modulated_conv_impl(module: nn.Module, impl: str) -> nn.Module:
    """Switch every ModulatedConv2d under ``module`` to ``impl`` ("batched" or "grouped")."""
    if impl not in MODULATED_CONV_IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {MODULATED_CONV_IMPLS}")
    for m in module.modules():
        if isinstance(m, ModulatedConv2d):
            m.impl = impl
    return module
