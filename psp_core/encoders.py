"""The encoders of pSp, e4e and ReStyle, state-dict compatible with the released checkpoints'
``encoder.*`` keys: an IR-SE50 backbone (TreB1eN InsightFace layout) for all three, and for ReStyle
also a ResNet-34 backbone with torchvision's parameter names (written here, no torchvision).

The original's numerical quirks are kept on purpose: the map2style heads use ``nn.LeakyReLU()``
with its default slope 0.01, the FPN upsamples with ``bilinear, align_corners=True``, the heads
end in an ``EqualLinear``. The heads reduce a map to 1x1 with log2(spatial) stride-2 convs, so
inputs are 256x256 (cars checkpoints of e4e and ReStyle take 192x256: 12x16 maps also reach 1x1).

Families (``ENCODER_TYPES[family]``): pSp's three encoders; e4e's ``Encoder4Editing`` (a base code
w0 plus per-style deltas over the FPN levels) and ``SingleStyleCodeEncoder`` (one W code repeated
over the styles); ReStyle's encoders, which take the image concatenated with the current
reconstruction (6 channels) and take every style from the last 16x16 map: ``BackboneEncoder`` /
``ResNetBackboneEncoder`` (pSp flavour, one head per style) and ``ProgressiveBackboneEncoder`` /
``ResNetProgressiveBackboneEncoder`` (e4e flavour, w0 plus deltas).
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
    "Encoder4Editing",
    "SingleStyleCodeEncoder",
    "BackboneEncoder",
    "ProgressiveBackboneEncoder",
    "BasicBlock",
    "ResNetBackboneEncoder",
    "ResNetProgressiveBackboneEncoder",
    "INFERENCE_STAGE",
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

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The body's three feature taps (c1, c2, c3): 128, 256 and 512 channels at 1/4, 1/8, 1/16."""
        x = self.input_layer(x)
        feats = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self._taps:
                feats[i] = x
        return tuple(feats[i] for i in self._taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.features(x)

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


# e4e's ProgressiveStage.Inference: every delta is used. The stage is not stored in checkpoints;
# the original builds its encoders at this stage for inference.
INFERENCE_STAGE = 18


def _w0_plus_deltas(w0: torch.Tensor, deltas: list[torch.Tensor], n_styles: int) -> torch.Tensor:
    """e4e's code: w0 ``[B, 512]`` repeated over ``n_styles``, with ``deltas[k]`` added to style k+1."""
    w = w0.unsqueeze(1).repeat(1, n_styles, 1)
    for i, delta in enumerate(deltas, start=1):
        w[:, i] = w[:, i] + delta
    return w


class Encoder4Editing(GradualStyleEncoder):
    """e4e's encoder: pSp's FPN layout (same keys), but style 0 gives a base code w0 that every
    style starts from, and head i (from c3, p2 or p1 as in pSp) gives a delta added to style i,
    for the styles below ``progressive_stage`` + 1. ``x [B, 3, H, W] -> W+ [B, n_styles, 512]``.
    """

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3, n_styles: int = 18):
        super().__init__(num_layers, mode, input_nc=input_nc, n_styles=n_styles)
        self.progressive_stage = INFERENCE_STAGE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.features(x)
        w0 = self.styles[0](c3)
        features, deltas = c3, []
        for i in range(1, min(self.progressive_stage + 1, self.style_count)):
            if i == self.coarse_ind:
                p2 = self._upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == self.middle_ind:
                features = self._upsample_add(p2, self.latlayer2(c1))
            deltas.append(self.styles[i](features))
        return _w0_plus_deltas(w0, deltas, self.style_count)


class SingleStyleCodeEncoder(BackboneEncoderUsingLastLayerIntoW):
    """e4e's W encoder: pSp's ``BackboneEncoderUsingLastLayerIntoW`` (same keys), its code
    repeated over the styles. ``x [B, 3, H, W] -> W+ [B, n_styles, 512]``."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3, n_styles: int = 18):
        super().__init__(num_layers, mode, input_nc=input_nc, n_styles=n_styles)
        self.style_count = n_styles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).unsqueeze(1).repeat(1, self.style_count, 1)


def _heads_16(n_styles: int) -> nn.ModuleList:
    return nn.ModuleList(GradualStyleBlock(512, 512, 16) for _ in range(n_styles))


class BackboneEncoder(nn.Module):
    """ReStyle's pSp encoder on IR-SE50: every style from its own head on the last 16x16 map.
    ``x [B, input_nc (6), H, W] -> residual W+ [B, n_styles, 512]``."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 6, n_styles: int = 18):
        super().__init__()
        self.input_layer = _input_layer(input_nc)
        self.body = _body(num_layers, mode)
        self.style_count = n_styles
        self.styles = _heads_16(n_styles)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_layer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.stack([head(x) for head in self.styles], dim=1)


