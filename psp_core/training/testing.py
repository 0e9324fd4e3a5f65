"""Seeded random pretrained files in their published formats, for training tests.

Like ``psp_core.testing``: every value comes from numpy's PCG64 through float64 elementwise
arithmetic (``psp_core.testing.normal`` / ``uniform``), so a seed writes the same bytes on every
CPU. The files have the published keys and shapes (see ``psp_core.training.weights``); the
values are random, scaled so activations stay finite.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from psp_core.testing import _save, normal, random_checkpoint, random_stylegan2_checkpoint, seeded_rng, uniform
from psp_core.training.losses import IRSE50, AlexNetFeatures, ResNet50Features
from psp_core.training.weights import TrainingWeights

__all__ = [
    "random_alexnet",
    "random_lpips_heads",
    "random_ir_se50",
    "random_moco",
    "random_training_weights",
    "random_checkpoint",
    "random_stylegan2_checkpoint",
]


@torch.no_grad()
def _randomize(module: nn.Module, seed: int, damp: tuple[str, ...] = ()) -> nn.Module:
    """Conv/Linear ~ N(0, 2/fan_in) (He, for ReLU nets), biases small, BN near identity; the BN
    layers whose names end with one of ``damp`` (closing a residual branch) scaled down."""
    rng = seeded_rng(seed)
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(normal(rng, m.weight.shape, math.sqrt(2.0 / fan_in)))
            if m.bias is not None:
                m.bias.copy_(normal(rng, m.bias.shape, 0.05))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            low, high = (0.1, 0.4) if name.endswith(damp) and damp else (0.5, 1.5)
            if m.weight is not None:
                m.weight.copy_(uniform(rng, m.weight.shape, low, high))
                m.bias.copy_(normal(rng, m.bias.shape, 0.1))
            m.running_mean.copy_(normal(rng, m.running_mean.shape, 0.1))
            m.running_var.copy_(uniform(rng, m.running_var.shape, 0.5, 2.0))
            m.num_batches_tracked.fill_(int(rng.integers(1, 1_000_000)))
        elif isinstance(m, nn.PReLU):
            m.weight.copy_(uniform(rng, m.weight.shape, 0.0, 0.5))
    return module


def _empty(cls: type[nn.Module]) -> nn.Module:
    with torch.device("meta"):
        module = cls()
    return module.to_empty(device="cpu")


def random_alexnet(path: str | os.PathLike, seed: int = 11, with_classifier: bool = False) -> str:
    """torchvision ``alexnet`` state dict (``features.{0,3,6,8,10}.*``; with ``with_classifier``
    also ``classifier.{1,4,6}.*``, 57 M more values that LPIPS never reads)."""
    feats = _randomize(_empty(AlexNetFeatures), seed).layers.state_dict()
    state: dict[str, Any] = {f"features.{k}": v for k, v in feats.items()}
    if with_classifier:
        rng = seeded_rng(seed + 1)
        for i, (n_in, n_out) in {1: (256 * 6 * 6, 4096), 4: (4096, 4096), 6: (4096, 1000)}.items():
            state[f"classifier.{i}.weight"] = normal(rng, (n_out, n_in), 1 / math.sqrt(n_in))
            state[f"classifier.{i}.bias"] = normal(rng, (n_out,), 0.05)
    return _save(state, path)


def random_lpips_heads(path: str | os.PathLike, seed: int = 12) -> str:
    """LPIPS v0.1 ``alex.pth``: ``lin{i}.model.1.weight`` ``[1, C_i, 1, 1]``, non-negative (as trained)."""
    rng = seeded_rng(seed)
    state = {f"lin{i}.model.1.weight": uniform(rng, (1, c, 1, 1), 0.0, 2.0 / c)
             for i, c in enumerate(AlexNetFeatures.CHANNELS)}
    return _save(state, path)


def random_ir_se50(path: str | os.PathLike, seed: int = 13) -> str:
    """``model_ir_se50.pth``: the IR-SE50 ``Backbone(112, 50, 'ir_se')`` state dict."""
    net = _randomize(_empty(IRSE50), seed, damp=("res_layer.4",))
    return _save(net.state_dict(), path)


def random_moco(path: str | os.PathLike, seed: int = 14) -> str:
    """``moco_v2_800ep_pretrain.pt``: ``{'epoch', 'arch', 'state_dict': {'module.encoder_q.*': ...}}``
    with the ResNet-50 query encoder and its 2-layer MLP head (``fc.0``, ``fc.2``), which the
    loss drops, plus the key encoder's first tensor (the loss ignores ``encoder_k``)."""
    net = _randomize(_empty(ResNet50Features), seed, damp=("bn3",))
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    rng = seeded_rng(seed + 1)
    state["module.encoder_q.fc.0.weight"] = normal(rng, (2048, 2048), 1 / math.sqrt(2048))
    state["module.encoder_q.fc.0.bias"] = normal(rng, (2048,), 0.05)
    state["module.encoder_q.fc.2.weight"] = normal(rng, (128, 2048), 1 / math.sqrt(2048))
    state["module.encoder_q.fc.2.bias"] = normal(rng, (128,), 0.05)
    state["module.encoder_k.conv1.weight"] = state["module.encoder_q.conv1.weight"].clone()
    return _save({"epoch": 800, "arch": "resnet50", "state_dict": state}, path)


def random_training_weights(folder: str | os.PathLike, output_size: int = 32, which=("stylegan", "alexnet", "lpips",
                            "ir_se50", "moco"), seed: int = 0) -> TrainingWeights:
    """Write the requested random files under ``folder`` and return a ``TrainingWeights`` naming them."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    writers = {
        "stylegan": lambda p: random_stylegan2_checkpoint(p, size=output_size, seed=seed + 1),
        "alexnet": lambda p: random_alexnet(p, seed=seed + 11),
        "lpips": lambda p: random_lpips_heads(p, seed=seed + 12),
        "ir_se50": lambda p: random_ir_se50(p, seed=seed + 13),
        "moco": lambda p: random_moco(p, seed=seed + 14),
    }
    names = {"stylegan": "stylegan2.pt", "alexnet": "alexnet.pth", "lpips": "alex.pth",
             "ir_se50": "model_ir_se50.pth", "moco": "moco_v2_800ep_pretrain.pt"}
    paths = {}
    for key in which:
        paths[key] = writers[key](os.path.join(folder, names[key]))
    return TrainingWeights(**paths)
