"""psp_core.editing: every direction format, exact edits, fitted directions, the decoder."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from psp_core.editing import (
    Direction,
    DirectionError,
    edit,
    fit_direction,
    load_decoder,
    load_direction,
)

N_STYLES = 8  # the tiny 32px checkpoint


def _latents(n=5, n_styles=N_STYLES, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n_styles, 512)).astype(np.float32)


def _save_as_saved_on_cuda(tensor: torch.Tensor, path) -> None:
    """torch.save, then rewrite the storage location 'cpu' -> 'cuda:0' in the pickle, as a file
    saved from a GPU (e4e's pose.pt) has it. Protocol-2 BINUNICODE strings carry their length."""
    buf = io.BytesIO()
    torch.save(tensor, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info.filename, data)


def _expected_linear(w: np.ndarray, d: np.ndarray, s) -> np.ndarray:
    """w + s * d in float32, product then sum (numpy)."""
    d = d.reshape((1, 1, 512) if d.size == 512 else (1, N_STYLES, 512)).astype(np.float32)
    s = np.asarray(s, np.float32).reshape(-1, 1, 1)
    return w + s * d


# -- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, suffix",
    [((1, 512), ".pt"), ((1, N_STYLES, 512), ".pt"), ((512,), ".npy"), ((N_STYLES, 512), ".npy"), ((1, 512), ".npy")],
)
def test_linear_formats_edit_exactly(tmp_path, shape, suffix):
    d = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    path = tmp_path / f"smile{suffix}"
    if suffix == ".pt":
        torch.save(torch.from_numpy(d), path)
    else:
        np.save(path, d)
    direction = load_direction(path)
    assert direction.kind == "linear" and direction.name == "smile" and direction.sha256
    w = _latents()
    for s in (-3.0, 0.0, 0.7, 3.0):
        out = edit(w, direction, s)
        assert out.dtype == np.float32 and out.shape == w.shape
        np.testing.assert_array_equal(out, _expected_linear(w, d, s))  # exact, not approximately
    per_row = np.array([-2, -1, 0, 1, 2.5], np.float32)
    np.testing.assert_array_equal(edit(w, direction, per_row), _expected_linear(w, d, per_row))
    # torch in, torch out, same bytes
    t = edit(torch.from_numpy(w), direction, per_row)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), _expected_linear(w, d, per_row))


