"""Fidelity of pSp's TRAINING to the original code, pinned by golden values (no original code here).

``tests/data/psp_training_golden_32.npz`` holds what the original ``training/coach.py`` of
eladrich/pixel2style2pixel computed, on the files this module's helpers write, for each case in
``CASES`` (output_size 32, n_styles 8): the loss dict of ``Coach.calc_loss``, per step; the
gradients of the optimizer's parameters after ``loss.backward()`` (float64 sum and sum of
absolute values per tensor, plus the first ``PROBE`` values of three tensors); the change of every
``net.state_dict()`` tensor (parameters AND BatchNorm running statistics) after each optimizer
step (float64 sum and absolute sum per tensor) and the first ``PROBE`` values of the probed
parameters after the last step. The cases cover L2, LPIPS (AlexNet + v0.1 heads), the inner-crop
L2/LPIPS, ID (IR-SE50), W-norm with and without ``start_from_latent_avg``, MoCo (ResNet-50),
``learn_in_w`` with a W encoder, ``train_decoder``, Adam and Ranger (two steps); ``ranger_unit``
runs the original ``Ranger`` alone for 13 steps on small tensors (RAdam's SGD phase, its adaptive
phase from step 6, Lookahead at steps 6 and 12).

Randomness: the generator's per-layer noise (``randomize_noise=True`` in training) is the one
thing the original draws from torch's RNG, whose values depend on the CPU's vector path; in both
codes ``NoiseInjection.forward`` is replaced by ``noise_forward`` (a fixed PCG64 field per
shape), so the golden values do not depend on the CPU. Every weight file and input comes from
numpy's PCG64 (``psp_core.testing`` / ``psp_core.training.testing``); their sha256 are pinned.

Regenerating (only when a writer's init or the inputs change -- the tests say so): the generator
script is NOT in the repo (it imports the original code). Recipe: ``git archive HEAD models configs
utils options training criteria datasets`` of eladrich/pixel2style2pixel into /tmp/orig_psp with
``models/stylegan2/op/`` replaced by the pure-PyTorch CPU ``upfirdn2d`` / ``fused_leaky_relu``
described in ``test_fidelity_golden.py``; torchvision 0.28 unpacked from its wheel into /tmp/tv
(``torchvision/_meta_registrations.py`` emptied). Then:

    cd /tmp/orig_psp && PYTHONPATH=/tmp/tv:/tmp/orig_psp:$REPO:$REPO/tests \\
        /work/main/.venv/bin/python /tmp/golden_T/make_golden_training_32.py $REPO/tests/data/psp_training_golden_32.npz

The script imports this module and, for the run: stubs ``torch.utils.tensorboard`` and ``cv2``
(logging only); makes ``nn.Module.cuda`` / ``.to('cuda...')`` no-ops; points
``configs.paths_config.model_paths['ir_se50' | 'moco']`` at ``write_loss_weights``' files;
replaces ``torch.hub``/torchvision's ``load_state_dict_from_url`` by loading those files (the
LPIPS heads then go through the original ``get_state_dict`` renaming; AlexNet gets its
``features`` from the file, its unused classifier from torchvision's init); sets
``NoiseInjection.forward = noise_forward``; and, in the one case without
``start_from_latent_avg``, replaces ``Generator.mean_latent`` by zeros (the coach computes the
average but nothing reads it then). Per case it writes ``write_case_checkpoint``, builds
``argparse.Namespace(**TrainOptions defaults, **case['opts'], output_size=32, checkpoint_path=...,
exp_dir=tmp)``, runs the REAL ``Coach.__init__`` (``configure_datasets`` returning ``([0], [0])``:
its DataLoaders are built, never iterated), sets ``coach.opts.device = 'cpu'``, then ``case['steps']`` times exactly the loop body of ``Coach.train``:
``optimizer.zero_grad(); y_hat, latent = net.forward(x, return_latents=True); loss, loss_dict, _ =
calc_loss(x, y, y_hat, latent); loss.backward()``, records ``grad_sums`` over ``trainable_names`` (saved as
``grad_names``) and the ``probe_values`` of ``probe_names``, then ``optimizer.step()`` and
``state_sums``. Cases named on the command line run alone (several processes can share the work;
merge their files with ``dict.update``). All under ``<case>/<name>`` with ``np.savez_compressed``.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from psp_core.testing import normal, random_checkpoint, seeded_rng, uniform

GOLDEN = Path(__file__).parent / "data" / "psp_training_golden_32.npz"
REGENERATE = (
    "cd /tmp/orig_psp && PYTHONPATH=/tmp/tv:/tmp/orig_psp:$REPO:$REPO/tests /work/main/.venv/bin/python "
    "/tmp/golden_T/make_golden_training_32.py $REPO/tests/data/psp_training_golden_32.npz "
    "(recipe in the docstring of tests/test_fidelity_golden_training.py)"
)
OUTPUT_SIZE = 32
PROBE = 96
LOSS_ATOL = 1e-5
PARAM_ATOL = 1e-5

CASES: dict[str, dict] = {
    "l2_adam": dict(seed=401, batch=2, steps=1, opts=dict(
        lpips_lambda=0.0, l2_lambda=1.0, optim_name="adam", start_from_latent_avg=True)),
    "lpips_crops_wnorm_ranger": dict(seed=402, batch=2, steps=2, opts=dict(
        lpips_lambda=0.8, l2_lambda=1.0, lpips_lambda_crop=0.6, l2_lambda_crop=0.5, w_norm_lambda=0.005,
        start_from_latent_avg=True)),
    "id_ranger": dict(seed=403, batch=2, steps=1, opts=dict(
        id_lambda=0.1, lpips_lambda=0.8, l2_lambda=1.0, start_from_latent_avg=True)),
    "moco_wnorm_no_avg": dict(seed=404, batch=2, steps=1, opts=dict(
        moco_lambda=0.5, lpips_lambda=0.0, l2_lambda=1.0, w_norm_lambda=0.002, start_from_latent_avg=False)),
    "learn_in_w_decoder_adam": dict(seed=405, batch=2, steps=1, opts=dict(
        encoder_type="BackboneEncoderUsingLastLayerIntoW", learn_in_w=True, train_decoder=True,
        optim_name="adam", lpips_lambda=0.8, l2_lambda=1.0, start_from_latent_avg=True)),
}
RANGER_UNIT = dict(seed=499, steps=13, lr=0.01, shapes={"conv": (4, 3, 3, 3), "linear": (6, 5), "bias": (7,)})
LOSS_WEIGHTS_SEED = 0


# -- shared by the test and the golden script -----------------------------------------------------


def noise_forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``NoiseInjection.forward`` with a fixed PCG64 field of the image's shape instead of
    ``normal_()`` (same for the original's and our class)."""
    if noise is None:
        batch, _, height, width = image.shape
        noise = normal(seeded_rng(7000 + height * 7 + width), (batch, 1, height, width)).to(image.device)
    return image + self.weight * noise


