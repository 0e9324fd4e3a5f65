"""Fidelity to the ORIGINAL pixel2style2pixel, pinned by golden outputs (no original code here).

``tests/data/psp_golden_32.npz`` holds outputs that the original pSp code (``models/psp.py`` of
eladrich/pixel2style2pixel with rosinality's StyleGAN2, assembled outside the repo with CPU
versions of its two CUDA ops) computed on checkpoints written by
``psp_core.testing.random_checkpoint`` at output_size 32 (n_styles 8), one per case in ``CASES``:
GradualStyleEncoder (input_nc 3), BackboneEncoderUsingLastLayerIntoW (learn_in_w), plus the same
W weights with a ``[8, 512]`` latent_avg (trained without --learn_in_w), W+ encoder, and
GradualStyleEncoder input_nc 19 on one-hot segmentation maps. Each test rebuilds its checkpoint
from the seed, checks the weights' sha256 (tensor bytes in sorted key order, see ``weights_sha256``:
independent of torch's file layout), then compares ``forward(x, resize=False,
randomize_noise=False, return_latents=True)`` (images [B, 3, 32, 32] and W+ [B, 8, 512]) and one
latent_mask case (on the first input) per checkpoint but the seg one with the golden values at
atol 1e-4. Kept to about ten encoder passes in all: the encoder is full size at any output size.

Everything pinned here is platform-independent: ``random_checkpoint`` and the inputs draw from
numpy's PCG64 through float64 elementwise arithmetic (no torch RNG, no BLAS), so the weights' and
inputs' sha256 are the same on every CPU (CI runs this file again under
``ATEN_CPU_CAPABILITY=default``); only the forward passes differ by float rounding, far below atol.

Regenerating (only needed when ``random_checkpoint``'s init or the inputs change -- the tests
say so): the generator script is deliberately NOT in the repo, because it imports the original
code. Recipe: a scratch copy of the original under /tmp/audit_ref (``git archive`` of
eladrich/pixel2style2pixel's ``models``, ``configs`` and ``utils``), with the CUDA sources in
``models/stylegan2/op/`` deleted and ``upfirdn2d.py`` / ``fused_act.py`` replaced by pure-PyTorch
CPU versions: ``upfirdn2d(input, kernel, up, down, pad)`` = rosinality's ``upfirdn2d_native`` (its
current CPU path, output reshaped to ``[B, C, H', W']``), ``fused_leaky_relu(input, bias,
negative_slope, scale)`` = ``leaky_relu(input + bias.view(1, C, 1, ...), negative_slope) * scale``
and ``FusedLeakyReLU`` owning ``bias``. Then, with REPO the repository root:

    cd /tmp/audit_ref && REPO=/work/main PYTHONPATH=/tmp/audit_ref:/work/main \\
        /work/main/.venv/bin/python /tmp/golden_G/make_golden_32.py /work/main/tests/data/psp_golden_32.npz

For every case in ``CASES`` the script imports this file (``CASES``, ``make_input``,
``inject_z``, ``latent_avg_rows``, ``weights_sha256``, ``tensor_sha256``) and
``psp_core.testing.random_checkpoint``, writes ``random_checkpoint(path, output_size=32,
seed=case['seed'], **case['kwargs'])``, records ``weights_sha256(path)``, loads the ORIGINAL pSp
like its ``scripts/inference.py`` (opts from the file, ``checkpoint_path`` = the file,
``device='cpu'``, ``learn_in_w`` default False, ``output_size`` default 1024), records the
inputs' sha256 and runs it under ``torch.no_grad()``: ``net(x, resize=False,
randomize_noise=False, return_latents=True)`` -> ``image``, ``latents``; for cases with a
``mask`` and inject: ``inject`` = latents of ``net(inject_z(case), input_code=True,
return_latents=True, randomize_noise=False)``, then ``net(x[:1], latent_mask=mask,
inject_latent=inject, alpha=alpha, resize=False, randomize_noise=False, return_latents=True)`` ->
``mask_image``, ``mask_latents`` (without inject: the same call without ``inject_latent``); for
the W case also ``latent_avg_rows`` = ``latent_avg_rows(case, net.latent_avg)`` set as
``net.latent_avg`` with ``net.opts.learn_in_w = False``, run on ``x[:1]`` -> ``nolearn_image``,
``nolearn_latents``. All saved float32 under ``<case>/<name>`` with ``np.savez_compressed``, plus
``<case>/weights_sha256`` and ``<case>/input_sha256``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from psp_core.checkpoint import load_psp
from psp_core.testing import normal, random_checkpoint, seeded_rng, uniform

GOLDEN = Path(__file__).parent / "data" / "psp_golden_32.npz"
REGENERATE = (
    "cd /tmp/audit_ref && REPO=/work/main PYTHONPATH=/tmp/audit_ref:/work/main "
    "/work/main/.venv/bin/python /tmp/golden_G/make_golden_32.py /work/main/tests/data/psp_golden_32.npz "
    "(recipe in the docstring of tests/test_fidelity_golden.py)"
)
ATOL = 1e-4
OUTPUT_SIZE = 32

CASES: dict[str, dict] = {
    "gse_nc3": dict(
        kwargs=dict(encoder_type="GradualStyleEncoder", input_nc=3),
        seed=101, batch=2, input="signed", mask=[1, 4, 6], inject=True, alpha=0.3,
    ),
    "w_learn_in_w": dict(
        kwargs=dict(encoder_type="BackboneEncoderUsingLastLayerIntoW", input_nc=3, learn_in_w=True),
        # W code [B, 512]: the mask names W DIMENSIONS (zeroed), as in the original.
        seed=102, batch=1, input="signed", mask=[1, 7, 300], inject=False, alpha=None,
    ),
    "wplus_nc3": dict(
        kwargs=dict(encoder_type="BackboneEncoderUsingLastLayerIntoWPlus", input_nc=3),
        seed=103, batch=1, input="signed", mask=[0, 3, 7], inject=True, alpha=None,
    ),
    "gse_nc19_seg": dict(
        kwargs=dict(
            encoder_type="GradualStyleEncoder", input_nc=19, label_nc=19, dataset_type="celebs_seg_to_face"
        ),
        seed=104, batch=1, input="onehot", mask=None, inject=False, alpha=None,
    ),
}


def make_input(case: dict) -> torch.Tensor:
    """The case's seeded input ``[B, input_nc, 256, 256]`` float32: uniform in [-1, 1], or a
    one-hot map of uniformly random labels (as the seg task's ToOneHot + ``.float()``).
    Drawn from PCG64, like the weights, so the bytes do not depend on the CPU."""
    rng = seeded_rng(1000 + case["seed"])
    nc = case["kwargs"]["input_nc"]
    if case["input"] == "onehot":
        labels = torch.from_numpy(rng.integers(0, nc, (case["batch"], 256, 256)))
        return torch.nn.functional.one_hot(labels, nc).permute(0, 3, 1, 2).float().contiguous()
    return uniform(rng, (case["batch"], nc, 256, 256), -1.0, 1.0)


def inject_z(case: dict) -> torch.Tensor:
    """The Z code ``[1, 512]`` whose W is injected in the latent_mask cases."""
    return normal(seeded_rng(case["seed"] + 7), (1, 512))


def latent_avg_rows(case: dict, latent_avg: torch.Tensor) -> torch.Tensor:
    """A per-style ``latent_avg [8, 512]`` for the W encoder case trained without --learn_in_w."""
    return normal(seeded_rng(case["seed"] + 9), (8, 512), 0.3) + latent_avg.reshape(1, 512)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 over a checkpoint's tensors -- ``state_dict`` in sorted key order, then
    ``latent_avg`` -- each as name, dtype, shape and raw bytes (not the file's bytes)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    h = hashlib.sha256()
    items = sorted(ckpt["state_dict"].items())
    if ckpt.get("latent_avg") is not None:
        items.append(("latent_avg", ckpt["latent_avg"]))
    for name, t in items:
        t = t.detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _close(name: str, ours: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(ref)
    assert tuple(ours.shape) == tuple(ref_t.shape), f"{name}: shape {tuple(ours.shape)} vs golden {tuple(ref_t.shape)}"
    diff = (ours.double() - ref_t.double()).abs().max().item()
    assert diff <= ATOL, f"{name}: max |ours - original| = {diff:.3e} > {ATOL}"
    return diff


@pytest.mark.parametrize("name", list(CASES))
@torch.inference_mode()
def test_outputs_match_the_original(tmp_path, golden, name):
    case = CASES[name]
    path = random_checkpoint(tmp_path / f"{name}.pt", output_size=OUTPUT_SIZE, seed=case["seed"], **case["kwargs"])
    try:
        sha = weights_sha256(path)
        assert sha == str(golden[f"{name}/weights_sha256"]), (
            f"{name}: random_checkpoint(seed={case['seed']}) no longer writes the weights the golden "
            f"outputs were computed on (sha256 {sha}); if that change is intended, regenerate the golden "
            f"file with: {REGENERATE}"
        )
        net = load_psp(path)
    finally:
        os.remove(path)  # up to 0.6 GB; the model holds its own copy
    x = make_input(case)
    assert tensor_sha256(x) == str(golden[f"{name}/input_sha256"]), (
        f"{name}: the seeded inputs changed; regenerate the golden file with: {REGENERATE}"
    )
    g = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(name + "/")}
    diffs = {}

    images, latents = net(x, resize=False, randomize_noise=False, return_latents=True)
    diffs["image"] = _close(f"{name} image", images, g["image"])
    diffs["latents"] = _close(f"{name} latents", latents, g["latents"])

    if case["mask"] is not None:
        kwargs = {}
        if case["inject"]:
            _, inject = net(inject_z(case), input_code=True, return_latents=True, randomize_noise=False)
            diffs["inject"] = _close(f"{name} inject (input_code=True)", inject, g["inject"])
            kwargs = dict(inject_latent=torch.from_numpy(g["inject"]), alpha=case["alpha"])
        images, latents = net(
            x[:1], latent_mask=case["mask"], resize=False, randomize_noise=False, return_latents=True, **kwargs
        )
        diffs["mask_image"] = _close(f"{name} latent_mask image", images, g["mask_image"])
        diffs["mask_latents"] = _close(f"{name} latent_mask latents", latents, g["mask_latents"])

    if "nolearn_image" in g:
        # The same W encoder with a per-style latent_avg [8, 512] (trained without --learn_in_w).
        net.opts["learn_in_w"] = False
        rows = latent_avg_rows(case, net.latent_avg)
        diffs["latent_avg_rows"] = _close(f"{name} latent_avg rows", rows, g["latent_avg_rows"])
        net.latent_avg = rows
        images, latents = net(x[:1], resize=False, randomize_noise=False, return_latents=True)
        diffs["nolearn_image"] = _close(f"{name} W + latent_avg[8,512] image", images, g["nolearn_image"])
        diffs["nolearn_latents"] = _close(f"{name} W + latent_avg[8,512] latents", latents, g["nolearn_latents"])
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})
