"""pSp's training losses, as the original ``criteria/`` and ``Coach.calc_loss`` compute them.

Pure PyTorch, no torchvision: AlexNet's and ResNet-50's layers are written here under torchvision's
parameter names, so the published weight files load unchanged (``psp_core.training.weights``).

- ``LPIPS``: AlexNet features after ReLU 1..5, each unit-normalised over channels (eps 1e-10),
  squared differences weighted by the v0.1 linear heads, spatial mean, summed over layers and
  divided by the batch size; inputs z-scored with LPIPS' shift/scale (inputs are in [-1, 1]).
- ``IDLoss``: IR-SE50 ArcFace on the crop ``[35:223, 32:220]`` of a 256 image pooled to 112;
  ``mean_i(1 - <f(y_hat_i), f(y_i)>)`` with ``f`` unit-normalised.
- ``WNormLoss``: ``sum_b ||w_b - latent_avg||_F / B`` (without the average when not
  ``start_from_latent_avg``).
- ``MocoLoss``: MoCo v2 ResNet-50 features of the nearest-resized 224 image, unit-normalised;
  ``mean_i(1 - <f(y_hat_i), f(y_i)>)``.
- ``PspLoss``: ``Coach.calc_loss`` (the same terms, order and dict keys).

The frozen networks run in eval mode and never get gradients; gradients flow through ``y_hat``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from psp_core.encoders import _body, _input_layer
from psp_core.training.options import TrainOptions

__all__ = [
    "AlexNetFeatures",
    "LPIPS",
    "IRSE50",
    "IDLoss",
    "WNormLoss",
    "ResNet50Features",
    "MocoLoss",
    "PspLoss",
    "FACE_CROP",
]

#: The original's "interesting region" of a 256x256 face: rows 35:223, columns 32:220.
FACE_CROP = (slice(35, 223), slice(32, 220))


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{what}: weights do not match (missing {result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]})"
        )


# -- LPIPS ------------------------------------------------------------------------------------


class AlexNetFeatures(nn.Module):
    """torchvision's ``alexnet().features`` (same indices, so ``features.N.*`` keys load as ``N.*``)."""

    #: 1-based positions whose outputs LPIPS compares (after each ReLU), and their channels.
    TARGET_LAYERS = (2, 5, 8, 10, 12)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [B, 3, H, W]`` (z-scored) -> the five normalised ReLU outputs."""
        out = []
        for i, layer in enumerate(self.layers, 1):
            x = layer(x)
            if i in self.TARGET_LAYERS:
                out.append(_unit_channels(x))
            if len(out) == len(self.TARGET_LAYERS):
                break
        return out


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    norm = torch.sqrt(torch.sum(x**2, dim=1, keepdim=True))
    return x / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet, as the original ``criteria/lpips``: ``forward(x, y) -> scalar``.

    Args:
        alexnet_state: ``features`` weights with keys ``0.weight`` ... (``TrainingWeights.load_alexnet``).
        lpips_state: heads with keys ``0.1.weight`` ... ``4.1.weight`` (``TrainingWeights.load_lpips``).
    """

    def __init__(self, alexnet_state: Mapping[str, torch.Tensor], lpips_state: Mapping[str, torch.Tensor]):
        super().__init__()
        self.register_buffer("mean", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("std", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.net = AlexNetFeatures()
        _load_strict(self.net.layers, alexnet_state, "alexnet")
        self.lin = nn.ModuleList(
            nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, 1, 0, bias=False)) for c in AlexNetFeatures.CHANNELS
        )
        _load_strict(self.lin, lpips_state, "lpips")
        _freeze(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y [B, 3, H, W]`` in [-1, 1] -> scalar LPIPS summed over the batch / B."""
        feat_x = self.net((x - self.mean) / self.std)
        feat_y = self.net((y - self.mean) / self.std)
        res = [lin((fx - fy) ** 2).mean((2, 3), True) for fx, fy, lin in zip(feat_x, feat_y, self.lin)]
        return torch.sum(torch.cat(res, 0)) / x.shape[0]


# -- identity (IR-SE50 ArcFace) -------------------------------------------------------------------


class IRSE50(nn.Module):
    """The TreB1eN IR-SE50 ``Backbone(112, 50, 'ir_se', drop_ratio=0.6)`` of the original ID loss:
    ``[B, 3, 112, 112] -> unit-norm [B, 512]``. Keys as ``model_ir_se50.pth``."""

    def __init__(self, drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer = _input_layer(3)
        self.body = _body(50, "ir_se")
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(drop_ratio), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return torch.div(x, torch.norm(x, 2, 1, True))


def _f(value) -> float:
    """A loss value as a Python float (the original's ``float(tensor)``, without autograd's warning)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _similarity_loss(
    y_hat_feats: torch.Tensor, y_feats: torch.Tensor, x_feats: torch.Tensor
) -> tuple[torch.Tensor, float, list[dict[str, float]]]:
    """The original's per-sample loop (ID and MoCo): ``(loss, improvement, logs)``."""
    y_feats = y_feats.detach()
    loss = 0
    improvement = 0.0
    logs = []
    n = x_feats.shape[0]
    for i in range(n):
        diff_target = y_hat_feats[i].dot(y_feats[i])
        diff_input = y_hat_feats[i].dot(x_feats[i])
        diff_views = y_feats[i].dot(x_feats[i])
        logs.append({"diff_target": _f(diff_target), "diff_input": _f(diff_input), "diff_views": _f(diff_views)})
        loss += 1 - diff_target
        improvement += _f(diff_target) - _f(diff_views)
    return loss / n, improvement / n, logs


class IDLoss(nn.Module):
    """The original ``criteria/id_loss.IDLoss``: ``forward(y_hat, y, x) -> (loss, improvement, logs)``."""

    def __init__(self, ir_se50_state: Mapping[str, torch.Tensor]):
        super().__init__()
        self.facenet = IRSE50()
        _load_strict(self.facenet, ir_se50_state, "ir_se50")
        self.face_pool = nn.AdaptiveAvgPool2d((112, 112))
        _freeze(self)

    def extract_feats(self, x: torch.Tensor) -> torch.Tensor:
        return self.facenet(self.face_pool(x[:, :, FACE_CROP[0], FACE_CROP[1]]))

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor):
        x_feats = self.extract_feats(x)
        y_feats = self.extract_feats(y)
        y_hat_feats = self.extract_feats(y_hat)
        return _similarity_loss(y_hat_feats, y_feats, x_feats)