class ProgressiveBackboneEncoder(BackboneEncoder):
    """ReStyle's e4e encoder on IR-SE50 (same keys as ``BackboneEncoder``): head 0 gives w0, head i
    a delta for style i (below ``progressive_stage`` + 1), all from the last 16x16 map."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 6, n_styles: int = 18):
        super().__init__(num_layers, mode, input_nc=input_nc, n_styles=n_styles)
        self.progressive_stage = INFERENCE_STAGE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        stop = min(self.progressive_stage + 1, self.style_count)
        return _w0_plus_deltas(self.styles[0](x), [self.styles[i](x) for i in range(1, stop)], self.style_count)


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` (same parameter names): conv3x3(stride) -> BN -> ReLU ->
    conv3x3 -> BN, plus the identity or a 1x1 conv + BN ``downsample``, then ReLU."""

    def __init__(self, in_channel: int, depth: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channel, depth, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(depth)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(depth, depth, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(depth)
        self.downsample = None
        if stride != 1 or in_channel != depth:
            self.downsample = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet34_body() -> nn.Sequential:
    """ResNet-34's layer1..layer4 as one Sequential of 16 BasicBlocks (``body.0`` .. ``body.15``:
    ReStyle's renaming of torchvision's ``layer1.0`` .. ``layer4.2``); strides 1, 2, 2, 2."""
    blocks, in_channel = [], 64
    for depth, n_blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for j in range(n_blocks):
            blocks.append(BasicBlock(in_channel, depth, stride if j == 0 else 1))
            in_channel = depth
    return nn.Sequential(*blocks)


class ResNetBackboneEncoder(nn.Module):
    """ReStyle's pSp encoder on ResNet-34: conv7x7 stride 2 -> BN -> PReLU (no max-pool), the 16
    BasicBlocks, then one head per style on the last 16x16 map.
    ``x [B, input_nc (6), H, W] -> residual W+ [B, n_styles, 512]``."""

    def __init__(self, input_nc: int = 6, n_styles: int = 18):
        super().__init__()
        self.conv1 = nn.Conv2d(input_nc, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.PReLU(64)
        self.body = resnet34_body()
        self.style_count = n_styles
        self.styles = _heads_16(n_styles)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.stack([head(x) for head in self.styles], dim=1)


class ResNetProgressiveBackboneEncoder(ResNetBackboneEncoder):
    """ReStyle's e4e encoder on ResNet-34 (same keys as ``ResNetBackboneEncoder``): w0 plus deltas."""

    def __init__(self, input_nc: int = 6, n_styles: int = 18):
        super().__init__(input_nc=input_nc, n_styles=n_styles)
        self.progressive_stage = INFERENCE_STAGE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        stop = min(self.progressive_stage + 1, self.style_count)
        return _w0_plus_deltas(self.styles[0](x), [self.styles[i](x) for i in range(1, stop)], self.style_count)


# Encoder classes by model family, under the names the checkpoints' opts['encoder_type'] use.
ENCODER_TYPES: dict[str, dict[str, type[nn.Module]]] = {
    "psp": {
        "GradualStyleEncoder": GradualStyleEncoder,
        "BackboneEncoderUsingLastLayerIntoW": BackboneEncoderUsingLastLayerIntoW,
        "BackboneEncoderUsingLastLayerIntoWPlus": BackboneEncoderUsingLastLayerIntoWPlus,
    },
    "e4e": {
        "Encoder4Editing": Encoder4Editing,
        "SingleStyleCodeEncoder": SingleStyleCodeEncoder,
        "GradualStyleEncoder": GradualStyleEncoder,
    },
    "restyle_psp": {
        "BackboneEncoder": BackboneEncoder,
        "ResNetBackboneEncoder": ResNetBackboneEncoder,
        "GradualStyleEncoder": GradualStyleEncoder,
    },
    "restyle_e4e": {
        "ProgressiveBackboneEncoder": ProgressiveBackboneEncoder,
        "ResNetProgressiveBackboneEncoder": ResNetProgressiveBackboneEncoder,
    },
}


def build_encoder(encoder_type: str, input_nc: int = 3, n_styles: int = 18, family: str = "psp") -> nn.Module:
    """The encoder named ``encoder_type`` in ``family`` (see :data:`ENCODER_TYPES`)."""
    types = ENCODER_TYPES.get(family)
    if types is None:
        raise ValueError(f"family={family!r}: expected one of {sorted(ENCODER_TYPES)}")
    try:
        cls = types[encoder_type]
    except KeyError:
        raise ValueError(
            f"encoder_type={encoder_type!r} is not a {family} encoder: expected one of {sorted(types)}"
        ) from None
    if cls in (ResNetBackboneEncoder, ResNetProgressiveBackboneEncoder):
        return cls(input_nc=input_nc, n_styles=n_styles)
    return cls(50, "ir_se", input_nc=input_nc, n_styles=n_styles)
