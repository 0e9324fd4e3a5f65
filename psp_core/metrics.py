"""Image-similarity metrics between an input and its reconstruction: MSE, PSNR and SSIM.

Two input conventions, decided by dtype:
- uint8 images HxWx3 (or a batch BxHxWx3): values 0..255, data range 255;
- float images [3,H,W] (or a batch [B,3,H,W]), torch or numpy, in [-1,1] as pSp outputs: data range 2.
Both arguments must use the same convention and shape. A single image gives a Python float, a batch
gives a float64 numpy array [B] (one value per image). Everything is computed in float64 numpy.

`FaceDescriptor` and `identity_distance` (dlib face embeddings, `psp_core.identity`) are re-exported
here lazily, so importing this module never loads dlib.
"""
from __future__ import annotations

import importlib
from typing import Union

import numpy as np
import torch

__all__ = ["mse", "psnr", "ssim", "FaceDescriptor", "identity_distance"]  # noqa: F822 - the last two via __getattr__

ImageLike = Union[np.ndarray, torch.Tensor]

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): the 11-tap window of Wang et al. 2004
SSIM_K1 = 0.01
SSIM_K2 = 0.03

_LAZY = {"FaceDescriptor": "psp_core.identity", "identity_distance": "psp_core.identity"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'psp_core.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _prepare(a: ImageLike, b: ImageLike, data_range: float | None):
    """-> (a, b) as float64 [B,C,H,W], default data range, whether the input was batched."""
    arrays = []
    for name, x in (("a", a), ("b", b)):
        if torch.is_tensor(x):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
                x = x.float()
            x = x.numpy()
        elif not isinstance(x, np.ndarray):
            raise TypeError(f"metrics: {name} must be a numpy array or torch tensor, got {type(x).__name__}")
        arrays.append(x)
    a, b = arrays
    a_u8, b_u8 = a.dtype == np.uint8, b.dtype == np.uint8
    if a_u8 != b_u8:
        raise ValueError(
            f"metrics: a ({a.dtype}) and b ({b.dtype}) must both be uint8 HxWx3 images or both float "
            "[3,H,W] tensors in [-1,1]; convert one first (e.g. psp_core.tasks.tensor2im)"
        )
    if a.shape != b.shape:
        raise ValueError(f"metrics: a and b must have the same shape, got {a.shape} and {b.shape}")
    if a_u8:
        if a.ndim not in (3, 4) or a.shape[-1] != 3:
            raise ValueError(f"metrics: uint8 images must be HxWx3 or BxHxWx3, got shape {a.shape}")
        batched = a.ndim == 4
        # channels-last -> channels-first
        a, b = np.moveaxis(a, -1, -3), np.moveaxis(b, -1, -3)
        default_range = 255.0
    else:
        if not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)):
            raise ValueError(f"metrics: expected uint8 or float images, got {a.dtype} and {b.dtype}")
        if a.ndim not in (3, 4) or a.shape[-3] != 3:
            raise ValueError(f"metrics: float images must be [3,H,W] or [B,3,H,W], got shape {a.shape}")
        batched = a.ndim == 4
        default_range = 2.0
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not batched:
        a, b = a[None], b[None]
    return a, b, (default_range if data_range is None else float(data_range)), batched


def _result(values: np.ndarray, batched: bool):
    return values if batched else float(values[0])


def mse(a: ImageLike, b: ImageLike) -> float | np.ndarray:
    """Mean squared error over channels and pixels, in the inputs' own units (0..255 for uint8,
    [-1,1] for float). Single image -> float; batch -> float64 array [B]."""
    a, b, _, batched = _prepare(a, b, None)
    return _result(np.mean((a - b) ** 2, axis=(1, 2, 3)), batched)


def psnr(a: ImageLike, b: ImageLike, data_range: float | None = None) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB: 10*log10(data_range^2 / mse). data_range defaults to 255 for
    uint8 and 2 for float [-1,1] inputs. Identical images give +inf (as skimage)."""
    a, b, r, batched = _prepare(a, b, data_range)
    err = np.mean((a - b) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10((r * r) / err)
    return _result(values, batched)


def _gaussian_taps(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _blur(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the last two axes, mirror padding (d c b a | a b c d)."""
    r = (len(taps) - 1) // 2
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, pad + [(r, r), (0, 0)], mode="symmetric")
    y = sum(t * xp[..., i : i + h, :] for i, t in enumerate(taps))
    yp = np.pad(y, pad + [(0, 0), (r, r)], mode="symmetric")
    return sum(t * yp[..., :, i : i + w] for i, t in enumerate(taps))


def ssim(a: ImageLike, b: ImageLike, data_range: float | None = None) -> float | np.ndarray:
    """Structural similarity (Wang et al. 2004): 11-tap Gaussian window (sigma 1.5), K1 0.01,
    K2 0.03, population covariances, averaged over channels and over pixels at least 5 pixels
    from the border. Matches `skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=-1)`. Images must be at least 11x11.
    Identical images give 1.0. SSIM's luminance term is not shift-invariant, so [-1,1] floats give
    a different value from the same images as uint8; quote uint8 values (`tensor2im` first) when
    comparing with the literature."""
    a, b, r, batched = _prepare(a, b, data_range)
    h, w = a.shape[-2:]
    win = 2 * SSIM_RADIUS + 1
    if h < win or w < win:
        raise ValueError(f"ssim: images must be at least {win}x{win} pixels, got {h}x{w}")
    taps = _gaussian_taps()
    ux, uy = _blur(a, taps), _blur(b, taps)
    vx = _blur(a * a, taps) - ux * ux
    vy = _blur(b * b, taps) - uy * uy
    vxy = _blur(a * b, taps) - ux * uy
    c1 = (SSIM_K1 * r) ** 2
    c2 = (SSIM_K2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    p = SSIM_RADIUS
    values = s[..., p : h - p, p : w - p].mean(axis=(1, 2, 3))
    return _result(values, batched)