def make_batch(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's source ``x`` and (different) target ``y``, ``[B, 3, 256, 256]`` in [-1, 1]."""
    rng = seeded_rng(5000 + case["seed"])
    shape = (case["batch"], 3, 256, 256)
    return uniform(rng, shape, -1.0, 1.0), uniform(rng, shape, -1.0, 1.0)


def write_case_checkpoint(path: str | os.PathLike, case: dict) -> str:
    opts = case["opts"]
    encoder_type = opts.get("encoder_type", "GradualStyleEncoder")
    return random_checkpoint(path, output_size=OUTPUT_SIZE, encoder_type=encoder_type,
                             start_from_latent_avg=opts.get("start_from_latent_avg", False),
                             learn_in_w=opts.get("learn_in_w", False), seed=case["seed"])


def write_loss_weights(folder: str | os.PathLike):
    """AlexNet (features only), LPIPS heads, IR-SE50 and MoCo files: a ``TrainingWeights``."""
    from psp_core.training.testing import random_training_weights

    return random_training_weights(folder, OUTPUT_SIZE, which=("alexnet", "lpips", "ir_se50", "moco"),
                                   seed=LOSS_WEIGHTS_SEED)


def tensors_sha256(obj) -> str:
    """sha256 over every tensor of a (nested) dict in sorted key order: name, dtype, shape, bytes."""
    h = hashlib.sha256()

    def walk(prefix: str, o) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{prefix}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(f"{prefix}/{k}", o[k])

    walk("", obj)
    return h.hexdigest()


def trainable_names(case: dict, net: torch.nn.Module) -> list[str]:
    names = [f"encoder.{n}" for n, _ in net.encoder.named_parameters()]
    if case["opts"].get("train_decoder"):
        names += [f"decoder.{n}" for n, _ in net.decoder.named_parameters()]
    return names


def probe_names(case: dict, names: list[str]) -> list[str]:
    """The first, a middle and the last trainable tensor (the decoder's last one with train_decoder)."""
    return [names[0], names[len(names) // 2], names[-1]]


def probe_values(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The first ``PROBE`` values of a gradient (zeros for a parameter without one)."""
    t = torch.zeros_like(like) if t is None else t
    return t.detach().flatten()[:PROBE].clone()


def grad_sums(params: dict[str, torch.Tensor], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # A parameter the loss does not reach (the mapping network, fed W directly) has no gradient.
    g = [params[n].grad.detach().double() if params[n].grad is not None else torch.zeros(()) for n in names]
    return np.array([t.sum().item() for t in g]), np.array([t.abs().sum().item() for t in g])


def state_sums(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(before)
    d = [after[k].detach().double() - before[k].detach().double() for k in keys]
    return np.array([t.sum().item() for t in d]), np.array([t.abs().sum().item() for t in d])


def ranger_unit_tensors() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Initial parameters and one gradient per step for ``ranger_unit`` (PCG64)."""
    rng = seeded_rng(RANGER_UNIT["seed"])
    params = {k: normal(rng, s) for k, s in RANGER_UNIT["shapes"].items()}
    grads = [{k: normal(rng, s, 0.5, 0.1) for k, s in RANGER_UNIT["shapes"].items()} for _ in range(RANGER_UNIT["steps"])]
    return params, grads


# -- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def loss_weights(tmp_path_factory, golden):
    weights = write_loss_weights(tmp_path_factory.mktemp("loss_weights"))
    for key in ("alexnet", "lpips", "ir_se50", "moco"):
        obj = torch.load(getattr(weights, key), map_location="cpu", weights_only=True)
        assert tensors_sha256(obj) == str(golden[f"weights/{key}_sha256"]), (
            f"the random {key} file no longer has the weights the golden values were computed on; "
            f"if intended, regenerate with: {REGENERATE}"
        )
    return weights


@pytest.fixture
def fixed_noise(monkeypatch):
    from psp_core.stylegan2 import NoiseInjection

    monkeypatch.setattr(NoiseInjection, "forward", noise_forward)


def _close(name: str, ours, ref, atol: float, rtol: float = 0.0) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs golden {ref.shape}"
    excess = np.abs(ours - ref) - (atol + rtol * np.abs(ref))
    worst = int(np.argmax(excess)) if excess.size else 0
    assert excess.size == 0 or excess.flat[worst] <= 0, (
        f"{name}: entry {worst}: ours {ours.flat[worst]:.8g} vs original {ref.flat[worst]:.8g} "
        f"(atol {atol}, rtol {rtol})"
    )
    return float(np.abs(ours - ref).max()) if ours.size else 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_one_training_step_matches_the_original(tmp_path, golden, loss_weights, fixed_noise, name):
    from psp_core.training import PspTrainer, TrainOptions

    case = CASES[name]
    g = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(name + "/")}
    ckpt = write_case_checkpoint(tmp_path / "start.pt", case)
    assert tensors_sha256(torch.load(ckpt, weights_only=True)) == str(g["weights_sha256"]), (
        f"{name}: the random start checkpoint changed; regenerate with: {REGENERATE}")
    x, y = make_batch(case)
    assert tensors_sha256({"x": x, "y": y}) == str(g["input_sha256"]), f"{name}: inputs changed; {REGENERATE}"

    opts = TrainOptions(output_size=OUTPUT_SIZE, checkpoint_path=ckpt, **case["opts"])
    trainer = PspTrainer(opts, loss_weights, seed=0)
    params = dict(trainer.net.named_parameters())
    names = trainable_names(case, trainer.net)
    assert [id(p) for grp in trainer.optimizer.param_groups for p in grp["params"]] == [id(params[n]) for n in names]
    assert names == [str(n) for n in g["grad_names"]], f"{name}: trainable tensors differ from the original's"
    probes = probe_names(case, names)
    assert probes == [str(n) for n in g["probe_names"]]
    captured: dict[str, object] = {}

    def before_step(optimizer, args, kwargs):  # the gradients the optimizer is about to use
        captured["grad_sums"] = grad_sums(params, names)
        captured["probe_grads"] = [probe_values(params[n].grad, params[n]) for n in probes]

    trainer.optimizer.register_step_pre_hook(before_step)
    state0 = {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}
    diffs = {}
    for s in range(case["steps"]):
        losses = trainer.train_step(x, y)
        keys = [str(k) for k in g[f"loss_keys/{s}"]]
        assert sorted(losses) == keys, f"{name} step {s}: loss keys {sorted(losses)} vs original {keys}"
        diffs[f"loss[{s}]"] = _close(f"{name} step {s} losses {keys}", [losses[k] for k in keys], g[f"loss/{s}"], LOSS_ATOL)
        gsum, gabs = captured["grad_sums"]
        # Gradients: derived values, compared relative to their size.
        # Float rounding differs between the codes (op order, CPU paths); tensors whose gradient is
        # tiny next to the largest one are compared at that scale.
        floor = 1e-5 * float(np.abs(g[f"grad_abs_sum/{s}"]).max())
        diffs[f"grad_abs_sum[{s}]"] = _close(f"{name} step {s} grad |sum| per tensor", gabs, g[f"grad_abs_sum/{s}"],
                                             floor, 1e-3)
        assert np.all(np.abs(gsum - g[f"grad_sum/{s}"]) <= 1e-3 * np.abs(g[f"grad_abs_sum/{s}"]) + floor), (
            f"{name} step {s}: gradient sums differ")
        for i, n in enumerate(probes):
            ref = g[f"probe_grad/{s}/{i}"]
            diffs[f"grad {n}[{s}]"] = _close(f"{name} step {s} grad of {n}", captured["probe_grads"][i], ref,
                                             5e-3 * float(np.abs(ref).max()) + 1e-12)  # default-CPU path: ~1e-3
        dsum, dabs = state_sums(state0, trainer.net.state_dict())
        dfloor = 1e-5 * float(np.abs(g[f"delta_abs_sum/{s}"]).max())
        diffs[f"delta_abs[{s}]"] = _close(f"{name} step {s} |change| per state tensor", dabs, g[f"delta_abs_sum/{s}"],
                                          dfloor, 1e-3)
        assert np.all(np.abs(dsum - g[f"delta_sum/{s}"]) <= 1e-3 * np.abs(g[f"delta_abs_sum/{s}"]) + dfloor), (
            f"{name} step {s}: parameter changes differ from the original's")
    for i, n in enumerate(probes):
        diffs[f"param {n}"] = _close(f"{name} {n} after {case['steps']} steps", params[n].detach().flatten()[:PROBE],
                                     g[f"probe_param/{i}"], PARAM_ATOL)
    print(name, {k: f"{v:.1e}" for k, v in diffs.items()})


def test_ranger_matches_the_original_over_13_steps(golden):
    from psp_core.training.optim import Ranger

    init, grads = ranger_unit_tensors()
    assert tensors_sha256({"init": init, "grads": dict(enumerate(grads))}) == str(golden["ranger_unit/input_sha256"])
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = Ranger(list(params.values()), lr=RANGER_UNIT["lr"])
    for s, grad in enumerate(grads):
        for k, p in params.items():
            p.grad = grad[k].clone()
        opt.step()
        for k, p in params.items():
            _close(f"ranger step {s + 1} {k}", p.detach(), golden[f"ranger_unit/{s}/{k}"], 1e-6)
    # The whole state round-trips: a fresh optimizer loaded mid-way continues identically.
    assert math.isclose(opt.state[params["conv"]]["step"], RANGER_UNIT["steps"])
