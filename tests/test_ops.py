"""psp_core.ops against direct, independently written definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psp_core.ops import FusedLeakyReLU, fused_leaky_relu, upfirdn2d


def naive_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    """Scatter form of upfirdn2d: every input sample lands at ``i*up + p0`` of the padded,
    upsampled signal and spreads into the outputs ``n`` whose window ``[n, n+kh)`` covers it,
    weighted by the flipped kernel (a true convolution); then every ``down``-th output is kept.
    """
    p0, p1 = pad
    b, c, h, w = x.shape
    kh, kw = k.shape
    full_h = h * up + p0 + p1 - kh + 1
    full_w = w * up + p0 + p1 - kw + 1
    full = np.zeros((b, c, full_h, full_w))
    for iy in range(h):
        my = iy * up + p0
        for ix in range(w):
            mx = ix * up + p0
            for ny in range(max(0, my - kh + 1), min(full_h, my + 1)):
                for nx in range(max(0, mx - kw + 1), min(full_w, mx + 1)):
                    full[:, :, ny, nx] += x[:, :, iy, ix] * k[kh - 1 - (my - ny), kw - 1 - (mx - nx)]
    return full[:, :, ::down, ::down]


@pytest.mark.parametrize(
    "up,down,pad,kshape",
    [
        (1, 1, (0, 0), (4, 4)),
        (2, 1, (2, 1), (4, 4)),  # the ToRGB skip Upsample
        (1, 1, (2, 2), (4, 4)),  # the Blur after the transposed conv
        (1, 2, (1, 1), (4, 4)),
        (2, 2, (1, -1), (3, 5)),
        (1, 1, (-1, 2), (2, 3)),
        (3, 1, (1, 1), (4, 4)),
    ],
)
def test_upfirdn2d_matches_direct_definition(up, down, pad, kshape):
    g = torch.Generator().manual_seed(sum(kshape) + up * 10 + down)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    # Asymmetric kernel: a missing flip or swapped axes changes the result.
    k = torch.rand(kshape, generator=g, dtype=torch.float64)
    out = upfirdn2d(x, k, up=up, down=down, pad=pad)
    expected = naive_upfirdn2d(x.numpy(), k.numpy(), up, down, pad)
    assert out.shape == expected.shape
    assert out.shape[2] == (5 * up + pad[0] + pad[1] - kshape[0]) // down + 1
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


def test_upfirdn2d_is_a_true_convolution_not_a_correlation():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0
    k = torch.arange(9.0).reshape(3, 3)
    # An impulse convolved with k reproduces k itself (a correlation would give it flipped).
    out = upfirdn2d(x, k, pad=(1, 1))
    assert torch.equal(out[0, 0], k)


def test_upfirdn2d_float32_upsample_keeps_a_constant_image_constant():
    x = torch.full((1, 2, 4, 4), 0.5)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = k[None, :] * k[:, None]
    k = k / k.sum() * 4
    out = upfirdn2d(x, k, up=2, pad=(2, 1))
    assert out.shape == (1, 2, 8, 8)
    # Away from the zero-padded border the 2x upsample of a constant is the constant.
    assert torch.allclose(out[:, :, 2:-2, 2:-2], torch.full_like(out[:, :, 2:-2, 2:-2], 0.5), atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 5), (2, 5, 7)])
def test_fused_leaky_relu_matches_plain_formula(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g)
    bias = torch.randn(5, generator=g)
    view = [1, 5] + [1] * (len(shape) - 2)
    y = x + bias.reshape(view)
    expected = torch.where(y >= 0, y, 0.2 * y) * math.sqrt(2)
    torch.testing.assert_close(fused_leaky_relu(x, bias), expected, rtol=0, atol=1e-6)
    y2 = x + bias.reshape(view)
    torch.testing.assert_close(
        fused_leaky_relu(x, bias, negative_slope=0.1, scale=3.0), torch.where(y2 >= 0, y2, 0.1 * y2) * 3.0
    )


def test_fused_leaky_relu_module_owns_its_bias():
    act = FusedLeakyReLU(4)
    assert list(act.state_dict()) == ["bias"] and act.bias.shape == (4,)
    with torch.no_grad():
        act.bias.copy_(torch.tensor([1.0, -1.0, 0.0, 2.0]))
    x = torch.zeros(1, 4, 2, 2)
    out = act(x)
    expected = torch.tensor([1.0, -0.2, 0.0, 2.0]) * math.sqrt(2)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