# -- W-norm -----------------------------------------------------------------------------------------


class WNormLoss(nn.Module):
    """``sum_b ||latent_b - latent_avg||_F / B`` over ``latent [B, n_styles, 512]``."""

    def __init__(self, start_from_latent_avg: bool = True):
        super().__init__()
        self.start_from_latent_avg = start_from_latent_avg

    def forward(self, latent: torch.Tensor, latent_avg: torch.Tensor | None = None) -> torch.Tensor:
        if self.start_from_latent_avg:
            latent = latent - latent_avg
        return torch.sum(latent.norm(2, dim=(1, 2))) / latent.shape[0]


# -- MoCo (ResNet-50) --------------------------------------------------------------------------------


class _ResNetBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride on the 3x3 conv), same parameter names."""

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * 4
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50Features(nn.Module):
    """torchvision ``resnet50`` without ``fc``: ``[B, 3, H, W] -> [B, 2048, 1, 1]``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = [_ResNetBottleneck(in_ch, width, stride)]
            in_ch = width * 4
            layer += [_ResNetBottleneck(in_ch, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class MocoLoss(nn.Module):
    """The original ``criteria/moco_loss.MocoLoss``: ``forward(y_hat, y, x) -> (loss, improvement, logs)``.

    Deviation: features are flattened to ``[B, 2048]`` (the original ``squeeze()`` also drops the
    batch dimension at B = 1 and then fails); equal for B > 1.
    """

    def __init__(self, moco_state: Mapping[str, torch.Tensor]):
        super().__init__()
        self.model = ResNet50Features()
        _load_strict(self.model, moco_state, "moco")
        _freeze(self)

    def extract_feats(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=224)
        return F.normalize(self.model(x), dim=1).flatten(1)

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor):
        x_feats = self.extract_feats(x)
        y_feats = self.extract_feats(y)
        y_hat_feats = self.extract_feats(y_hat)
        return _similarity_loss(y_hat_feats, y_feats, x_feats)


# -- the objective --------------------------------------------------------------------------------


class PspLoss(nn.Module):
    """``Coach.calc_loss``: ``(x, y, y_hat, latent, latent_avg) -> (loss, loss_dict, id_logs)``.

    Builds only the networks the lambdas need, from ``weights`` (a ``TrainingWeights``).
    ``loss_dict`` has the original's keys (``loss_id``, ``id_improve``, ``loss_l2``,
    ``loss_lpips``, ``loss_lpips_crop``, ``loss_l2_crop``, ``loss_w_norm``, ``loss_moco``, ``loss``)
    as Python floats. Deviation: LPIPS is also built when only ``lpips_lambda_crop`` > 0 (the
    original then fails with an AttributeError).
    """

    def __init__(self, opts: TrainOptions, weights):
        super().__init__()
        self.opts = opts
        if opts.id_lambda > 0 and opts.moco_lambda > 0:
            raise ValueError("Both ID and MoCo loss have lambdas > 0! Please select only one to have non-zero lambda!")
        self.lpips = LPIPS(weights.load_alexnet(), weights.load_lpips()) if (
            opts.lpips_lambda > 0 or opts.lpips_lambda_crop > 0) else None
        self.id_loss = IDLoss(weights.load_ir_se50()) if opts.id_lambda > 0 else None
        self.w_norm = WNormLoss(start_from_latent_avg=opts.start_from_latent_avg) if opts.w_norm_lambda > 0 else None
        self.moco = MocoLoss(weights.load_moco()) if opts.moco_lambda > 0 else None

    def train(self, mode: bool = True):  # the loss networks stay in eval mode (as the original's)
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, latent: torch.Tensor,
                latent_avg: torch.Tensor | None):
        opts = self.opts
        loss_dict: dict[str, float] = {}
        loss = 0.0
        id_logs = None
        if opts.id_lambda > 0:
            loss_id, sim_improvement, id_logs = self.id_loss(y_hat, y, x)
            loss_dict["loss_id"] = _f(loss_id)
            loss_dict["id_improve"] = _f(sim_improvement)
            loss = loss_id * opts.id_lambda
        if opts.l2_lambda > 0:
            loss_l2 = F.mse_loss(y_hat, y)
            loss_dict["loss_l2"] = _f(loss_l2)
            loss += loss_l2 * opts.l2_lambda
        if opts.lpips_lambda > 0:
            loss_lpips = self.lpips(y_hat, y)
            loss_dict["loss_lpips"] = _f(loss_lpips)
            loss += loss_lpips * opts.lpips_lambda
        if opts.lpips_lambda_crop > 0:
            loss_lpips_crop = self.lpips(y_hat[:, :, 35:223, 32:220], y[:, :, 35:223, 32:220])
            loss_dict["loss_lpips_crop"] = _f(loss_lpips_crop)
            loss += loss_lpips_crop * opts.lpips_lambda_crop
        if opts.l2_lambda_crop > 0:
            loss_l2_crop = F.mse_loss(y_hat[:, :, 35:223, 32:220], y[:, :, 35:223, 32:220])
            loss_dict["loss_l2_crop"] = _f(loss_l2_crop)
            loss += loss_l2_crop * opts.l2_lambda_crop
        if opts.w_norm_lambda > 0:
            loss_w_norm = self.w_norm(latent, latent_avg)
            loss_dict["loss_w_norm"] = _f(loss_w_norm)
            loss += loss_w_norm * opts.w_norm_lambda
        if opts.moco_lambda > 0:
            loss_moco, sim_improvement, id_logs = self.moco(y_hat, y, x)
            loss_dict["loss_moco"] = _f(loss_moco)
            loss_dict["id_improve"] = _f(sim_improvement)
            loss += loss_moco * opts.moco_lambda
        loss_dict["loss"] = _f(loss)
        return loss, loss_dict, id_logs
