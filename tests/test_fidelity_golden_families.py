"""Fidelity of e4e and ReStyle to their ORIGINAL code, pinned by golden outputs (no original code here).

``tests/data/e4e_restyle_golden_32.npz`` holds outputs that the original code computed on the
checkpoints ``psp_core.testing.random_e4e_checkpoint`` / ``random_restyle_checkpoint`` write at
output_size 32 (n_styles 8), one per case in ``CASES``: e4e's ``Encoder4Editing`` (FFHQ, and cars
at 192x256 inputs) and ``SingleStyleCodeEncoder``; ReStyle over pSp (IR-SE50 ``BackboneEncoder``,
ResNet-34 ``ResNetBackboneEncoder`` on cars) and over e4e (``ProgressiveBackboneEncoder``,
``ResNetProgressiveBackboneEncoder`` on church). Each test rebuilds its checkpoint from the seed,
checks the weights' and inputs' sha256 (PCG64, platform-independent, as in
``test_fidelity_golden.py``), loads it with ``load_psp`` and compares at atol 1e-4: for e4e the W+
and the image of ``forward(x, resize=False, randomize_noise=False, return_latents=True)`` (and the
W+ with ``encoder.progressive_stage = 3``); for ReStyle the average image and, per iteration, the
W+ and the reconstruction of ``refine(x, n_iters, resize)``.

Regenerating (only when the writers' init or the inputs change -- the tests say so): the
generator script is NOT in the repo (it imports the original code). Scratch copies, made with
``git archive HEAD models configs utils options`` of omertov/encoder4editing (/tmp/audit_e4e) and
yuval-alaluf/restyle-encoder (/tmp/audit_restyle), each with ``models/stylegan2/op/`` replaced by
the same pure-PyTorch CPU ``upfirdn2d`` / ``fused_leaky_relu`` as described in
``test_fidelity_golden.py``; in the ReStyle copy ``resnet34(pretrained=True)`` becomes
``resnet34()`` (the checkpoint holds every weight) and ``get_average_image``'s ``.to('cuda')``
becomes ``.to('cpu')``; torchvision 0.28 unpacked from its wheel into /tmp/tv (its compiled ops
are not needed: ``torchvision/_meta_registrations.py`` emptied). Then:

    REPO=/work/main PYTHONPATH=/tmp/tv:/work/main /work/main/.venv/bin/python \\
        /tmp/golden_G/make_golden_families_32.py /work/main/tests/data/e4e_restyle_golden_32.npz

For every case the script writes the checkpoint with this file's ``write_checkpoint``, records
``weights_sha256``, builds the inputs with ``make_input`` and loads the ORIGINAL model as the
original inference scripts do (e4e: ``utils.model_utils.setup_model(path, 'cpu')``; ReStyle: opts
from the file updated with ``checkpoint_path``, ``device='cpu'``, ``n_iters_per_batch``,
``resize_outputs``, then ``pSp`` or ``e4e`` by ``ENCODER_TYPES``), under ``torch.no_grad()``:
e4e: ``net(x, resize=False, randomize_noise=False, return_latents=True)`` -> ``image``,
``latents``, then ``net.encoder.progressive_stage = ProgressiveStage(3)`` -> ``stage3_latents``;
ReStyle: ``avg_image = get_average_image(net, opts)`` and ``run_on_batch(x, net, opts,
avg_image)`` -> ``images [n_iters, B, 3, H, W]``, ``latents [n_iters, B, 8, 512]``. All float32
under ``<case>/<name>`` with ``np.savez_compressed``, plus ``<case>/weights_sha256`` and
``<case>/input_sha256``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fidelity_golden import tensor_sha256, weights_sha256

from psp_core.checkpoint import load_psp
from psp_core.testing import random_e4e_checkpoint, random_restyle_checkpoint, seeded_rng, uniform

GOLDEN = Path(__file__).parent / "data" / "e4e_restyle_golden_32.npz"
REGENERATE = (
    "REPO=/work/main PYTHONPATH=/tmp/tv:/work/main /work/main/.venv/bin/python "
    "/tmp/golden_G/make_golden_families_32.py /work/main/tests/data/e4e_restyle_golden_32.npz "
    "(recipe in the docstring of tests/test_fidelity_golden_families.py)"
)
ATOL = 1e-4
OUTPUT_SIZE = 32

CASES: dict[str, dict] = {
    "e4e_ffhq": {"family": "e4e", "encoder_type": "Encoder4Editing", "dataset_type": "ffhq_encode",
                 "seed": 201, "batch": 2},
    "e4e_w": {"family": "e4e", "encoder_type": "SingleStyleCodeEncoder", "dataset_type": "ffhq_encode",
              "seed": 202, "batch": 1},
    "e4e_cars": {"family": "e4e", "encoder_type": "Encoder4Editing", "dataset_type": "cars_encode",
                 "seed": 203, "batch": 1},
    # n_iters 5 (the default) once; 3 elsewhere to keep the encoder passes down.
    "restyle_psp_ffhq": {"family": "restyle_psp", "encoder_type": "BackboneEncoder",
                         "dataset_type": "ffhq_encode", "seed": 301, "batch": 1, "n_iters": 5, "resize": False},
    # Cars with resize_outputs: the original's full-size crop [64:448] only fits a 512 generator.
    "restyle_psp_cars": {"family": "restyle_psp", "encoder_type": "ResNetBackboneEncoder",
                         "dataset_type": "cars_encode", "seed": 302, "batch": 1, "n_iters": 3, "resize": True},
    "restyle_e4e_ffhq": {"family": "restyle_e4e", "encoder_type": "ProgressiveBackboneEncoder",
                         "dataset_type": "ffhq_encode", "seed": 303, "batch": 2, "n_iters": 3, "resize": False},
    "restyle_e4e_church": {"family": "restyle_e4e", "encoder_type": "ResNetProgressiveBackboneEncoder",
                           "dataset_type": "church_encode", "seed": 304, "batch": 1, "n_iters": 3, "resize": False},
}


def write_checkpoint(path: str | os.PathLike, case: dict) -> str:
    writer = random_e4e_checkpoint if case["family"] == "e4e" else random_restyle_checkpoint
    return writer(path, output_size=OUTPUT_SIZE, encoder_type=case["encoder_type"],
                  dataset_type=case["dataset_type"], seed=case["seed"])


def make_input(case: dict) -> torch.Tensor:
    """The case's seeded RGB input ``[B, 3, H, W]`` in [-1, 1] (192x256 for cars), from PCG64."""
    h, w = (192, 256) if case["dataset_type"] == "cars_encode" else (256, 256)
    return uniform(seeded_rng(2000 + case["seed"]), (case["batch"], 3, h, w), -1.0, 1.0)


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


