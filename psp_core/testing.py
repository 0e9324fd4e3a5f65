"""Seeded random-weight checkpoints in the official formats, for tests and demos.

No model weights can be downloaded here, so tests build small pSp models whose *every* parameter
and buffer is random (BN statistics, noise maps, even the blur kernels, which are made asymmetric
so that a wrong kernel flip cannot go unnoticed), scaled so that activations stay finite and
images stay roughly in [-1, 1].
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from psp_core.ops import FusedLeakyReLU
from psp_core.psp import PSP, n_styles_for
from psp_core.stylegan2 import (
    Blur,
    ConstantInput,
    EqualLinear,
    Generator,
    ModulatedConv2d,
    NoiseInjection,
    ToRGB,
    Upsample,
)

__all__ = ["random_checkpoint", "random_stylegan2_checkpoint", "randomize_", "psp_opts"]

# Gain of the random ToRGB weights: keeps the summed RGB skip path near [-1, 1].
_TO_RGB_GAIN = 0.35


def psp_opts(
    output_size: int = 64,
    encoder_type: str = "GradualStyleEncoder",
    input_nc: int = 3,
    label_nc: int = 0,
    dataset_type: str = "ffhq_encode",
    start_from_latent_avg: bool = True,
    learn_in_w: bool = False,
    legacy_opts: bool = False,
) -> dict[str, Any]:
    """An ``opts`` dict like ``vars(TrainOptions().parse())`` of the reference, with ``device``
    ``'cuda:0'`` as in the released files. ``legacy_opts`` drops the keys added after the
    released checkpoints were trained (``output_size``, ``learn_in_w``, ``n_styles``, ...).
    """
    opts: dict[str, Any] = {
        "exp_dir": "experiment",
        "dataset_type": dataset_type,
        "encoder_type": encoder_type,
        "input_nc": input_nc,
        "label_nc": label_nc,
        "output_size": output_size,
        "batch_size": 4,
        "test_batch_size": 2,
        "workers": 4,
        "test_workers": 2,
        "learning_rate": 0.0001,
        "optim_name": "ranger",
        "train_decoder": False,
        "start_from_latent_avg": start_from_latent_avg,
        "learn_in_w": learn_in_w,
        "lpips_lambda": 0.8,
        "id_lambda": 0.1,
        "l2_lambda": 1.0,
        "w_norm_lambda": 0.0,
        "lpips_lambda_crop": 0.0,
        "l2_lambda_crop": 0.0,
        "moco_lambda": 0.0,
        "stylegan_weights": "pretrained_models/stylegan2-ffhq-config-f.pt",
        "checkpoint_path": None,
        "max_steps": 500000,
        "image_interval": 100,
        "board_interval": 50,
        "val_interval": 1000,
        "save_interval": None,
        "resize_factors": None,
        "use_wandb": False,
        "device": "cuda:0",
        "n_styles": n_styles_for(output_size),
    }
    if legacy_opts:
        for key in ("output_size", "learn_in_w", "n_styles", "moco_lambda", "use_wandb"):
            del opts[key]
    return opts


def _normal(gen: torch.Generator, shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen).mul_(std).add_(mean)


def _uniform(gen: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen).mul_(high - low).add_(low)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer of a pSp / StyleGAN2 module with seeded random values
    (in place), scaled to keep activations finite. Returns ``module``.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            # Leaky heads lose half the variance per layer; other convs are variance preserving.
            gain = math.sqrt(2) if ".styles." in f".{name}." else 1.0
            m.weight.copy_(_normal(gen, m.weight.shape, gain / math.sqrt(fan_in)))
            if m.bias is not None:
                m.bias.copy_(_normal(gen, m.bias.shape, 0.05))
        elif isinstance(m, nn.BatchNorm2d):
            # The BN closing a residual branch (res_layer.4) is damped so 24 units do not explode.
            damp = name.endswith("res_layer.4")
            m.weight.copy_(_uniform(gen, m.weight.shape, 0.1, 0.4) if damp else _uniform(gen, m.weight.shape, 0.5, 1.5))
            m.bias.copy_(_normal(gen, m.bias.shape, 0.1))
            m.running_mean.copy_(_normal(gen, m.running_mean.shape, 0.1))
            m.running_var.copy_(_uniform(gen, m.running_var.shape, 0.5, 2.0))
            m.num_batches_tracked.fill_(int(torch.randint(1, 1_000_000, (1,), generator=gen)))
        elif isinstance(m, nn.PReLU):
            m.weight.copy_(_uniform(gen, m.weight.shape, 0.0, 0.5))
        elif isinstance(m, nn.Linear):
            m.weight.copy_(_normal(gen, m.weight.shape, 1 / math.sqrt(m.in_features)))
            m.bias.copy_(_normal(gen, m.bias.shape, 0.05))
        elif isinstance(m, EqualLinear):
            m.weight.copy_(_normal(gen, m.weight.shape, 1 / m.lr_mul))
            if m.bias is not None:
                bias_init = 1.0 if name.endswith("modulation") else 0.0
                m.bias.copy_(_normal(gen, m.bias.shape, 0.1 / m.lr_mul, bias_init / m.lr_mul))
        elif isinstance(m, ModulatedConv2d):
            gain = _TO_RGB_GAIN if not m.demodulate else 1.0
            m.weight.copy_(_normal(gen, m.weight.shape, gain))
        elif isinstance(m, (Blur, Upsample)):
            # A random positive, asymmetric kernel with the original's sum (factor**2 = 4).
            total = float(m.kernel.sum())
            k = _uniform(gen, m.kernel.shape, 0.2, 1.0)
            m.kernel.copy_(k / k.sum() * total)
        elif isinstance(m, NoiseInjection):
            m.weight.copy_(_uniform(gen, m.weight.shape, 0.02, 0.2))
        elif isinstance(m, FusedLeakyReLU):
            m.bias.copy_(_normal(gen, m.bias.shape, 0.1))
        elif isinstance(m, ToRGB):
            m.bias.copy_(_normal(gen, m.bias.shape, 0.1))
        elif isinstance(m, ConstantInput):
            m.input.copy_(_normal(gen, m.input.shape))
        elif isinstance(m, Generator):
            for buf_name, buf in m.noises.named_buffers():
                buf.copy_(_normal(gen, buf.shape))
    return module


def _save(obj: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "wb") as f:
            torch.save(obj, f)
    else:
        torch.save(obj, path[len("file://") :] if path.startswith("file://") else path)
    return path


def random_checkpoint(
    path: str | os.PathLike,
    output_size: int = 64,
    encoder_type: str = "GradualStyleEncoder",
    input_nc: int = 3,
    label_nc: int = 0,
    dataset_type: str = "ffhq_encode",
    start_from_latent_avg: bool = True,
    learn_in_w: bool | None = None,
    seed: int = 0,
    legacy_opts: bool = False,
    latent_avg_shape: str = "official",
    device: str = "cpu",
) -> str:
    """Write a seeded random-weight pSp checkpoint in the official format and return ``path``.

    The file is ``{'state_dict': encoder.* + decoder.*, 'opts': dict, 'latent_avg': tensor}``,
    with ``latent_avg`` (only when ``start_from_latent_avg``) the mean W of 4096 seeded z,
    ``[1, 512]`` with ``learn_in_w``, else ``[n_styles, 512]`` with each row perturbed by its own
    seeded noise (0.25 x the std of the mean W), so the rows differ as they would after training.

    Args:
        path: local path or fsspec URI.
        learn_in_w: None means True exactly for ``BackboneEncoderUsingLastLayerIntoW`` (the only
            encoder the reference trains with ``--learn_in_w``).
        legacy_opts: drop ``output_size``/``learn_in_w`` from opts like the released files (the
            loader then assumes 1024, so only meaningful for ``output_size=1024``).
        latent_avg_shape: ``"official"`` (as above), ``"flat"`` (``[512]``, as when the StyleGAN
            checkpoint had none) or ``"none"`` (key absent).
        device: ``"meta"`` writes shapes only (instant, tiny file; load it with
            ``load_psp(path, device="meta")``) for architecture checks at 1024.
    """
    if learn_in_w is None:
        learn_in_w = encoder_type == "BackboneEncoderUsingLastLayerIntoW"
    if legacy_opts and output_size != 1024:
        raise ValueError(
            f"legacy_opts=True drops 'output_size', which loaders then read as 1024; got output_size={output_size}"
        )
    opts = psp_opts(
        output_size, encoder_type, input_nc, label_nc, dataset_type, start_from_latent_avg, learn_in_w, legacy_opts
    )
    full_opts = dict(opts, output_size=output_size, learn_in_w=learn_in_w)
    if device == "meta":
        with torch.device("meta"):
            net = PSP(full_opts)
            latent = torch.zeros(1, 512)
    else:
        # The encoder (most of the weights) skips PyTorch's default init: randomize_ overwrites
        # every encoder tensor. The decoder is built normally (randomize_ keeps its blur kernels'
        # sums). tests/test_fidelity_golden.py pins the resulting bytes.
        with torch.device("meta"):
            net = PSP(full_opts)
        net.encoder.to_empty(device="cpu")
        net.decoder = Generator(output_size, 512, 8)
        net = randomize_(net, seed)
        net.eval()
        with torch.no_grad():
            latent = net.decoder.mean_latent(4096, generator=torch.Generator().manual_seed(seed + 1))
    ckpt: dict[str, Any] = {"state_dict": net.state_dict(), "opts": opts}
    if start_from_latent_avg and latent_avg_shape != "none":
        if latent_avg_shape == "flat":
            ckpt["latent_avg"] = latent[0].clone()
        elif latent_avg_shape == "official":
            rows = 1 if learn_in_w else net.n_styles
            # Distinct rows (a seeded perturbation of the mean W per row), so that a loader or
            # forward that used row 0 for every style could not pass the tests.
            ckpt["latent_avg"] = latent.repeat(rows, 1)
            if device != "meta":
                noise = torch.randn(rows, latent.shape[1], generator=torch.Generator().manual_seed(seed + 2))
                ckpt["latent_avg"] = ckpt["latent_avg"] + 0.25 * float(latent.std()) * noise
        else:
            raise ValueError(f"latent_avg_shape={latent_avg_shape!r}: expected 'official', 'flat' or 'none'")
    return _save(ckpt, path)


def random_stylegan2_checkpoint(
    path: str | os.PathLike, size: int = 32, seed: int = 0, with_latent_avg: bool = True
) -> str:
    """Write a seeded random rosinality-format generator file ``{'g_ema': ..., 'latent_avg': [512]}``
    (as its ``convert_weight.py`` writes) and return ``path``.
    """
    gen = randomize_(Generator(size, 512, 8), seed).eval()
    ckpt: dict[str, Any] = {"g_ema": gen.state_dict()}
    if with_latent_avg:
        with torch.no_grad():
            ckpt["latent_avg"] = gen.mean_latent(4096, generator=torch.Generator().manual_seed(seed + 1))[0]
    return _save(ckpt, path)
