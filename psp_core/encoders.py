"""pSp encoders on an IR-SE50 backbone (TreB1eN InsightFace layout), state-dict compatible with
the released checkpoints' ``encoder.*`` keys.

The original's numerical quirks are kept on purpose: the map2style heads use ``nn.LeakyReLU()``
with its default slope 0.01, the FPN upsamples with ``bilinear, align_corners=True``, the heads
end in an ``EqualLinear``, and the GradualStyleEncoder needs a 256x256 input (its heads reduce
16/32/64 maps to 1x1).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from psp_core.stylegan2 import EqualLinear

__all__ = [
    "Bottleneck",
    "get_blocks",
    "SEModule",
    "bottleneck_IR",
    "bottleneck_IR_SE",
    "GradualStyleBlock",
    "GradualStyleEncoder",
    "BackboneEncoderUsingLastLayerIntoW",
    "BackboneEncoderUsingLastLayerIntoWPlus",
    "ENCODER_TYPES",
    "build_encoder",
]

logger = logging.getLogger(__name__)


class Bottleneck(NamedTuple):
    """One residual unit of the backbone: channels in, channels out (``depth``), stride."""

    in_channel: int
    depth: int
    stride: int


def _stage(in_channel: int, depth: int, num_units: int, stride: int = 2) -> list[Bottleneck]:
    return [Bottleneck(in_channel, depth, stride)] + [Bottleneck(depth, depth, 1)] * (num_units - 1)


def get_blocks(num_layers: int) -> list[list[Bottleneck]]:
    """The four stages of IR-50/100/152; the first unit of each stage has stride 2."""
    units = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
    if num_layers not in units:
        raise ValueError(f"num_layers={num_layers}: expected one of 50, 100, 152")
    n1, n2, n3, n4 = units[num_layers]
    return [_stage(64, 64, n1), _stage(64, 128, n2), _stage(128, 256, n3), _stage(256, 512, n4)]


class SEModule(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))`` with 1x1 convs."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


def _shortcut(in_channel: int, depth: int, stride: int) -> nn.Module:
    if in_channel == depth:
        return nn.MaxPool2d(1, stride)  # a strided subsample, no parameters
    return nn.Sequential(
        nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
    )


class bottleneck_IR(nn.Module):  # noqa: N801 - the original's name, kept for state-dict parity
    """IR residual unit: BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN, plus the shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        self.shortcut_layer = _shortcut(in_channel, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class bottleneck_IR_SE(bottleneck_IR):  # noqa: N801
    """IR unit with a squeeze-and-excitation gate (reduction 16) at the end of the residual."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__(in_channel, depth, stride)
        self.res_layer.append(SEModule(depth, 16))


def _input_layer(input_nc: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(input_nc, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
    )


def _body(num_layers: int, mode: str) -> nn.Sequential:
    if mode not in ("ir", "ir_se"):
        raise ValueError(f"mode={mode!r}: expected 'ir' or 'ir_se'")
    unit = bottleneck_IR_SE if mode == "ir_se" else bottleneck_IR
    return nn.Sequential(
        *[unit(b.in_channel, b.depth, b.stride) for stage in get_blocks(num_layers) for b in stage]
    )


class GradualStyleBlock(nn.Module):
    """map2style head: log2(spatial) x [conv3x3 stride 2 + LeakyReLU(0.01)], then EqualLinear.

    ``[B, in_c, spatial, spatial] -> [B, out_c]``.
    """

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        self.spatial = spatial
        num_pools = int(spatial).bit_length() - 1  # log2(spatial)
        modules: list[nn.Module] = []
        for i in range(num_pools):
            modules += [
                nn.Conv2d(in_c if i == 0 else out_c, out_c, kernel_size=3, stride=2, padding=1),
                nn.LeakyReLU(),  # default slope 0.01, as in the original
            ]
        self.convs = nn.Sequential(*modules)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        return self.linear(x.reshape(-1, self.out_c))


class GradualStyleEncoder(nn.Module):
    """pSp's FPN encoder: coarse styles from c3 (16x16), middle from p2 (32x32), fine from p1
    (64x64). ``x [B, input_nc, 256, 256] -> codes [B, n_styles, 512]``.
    """

    coarse_ind = 3
    middle_ind = 7

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3, n_styles: int = 18):
        super().__init__()
        self.input_layer = _input_layer(input_nc)
        self.body = _body(num_layers, mode)
        self.style_count = n_styles
        self.styles = nn.ModuleList()
        for i in range(n_styles):
            spatial = 16 if i < self.coarse_ind else 32 if i < self.middle_ind else 64
            self.styles.append(GradualStyleBlock(512, 512, spatial))
        self.latlayer1 = nn.Conv2d(256, 512, kernel_size=1, stride=1, padding=0)
        self.latlayer2 = nn.Conv2d(128, 512, kernel_size=1, stride=1, padding=0)
        # Feature taps of the IR-50 body: after units 6 (c1), 20 (c2) and the last (c3).
        n_units = len(self.body)
        stage_ends = [sum(len(s) for s in get_blocks(num_layers)[: j + 1]) - 1 for j in range(4)]
        self._taps = (stage_ends[1], stage_ends[2], n_units - 1)

    @staticmethod
    def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        feats = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self._taps:
                feats[i] = x
        c1, c2, c3 = (feats[i] for i in self._taps)

        latents = [self.styles[j](c3) for j in range(min(self.coarse_ind, self.style_count))]
        p2 = self._upsample_add(c3, self.latlayer1(c2))
        latents += [self.styles[j](p2) for j in range(self.coarse_ind, min(self.middle_ind, self.style_count))]
        p1 = self._upsample_add(p2, self.latlayer2(c1))
        latents += [self.styles[j](p1) for j in range(self.middle_ind, self.style_count)]
        return torch.stack(latents, dim=1)


class BackboneEncoderUsingLastLayerIntoW(nn.Module):
    """IR-SE50 -> global average pool -> EqualLinear: one W code, ``[B, 512]`` (``learn_in_w``)."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3, n_styles: int = 18):
        super().__init__()
        logger.debug("Using BackboneEncoderUsingLastLayerIntoW")
        self.input_layer = _input_layer(input_nc)
        self.output_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = EqualLinear(512, 512, lr_mul=1)
        self.body = _body(num_layers, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.input_layer(x))
        x = self.output_pool(x).reshape(-1, 512)
        return self.linear(x)


class BackboneEncoderUsingLastLayerIntoWPlus(nn.Module):
    """IR-SE50 -> BN -> 7x7 pool -> Linear(25088, 512) -> EqualLinear(512, 512*n_styles):
    ``[B, n_styles, 512]``.
    """

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3, n_styles: int = 18):
        super().__init__()
        logger.debug("Using BackboneEncoderUsingLastLayerIntoWPlus")
        self.n_styles = n_styles
        self.input_layer = _input_layer(input_nc)
        self.output_layer_2 = nn.Sequential(
            nn.BatchNorm2d(512), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(512 * 7 * 7, 512)
        )
        self.linear = EqualLinear(512, 512 * n_styles, lr_mul=1)
        self.body = _body(num_layers, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.input_layer(x))
        x = self.linear(self.output_layer_2(x))
        return x.reshape(-1, self.n_styles, 512)


ENCODER_TYPES: dict[str, type[nn.Module]] = {
    "GradualStyleEncoder": GradualStyleEncoder,
    "BackboneEncoderUsingLastLayerIntoW": BackboneEncoderUsingLastLayerIntoW,
    "BackboneEncoderUsingLastLayerIntoWPlus": BackboneEncoderUsingLastLayerIntoWPlus,
}


def build_encoder(encoder_type: str, input_nc: int = 3, n_styles: int = 18) -> nn.Module:
    """The IR-SE50 encoder named ``encoder_type`` (one of :data:`ENCODER_TYPES`)."""
    try:
        cls = ENCODER_TYPES[encoder_type]
    except KeyError:
        raise ValueError(
            f"encoder_type={encoder_type!r} is not a pSp encoder: expected one of {sorted(ENCODER_TYPES)}"
        ) from None
    return cls(50, "ir_se", input_nc=input_nc, n_styles=n_styles)