def _load(tmp_path, golden, name: str):
    case = CASES[name]
    path = write_checkpoint(tmp_path / f"{name}.pt", case)
    try:
        sha = weights_sha256(path)
        assert sha == str(golden[f"{name}/weights_sha256"]), (
            f"{name}: the random {case['family']} checkpoint (seed={case['seed']}) no longer has the weights the "
            f"golden outputs were computed on (sha256 {sha}); if intended, regenerate with: {REGENERATE}"
        )
        net = load_psp(path, n_iters=case.get("n_iters"))
    finally:
        os.remove(path)
    x = make_input(case)
    assert tensor_sha256(x) == str(golden[f"{name}/input_sha256"]), (
        f"{name}: the seeded inputs changed; regenerate the golden file with: {REGENERATE}"
    )
    assert net.family == case["family"] and tuple(net.input_size) == tuple(x.shape[2:])
    g = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(name + "/")}
    return case, net, x, g


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n]["family"] == "e4e"])
@torch.inference_mode()
def test_e4e_matches_the_original(tmp_path, golden, name):
    case, net, x, g = _load(tmp_path, golden, name)
    images, latents = net(x, resize=False, randomize_noise=False, return_latents=True)
    diffs = {"image": _close(f"{name} image", images, g["image"]),
             "latents": _close(f"{name} latents", latents, g["latents"])}
    # The shared interface gives the same W+ and image.
    w_plus = net.encode(x)
    assert torch.equal(w_plus, latents)
    _close(f"{name} decode(encode(x))", net.decode(w_plus, resize=False), g["image"])
    if "stage3_latents" in g:
        # Progressive stage 3: deltas for styles 1..3 only, the rest equal w0.
        net.encoder.progressive_stage = 3
        staged = net.encode(x)
        diffs["stage3_latents"] = _close(f"{name} stage-3 latents", staged, g["stage3_latents"])
        raw = net.encoder(x)  # before latent_avg: styles 0 and 4.. are w0 itself
        assert torch.equal(raw[:, 4:], raw[:, :1].expand_as(raw[:, 4:]))
        assert not torch.equal(raw[:, 3], raw[:, 0])
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n]["family"].startswith("restyle")])
@torch.inference_mode()
def test_restyle_matches_the_original_per_iteration(tmp_path, golden, name):
    case, net, x, g = _load(tmp_path, golden, name)
    assert net.n_iters == case["n_iters"]
    diffs = {"avg_image": _close(f"{name} average image", net.avg_image, g["avg_image"][None])}
    w_plus, images = net.refine(x, resize=case["resize"])
    assert len(w_plus) == len(images) == case["n_iters"]
    for t in range(case["n_iters"]):
        diffs[f"latents[{t}]"] = _close(f"{name} iteration {t + 1} W+", w_plus[t], g["latents"][t])
        diffs[f"images[{t}]"] = _close(f"{name} iteration {t + 1} image", images[t], g["images"][t])
    # encode() is the last iteration's W+; fewer iterations are a prefix of the same run.
    assert torch.equal(net.encode(x), w_plus[-1])
    assert torch.equal(net.encode_iterations(x, n_iters=1)[0], w_plus[0])
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})
