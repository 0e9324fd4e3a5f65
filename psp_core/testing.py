"""Seeded random-weight checkpoints in the official formats, for tests and demos.

No model weights can be downloaded here, so tests build small pSp models whose *every* parameter
and buffer is random (BN statistics, noise maps, even the blur kernels, which are made asymmetric
so that a wrong kernel flip cannot go unnoticed), scaled so that activations stay finite and
images stay roughly in [-1, 1].

Every value comes from numpy's PCG64 (:func:`seeded_rng`) through float64 elementwise arithmetic
and one rounding to float32: no torch RNG (``torch.randn`` takes a different vectorised path per
CPU capability) and no BLAS reduction, so a seed writes the same bytes on every machine, which
the golden-output tests pin.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from psp_core.e4e import E4E
from psp_core.ops import FusedLeakyReLU
from psp_core.psp import PSP, n_styles_for
from psp_core.restyle import ReStyle
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

__all__ = [
    "e4e_opts",
    "normal",
    "psp_opts",
    "random_checkpoint",
    "random_e4e_checkpoint",
    "random_restyle_checkpoint",
    "restyle_opts",
    "random_latent_avg",
    "random_stylegan2_checkpoint",
    "randomize_",
    "seeded_rng",
    "uniform",
]

# Gain of the random ToRGB weights: keeps the summed RGB skip path near [-1, 1].
_TO_RGB_GAIN = 0.35
_SQRT6 = math.sqrt(6.0)
# Spread of the random average W: the mean W of random mapping networks (positive-skewed by the
# leaky ReLUs) has about this mean and std per dimension.
_W_AVG_MEAN, _W_AVG_STD = 0.45, 0.8


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


def seeded_rng(seed: int) -> np.random.Generator:
    """numpy's PCG64 stream for ``seed``: the same numbers on every platform and CPU."""
    return np.random.Generator(np.random.PCG64(seed))