def test_direction_saved_on_cuda_loads_on_cpu(tmp_path):
    d = torch.randn(1, 512, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "pose.pt"
    _save_as_saved_on_cuda(d, path)
    if not torch.cuda.is_available():  # the file really names a CUDA storage
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    direction = load_direction(path)
    assert direction.vector.device.type == "cpu"
    np.testing.assert_array_equal(direction.vector.numpy(), d[0].numpy())


def _e4e_ganspace_loop(latents, pca, edits):
    """An independent, loop-by-loop statement of the e4e GANSpace edit (one latent at a time)."""
    out = []
    for latent in latents:  # [n, 512]
        for idx, start, end, strength in edits:
            centered = latent - pca["mean"]  # [n, 512]
            coord = float(np.sum(centered[0].reshape(-1).astype(np.float64) * pca["comp"][idx].reshape(-1))) / float(pca["std"][idx])
            delta = (strength - coord) * pca["comp"][idx] * pca["std"][idx]  # [1, 512]
            padded = np.zeros_like(latent)
            padded[start:end] += np.repeat(delta, end - start, axis=0)
            out.append(latent + padded)
    return np.stack(out)


@pytest.mark.parametrize("fmt", ["e4e_pt", "ganspace_npz"])
def test_ganspace_formats(tmp_path, fmt):
    rng = np.random.default_rng(2)
    k = 6
    comp = rng.standard_normal((k, 1, 512)).astype(np.float32)
    comp /= np.linalg.norm(comp, axis=-1, keepdims=True)
    pca = {"mean": rng.standard_normal((1, 512)).astype(np.float32), "comp": comp,
           "std": rng.uniform(0.5, 3, k).astype(np.float32)}
    if fmt == "e4e_pt":
        path = tmp_path / "ffhq_pca.pt"
        torch.save({key: torch.from_numpy(v) for key, v in pca.items()}, path)
    else:
        path = tmp_path / "stylegan2-ffhq_style_ipca_c80_n1000000_w.npz"
        np.savez_compressed(path, lat_mean=pca["mean"], lat_comp=pca["comp"], lat_stdev=pca["std"],
                            act_mean=np.zeros(3, np.float32))
    with pytest.raises(DirectionError, match="ganspace-edit"):
        load_direction(path)  # which component and styles must be said
    direction = load_direction(path, ganspace_edit=(4, 2, 5))
    assert direction.kind == "ganspace" and direction.name.endswith("[4,2:5]")
    w = _latents(4)
    for s in (-5.0, 0.0, 8.0):
        got = edit(w, direction, s)
        want = _e4e_ganspace_loop(w, pca, [(4, 2, 5, s)])
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
        np.testing.assert_array_equal(got[:, :2], w[:, :2])  # styles outside start:end untouched
        np.testing.assert_array_equal(got[:, 5:], w[:, 5:])
    # with style 0 in the range, its coordinate along the component becomes the strength (in stds)
    from_zero = load_direction(path, ganspace_edit=(4, 0, 3))
    for s in (-5.0, 2.0):
        got = edit(w, from_zero, s)
        coord = ((got[:, 0] - pca["mean"][0]) @ comp[4, 0]) / pca["std"][4]
        np.testing.assert_allclose(coord, s, atol=1e-4)
        np.testing.assert_allclose(got, _e4e_ganspace_loop(w, pca, [(4, 0, 3, s)]), atol=2e-5, rtol=0)


def test_direction_errors(tmp_path):
    d = torch.zeros(1, N_STYLES + 2, 512)
    torch.save(d, tmp_path / "wrong_styles.pt")
    direction = load_direction(tmp_path / "wrong_styles.pt")
    with pytest.raises(DirectionError, match="10 styles but the latents have 8"):
        edit(_latents(), direction, 1.0)
    with pytest.raises(DirectionError, match="not a GANSpace PCA"):
        load_direction(tmp_path / "wrong_styles.pt", ganspace_edit=(0, 0, 1))
    np.save(tmp_path / "bad.npy", np.zeros((3, 7), np.float32))
    with pytest.raises(DirectionError, match=r"shape \[3, 7\]"):
        load_direction(tmp_path / "bad.npy")
    # a pickled Python object is refused, never executed
    import argparse

    torch.save({"direction": torch.zeros(512), "opts": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    with pytest.raises(DirectionError, match="weights_only"):
        load_direction(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        load_direction(tmp_path / "missing.pt")
    pca = {"mean": torch.zeros(1, 512), "comp": torch.zeros(3, 1, 512), "std": torch.ones(3)}
    torch.save(pca, tmp_path / "pca.pt")
    with pytest.raises(DirectionError, match="component 7 is outside"):
        load_direction(tmp_path / "pca.pt", ganspace_edit=(7, 0, 1))
    with pytest.raises(DirectionError, match="outside the latents"):
        edit(_latents(), load_direction(tmp_path / "pca.pt", ganspace_edit=(0, 4, 12)), 1.0)


# -- fitting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["logistic", "mean_difference"])
def test_fit_direction_recovers_a_planted_direction(method):
    rng = np.random.default_rng(7)
    n = 240
    planted = rng.standard_normal((N_STYLES, 512))
    planted /= np.linalg.norm(planted)
    base = rng.standard_normal((n, N_STYLES, 512)) * 0.2
    y = rng.random(n) < 0.4  # unbalanced
    w = (base + np.where(y, 1.0, -1.0)[:, None, None] * 2.0 * planted).astype(np.float32)
    d = fit_direction(w, y, method=method)
    assert d.shape == (N_STYLES, 512) and d.dtype == np.float32
    assert abs(np.linalg.norm(d) - 1) < 1e-5
    cos = float((d * planted).sum())
    assert cos > 0.9, cos  # recovered, and oriented towards True
    # a random direction is near-orthogonal (the test can fail)
    assert abs(float((fit_direction(w, rng.random(n) < 0.5, method=method) * planted).sum())) < 0.5
    # [N, 512] in -> [512] out
    shared = fit_direction(w.mean(axis=1), y, method=method)
    assert shared.shape == (512,)
    target = planted.mean(axis=0)
    assert float(shared @ target / np.linalg.norm(target)) > 0.8


def test_fit_direction_refuses_one_class():
    with pytest.raises(ValueError, match="at least 2 of each"):
        fit_direction(_latents(4), [True, True, True, False])
    with pytest.raises(ValueError, match="method"):
        fit_direction(_latents(4), [True, True, False, False], method="svm")


# -- decoding ------------------------------------------------------------------------------------


def test_load_decoder_equals_psp_decode(tiny_checkpoint, tmp_path):
    from psp_core import load_psp
    from psp_core.testing import random_stylegan2_checkpoint

    dec = load_decoder(tiny_checkpoint)
    assert dec.n_styles == N_STYLES and dec.output_size == 32 and dec.checkpoint_sha256
    assert not hasattr(dec, "encoder")
    net = load_psp(tiny_checkpoint)
    w = torch.from_numpy(_latents(3)) * 0.3 + net.latent_avg[None]
    with torch.inference_mode():
        np.testing.assert_array_equal(dec(w).numpy(), net.decode(w).numpy())
        np.testing.assert_array_equal(dec(w, resize=False).numpy(), net.decode(w, resize=False).numpy())
    sg2 = random_stylegan2_checkpoint(tmp_path / "g.pt", size=32, seed=4)
    dec2 = load_decoder(sg2)
    assert dec2.n_styles == N_STYLES
    with torch.inference_mode():
        assert dec2(w).shape == (3, 3, 256, 256)
    meta = load_decoder(tiny_checkpoint, device="meta")
    assert meta.n_styles == N_STYLES


def test_direction_in_memory():
    v = torch.ones(512)
    d = Direction(name="ones", kind="linear", vector=v)
    w = _latents(2)
    np.testing.assert_array_equal(edit(w, d, 2.0), w + np.float32(2.0) * np.ones(512, np.float32))
    with pytest.raises(DirectionError):
        Direction(name="x", kind="linear", vector=torch.ones(3))
