"""Image metrics against scikit-image and known identities."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from psp_core import metrics


@pytest.fixture(scope="module")
def pair():
    """A 128x128 crop of the astronaut and a noisy, shifted copy of it (uint8 HxWx3)."""
    from skimage import data

    a = np.ascontiguousarray(data.astronaut()[100:228, 150:278])
    rng = np.random.default_rng(0)
    b = np.clip(np.roll(a, 2, axis=1).astype(int) + rng.integers(-25, 26, a.shape), 0, 255).astype(np.uint8)
    return a, b


def _to_float(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(2, 0, 1).double() / 127.5 - 1


def _sk_ssim(a, b, data_range):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, channel_axis=-1)


def test_identical_images():
    a = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert metrics.mse(a, a) == 0.0
    assert metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    f = _to_float(a)
    assert metrics.ssim(f, f) == pytest.approx(1.0, abs=1e-12)


def test_mse_and_psnr_known_values():
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    b = np.full((16, 16, 3), 10, dtype=np.uint8)
    assert metrics.mse(a, b) == pytest.approx(100.0)
    assert metrics.mse(b, a) == pytest.approx(100.0)  # no uint8 wrap-around
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    # float convention: [-1,1], data range 2
    fa, fb = torch.zeros(3, 16, 16), torch.full((3, 16, 16), 0.5)
    assert metrics.mse(fa, fb) == pytest.approx(0.25)
    assert metrics.psnr(fa, fb) == pytest.approx(10 * math.log10(4 / 0.25))


def test_psnr_matches_skimage(pair):
    a, b = pair
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    fa, fb = _to_float(a), _to_float(b)
    expected = peak_signal_noise_ratio(fa.numpy(), fb.numpy(), data_range=2)
    assert metrics.psnr(fa, fb) == pytest.approx(expected, abs=1e-9)
    # same relative error in either convention
    assert metrics.psnr(fa, fb) == pytest.approx(metrics.psnr(a, b), abs=1e-9)


def test_ssim_matches_skimage_uint8(pair):
    a, b = pair
    expected = _sk_ssim(a, b, 255)
    assert 0.2 < expected < 0.95  # a pair that exercises the formula, not a trivial one
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-6)


def test_ssim_matches_skimage_float(pair):
    a, b = pair
    fa, fb = _to_float(a), _to_float(b)
    expected = _sk_ssim(fa.permute(1, 2, 0).numpy(), fb.permute(1, 2, 0).numpy(), 2)
    assert metrics.ssim(fa, fb) == pytest.approx(expected, abs=1e-6)
    assert metrics.ssim(fa.float(), fb.float()) == pytest.approx(expected, abs=1e-4)
    assert metrics.ssim(fa.numpy(), fb.numpy()) == pytest.approx(expected, abs=1e-6)


def test_ssim_is_not_shift_invariant_so_conventions_differ(pair):
    # SSIM's luminance term depends on the mean: [-1,1] floats and uint8 give different values.
    # Documented behaviour; callers comparing with the literature use uint8 images.
    a, b = pair
    assert abs(metrics.ssim(a, b) - metrics.ssim(_to_float(a), _to_float(b))) > 1e-3


def test_batched_inputs_give_per_image_values(pair):
    a, b = pair
    fa, fb = _to_float(a), _to_float(b)
    batch_a, batch_b = torch.stack([fa, fa]), torch.stack([fb, fa])
    for fn in (metrics.mse, metrics.psnr, metrics.ssim):
        values = fn(batch_a, batch_b)
        assert isinstance(values, np.ndarray) and values.shape == (2,)
        assert values[0] == pytest.approx(fn(fa, fb), abs=1e-12)
        assert values[1] == pytest.approx(fn(fa, fa), abs=1e-12)
    u8 = metrics.ssim(np.stack([a, a]), np.stack([b, a]))
    assert u8 == pytest.approx([metrics.ssim(a, b), 1.0], abs=1e-12)


def test_mismatched_inputs_are_rejected(pair):
    a, b = pair
    with pytest.raises(ValueError, match="same shape"):
        metrics.mse(a, b[:64])
    with pytest.raises(ValueError, match="both be uint8"):
        metrics.ssim(a, _to_float(b))
    with pytest.raises(ValueError, match=r"HxWx3"):
        metrics.psnr(a[..., 0], b[..., 0])
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(a[:8, :8], b[:8, :8])


def test_importing_metrics_does_not_load_dlib():
    code = (
        "import sys, psp_core.metrics as m; "
        "assert 'dlib' not in sys.modules and 'psp_core.identity' not in sys.modules; "
        "print(m.ssim.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_identity_names_are_reexported_lazily():
    identity = pytest.importorskip("psp_core.identity")
    from psp_core.metrics import FaceDescriptor, identity_distance

    assert FaceDescriptor is identity.FaceDescriptor
    assert identity_distance is identity.identity_distance
    with pytest.raises(AttributeError):
        metrics.not_a_metric  # noqa: B018