def _uniform_np(rng: np.random.Generator, shape, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    return low + (high - low) * rng.random(tuple(shape))


def _normal_np(rng: np.random.Generator, shape, std: float = 1.0, mean: float = 0.0) -> np.ndarray:
    # Zero mean, unit variance (triangular: the sum of two uniforms), from float64 additions and
    # multiplications only: exactly rounded, so the bytes cannot depend on the CPU (numpy's
    # standard_normal calls libm's exp/log in its tail, torch.randn vectorises per CPU capability).
    shape = tuple(shape)
    x = rng.random(shape)
    x += rng.random(shape)
    x -= 1.0
    x *= _SQRT6 * std
    x += mean
    return x


def uniform(rng: np.random.Generator, shape, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """float32 tensor of ``shape``, uniform in ``[low, high)``, drawn from ``rng`` (platform-independent)."""
    return torch.from_numpy(_uniform_np(rng, shape, low, high).astype(np.float32))


def normal(rng: np.random.Generator, shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """float32 tensor of ``shape`` with the given mean and std (a bounded, bell-shaped stand-in for
    a Gaussian: the sum of two uniforms), drawn from ``rng`` (platform-independent)."""
    return torch.from_numpy(_normal_np(rng, shape, std, mean).astype(np.float32))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer of a pSp / StyleGAN2 module with seeded random values
    (in place), scaled to keep activations finite. Returns ``module``.
    """
    gen = seeded_rng(seed)
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            # Leaky heads lose half the variance per layer; other convs are variance preserving.
            gain = math.sqrt(2) if ".styles." in f".{name}." else 1.0
            m.weight.copy_(normal(gen, m.weight.shape, gain / math.sqrt(fan_in)))
            if m.bias is not None:
                m.bias.copy_(normal(gen, m.bias.shape, 0.05))
        elif isinstance(m, nn.BatchNorm2d):
            # The BN closing a residual branch (IR's res_layer.4, ResNet's bn2) is damped so 24 (16)
            # units do not explode.
            damp = name.endswith(("res_layer.4", ".bn2"))
            m.weight.copy_(uniform(gen, m.weight.shape, 0.1, 0.4) if damp else uniform(gen, m.weight.shape, 0.5, 1.5))
            m.bias.copy_(normal(gen, m.bias.shape, 0.1))
            m.running_mean.copy_(normal(gen, m.running_mean.shape, 0.1))
            m.running_var.copy_(uniform(gen, m.running_var.shape, 0.5, 2.0))
            m.num_batches_tracked.fill_(int(gen.integers(1, 1_000_000)))
        elif isinstance(m, nn.PReLU):
            m.weight.copy_(uniform(gen, m.weight.shape, 0.0, 0.5))
        elif isinstance(m, nn.Linear):
            m.weight.copy_(normal(gen, m.weight.shape, 1 / math.sqrt(m.in_features)))
            m.bias.copy_(normal(gen, m.bias.shape, 0.05))
        elif isinstance(m, EqualLinear):
            m.weight.copy_(normal(gen, m.weight.shape, 1 / m.lr_mul))
            if m.bias is not None:
                bias_init = 1.0 if name.endswith("modulation") else 0.0
                m.bias.copy_(normal(gen, m.bias.shape, 0.1 / m.lr_mul, bias_init / m.lr_mul))
        elif isinstance(m, ModulatedConv2d):
            gain = _TO_RGB_GAIN if not m.demodulate else 1.0
            m.weight.copy_(normal(gen, m.weight.shape, gain))
        elif isinstance(m, (Blur, Upsample)):
            # A random positive, asymmetric kernel with the original's sum (factor**2 = 4).
            total = math.fsum(m.kernel.flatten().tolist())
            k = _uniform_np(gen, m.kernel.shape, 0.2, 1.0)
            m.kernel.copy_(torch.from_numpy((k / math.fsum(k.flat) * total).astype(np.float32)))
        elif isinstance(m, NoiseInjection):
            m.weight.copy_(uniform(gen, m.weight.shape, 0.02, 0.2))
        elif isinstance(m, FusedLeakyReLU):
            m.bias.copy_(normal(gen, m.bias.shape, 0.1))
        elif isinstance(m, ToRGB):
            m.bias.copy_(normal(gen, m.bias.shape, 0.1))
        elif isinstance(m, ConstantInput):
            m.input.copy_(normal(gen, m.input.shape))
        elif isinstance(m, Generator):
            for buf in m.noises.buffers():
                buf.copy_(normal(gen, buf.shape))
    return module


def random_latent_avg(seed: int, rows: int = 1) -> torch.Tensor:
    """A seeded stand-in for the generator's average W, ``[rows, 512]`` float32: one base vector
    with the spread of a random mapping network's mean W (mean 0.45, std 0.8 per dimension); with
    ``rows > 1`` each row is the base plus its own perturbation (std 0.2), as the per-style averages
    drift apart in training. Platform-independent (PCG64, no mapping-network matmuls).
    """
    rng = seeded_rng(seed)
    base = _normal_np(rng, (1, 512), _W_AVG_STD, _W_AVG_MEAN)
    if rows > 1:
        base = base + _normal_np(rng, (rows, 512), 0.25 * _W_AVG_STD)
    return torch.from_numpy(base.astype(np.float32))


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
    with ``latent_avg`` (only when ``start_from_latent_avg``) from :func:`random_latent_avg`:
    ``[1, 512]`` with ``learn_in_w``, else ``[n_styles, 512]`` with distinct rows, as after
    training. Every tensor comes from numpy's PCG64 with float64 elementwise arithmetic (no torch
    RNG, no BLAS), so the bytes are the same on every CPU (tests/test_fidelity_golden.py pins them).

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
    else:
        # The encoder (most of the weights) skips PyTorch's default init: randomize_ overwrites
        # every encoder tensor. The decoder is built normally (randomize_ keeps its blur kernels'
        # sums).
        with torch.device("meta"):
            net = PSP(full_opts)
        net.encoder.to_empty(device="cpu")
        net.decoder = Generator(output_size, 512, 8)
        net = randomize_(net, seed)
        net.eval()
    ckpt: dict[str, Any] = {"state_dict": net.state_dict(), "opts": opts}
    if start_from_latent_avg and latent_avg_shape != "none":
        if latent_avg_shape == "flat":
            ckpt["latent_avg"] = random_latent_avg(seed + 1)[0]
        elif latent_avg_shape == "official":
            # Distinct rows, so that a loader or forward that used row 0 for every style could not
            # pass the tests.
            ckpt["latent_avg"] = random_latent_avg(seed + 1, 1 if learn_in_w else net.n_styles)
        else:
            raise ValueError(f"latent_avg_shape={latent_avg_shape!r}: expected 'official', 'flat' or 'none'")
    return _save(ckpt, path)


def e4e_opts(
    stylegan_size: int = 64, encoder_type: str = "Encoder4Editing", dataset_type: str = "ffhq_encode"
) -> dict[str, Any]:
    """An ``opts`` dict like e4e's ``vars(TrainOptions().parse())`` for a released file: the generator
    size is ``stylegan_size`` (there is no ``output_size`` or ``input_nc``), progressive training on."""
    return {
        "exp_dir": "experiment",
        "dataset_type": dataset_type,
        "encoder_type": encoder_type,
        "batch_size": 8,
        "test_batch_size": 4,
        "workers": 8,
        "test_workers": 4,
        "learning_rate": 0.0001,
        "optim_name": "ranger",
        "train_decoder": False,
        "start_from_latent_avg": True,
        "lpips_type": "alex",
        "lpips_lambda": 0.8,
        "id_lambda": 0.5,
        "l2_lambda": 1.0,
        "stylegan_weights": "pretrained_models/stylegan2-ffhq-config-f.pt",
        "stylegan_size": stylegan_size,
        "checkpoint_path": None,
        "max_steps": 200000,
        "image_interval": 100,
        "board_interval": 50,
        "val_interval": 10000,
        "save_interval": 200000,
        "w_discriminator_lambda": 0.1,
        "w_discriminator_lr": 2e-05,
        "r1": 10,
        "d_reg_every": 16,
        "use_w_pool": True,
        "w_pool_size": 50,
        "delta_norm": 2,
        "delta_norm_lambda": 0.0002,
        "progressive_steps": [0, *range(20000, 20000 + 2000 * (n_styles_for(stylegan_size) - 1), 2000)],
        "progressive_start": 20000,
        "progressive_step_every": 2000,
        "save_training_data": False,
        "sub_exp_dir": None,
        "keep_optimizer": False,
        "resume_training_from_ckpt": None,
        "update_param_list": None,
        "device": "cuda:0",
    }


def restyle_opts(
    output_size: int = 64, encoder_type: str = "BackboneEncoder", dataset_type: str = "ffhq_encode"
) -> dict[str, Any]:
    """An ``opts`` dict like ReStyle's training options for a released file (``input_nc`` 6)."""
    opts: dict[str, Any] = {
        "exp_dir": "experiment",
        "dataset_type": dataset_type,
        "encoder_type": encoder_type,
        "input_nc": 6,
        "output_size": output_size,
        "batch_size": 8,
        "test_batch_size": 8,
        "workers": 8,
        "test_workers": 8,
        "learning_rate": 0.0001,
        "optim_name": "ranger",
        "train_decoder": False,
        "start_from_latent_avg": True,
        "lpips_lambda": 0.8,
        "id_lambda": 0.1,
        "l2_lambda": 1.0,
        "w_norm_lambda": 0.0,
        "moco_lambda": 0.0,
        "stylegan_weights": "pretrained_models/stylegan2-ffhq-config-f.pt",
        "checkpoint_path": None,
        "max_steps": 500000,
        "image_interval": 100,
        "board_interval": 50,
        "val_interval": 1000,
        "save_interval": 10000,
        "n_iters_per_batch": 5,
        "device": "cuda:0",
    }
    if encoder_type in ("ProgressiveBackboneEncoder", "ResNetProgressiveBackboneEncoder"):
        opts.update(
            w_discriminator_lambda=0.1, w_discriminator_lr=2e-05, r1=10, d_reg_every=16, use_w_pool=True,
            w_pool_size=50, delta_norm=2, delta_norm_lambda=0.0002, progressive_steps=None,
            progressive_start=20000, progressive_step_every=2000, save_training_data=False,
            sub_exp_dir=None, resume_training_from_ckpt=None, update_param_list=None,
        )
    return opts


def _random_family_checkpoint(
    path: str | os.PathLike, cls: type[PSP], opts: dict[str, Any], model_opts: dict[str, Any], seed: int,
    latent_avg_shape: str,
) -> str:
    with torch.device("meta"):
        net = cls(model_opts)
    net.encoder.to_empty(device="cpu")
    net.decoder = Generator(int(model_opts["output_size"]), 512, 8)
    net = randomize_(net, seed).eval()
    ckpt: dict[str, Any] = {"state_dict": net.state_dict(), "opts": opts}
    if latent_avg_shape == "official":
        ckpt["latent_avg"] = random_latent_avg(seed + 1, net.n_styles)
    elif latent_avg_shape == "flat":
        ckpt["latent_avg"] = random_latent_avg(seed + 1)[0]
    elif latent_avg_shape != "none":
        raise ValueError(f"latent_avg_shape={latent_avg_shape!r}: expected 'official', 'flat' or 'none'")
    return _save(ckpt, path)


def random_e4e_checkpoint(
    path: str | os.PathLike,
    output_size: int = 64,
    encoder_type: str = "Encoder4Editing",
    dataset_type: str = "ffhq_encode",
    seed: int = 0,
    latent_avg_shape: str = "official",
) -> str:
    """Write a seeded random-weight checkpoint in e4e's format and return ``path``:
    ``{'state_dict': encoder.* + decoder.*, 'opts': e4e_opts(...), 'latent_avg': [n_styles, 512]}``
    (``latent_avg`` as e4e's coach saves it: repeated over the styles, here with distinct rows).

    Args:
        output_size: the generator size (stored as ``opts['stylegan_size']``).
        encoder_type: ``Encoder4Editing``, ``SingleStyleCodeEncoder`` or ``GradualStyleEncoder``.
        latent_avg_shape: ``"official"``, ``"flat"`` (``[512]``) or ``"none"``.
    """
    opts = e4e_opts(output_size, encoder_type, dataset_type)
    full = dict(opts, output_size=output_size, input_nc=3, learn_in_w=False)
    return _random_family_checkpoint(path, E4E, opts, full, seed, latent_avg_shape)


def random_restyle_checkpoint(
    path: str | os.PathLike,
    output_size: int = 64,
    encoder_type: str = "BackboneEncoder",
    dataset_type: str = "ffhq_encode",
    seed: int = 0,
    latent_avg_shape: str = "official",
) -> str:
    """Write a seeded random-weight checkpoint in ReStyle's format and return ``path``:
    ``{'state_dict': encoder.* + decoder.*, 'opts': restyle_opts(...), 'latent_avg': [n_styles, 512]}``.

    Args:
        encoder_type: ``BackboneEncoder``, ``ResNetBackboneEncoder`` (ReStyle over pSp),
            ``ProgressiveBackboneEncoder`` or ``ResNetProgressiveBackboneEncoder`` (over e4e).
        dataset_type: ``cars_encode`` gives the cars behaviour (192x256 inputs, cropped outputs).
        latent_avg_shape: ``"official"``, ``"flat"`` (``[512]``) or ``"none"``.
    """
    opts = restyle_opts(output_size, encoder_type, dataset_type)
    full = dict(opts, learn_in_w=False)
    return _random_family_checkpoint(path, ReStyle, opts, full, seed, latent_avg_shape)


def random_stylegan2_checkpoint(
    path: str | os.PathLike, size: int = 32, seed: int = 0, with_latent_avg: bool = True
) -> str:
    """Write a seeded random rosinality-format generator file ``{'g_ema': ..., 'latent_avg': [512]}``
    (as its ``convert_weight.py`` writes) and return ``path``.
    """
    gen = randomize_(Generator(size, 512, 8), seed).eval()
    ckpt: dict[str, Any] = {"g_ema": gen.state_dict()}
    if with_latent_avg:
        ckpt["latent_avg"] = random_latent_avg(seed + 1)[0]
    return _save(ckpt, path)
