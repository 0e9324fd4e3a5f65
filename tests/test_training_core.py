"""pSp training without Ray (psp_core.training): options, weights, checkpoints, resume, data.

The step-by-step equality with the original code is pinned in test_fidelity_golden_training.py;
here: what a user relies on around it -- the original's option names and defaults, one clear
error for every missing pretrained file, checkpoints that ``load_psp`` reads and inverts with, a
resumed run that continues exactly, and the per-task data transforms.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from psp_core.checkpoint import load_psp, read_checkpoint
from psp_core.tasks import get_task
from psp_core.testing import psp_opts, random_checkpoint, seeded_rng, uniform
from psp_core.training import MissingWeightsError, PspTrainer, TrainingWeights, TrainOptions
from psp_core.training.data import SampleDraw, TrainTransforms, sample_rng
from psp_core.training.optim import Ranger
from psp_core.training.testing import random_training_weights

SIZE = 32


def _batch(seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rng = seeded_rng(seed)
    return uniform(rng, (batch, 3, 256, 256), -1, 1), uniform(rng, (batch, 3, 256, 256), -1, 1)


@pytest.fixture(scope="module")
def gen_weights(tmp_path_factory) -> TrainingWeights:
    """Generator + IR-SE50 (a from-scratch start), no loss networks."""
    return random_training_weights(tmp_path_factory.mktemp("w"), SIZE, which=("stylegan", "ir_se50"))


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory) -> str:
    return random_checkpoint(tmp_path_factory.mktemp("ck") / "start.pt", output_size=SIZE, seed=31)


# -- options ---------------------------------------------------------------------------------------


def test_options_have_the_original_names_and_defaults():
    opts = TrainOptions()
    assert (opts.encoder_type, opts.output_size, opts.batch_size, opts.learning_rate, opts.optim_name) == (
        "GradualStyleEncoder", 1024, 4, 1e-4, "ranger")
    assert (opts.lpips_lambda, opts.id_lambda, opts.l2_lambda, opts.w_norm_lambda, opts.moco_lambda) == (0.8, 0, 1.0, 0, 0)
    assert not opts.start_from_latent_avg and not opts.learn_in_w and not opts.train_decoder
    assert (opts.max_steps, opts.val_interval, opts.save_interval) == (500000, 1000, None)
    d = opts.to_opts_dict()
    # The keys of vars(opts) in the checkpoints the original writes (psp_opts mirrors a released file).
    assert set(d) == set(psp_opts())
    assert d["n_styles"] == 18 and d["save_interval"] == 500000 and d["device"] == "cuda:0"
    assert TrainOptions.from_dict(d) == TrainOptions(save_interval=500000)
    with pytest.raises(ValueError, match="unknown training options"):
        TrainOptions.from_dict({"lpips_lamda": 0.5})
    sr = TrainOptions(dataset_type="celebs_super_resolution").to_opts_dict()
    assert sr["resize_factors"] == "1,2,4,8,16,32"  # as SuperResTransforms writes it back
    with pytest.raises(ValueError, match="Both ID and MoCo"):
        TrainOptions(id_lambda=0.1, moco_lambda=0.5).check()


# -- weights ---------------------------------------------------------------------------------------


def test_missing_weights_are_all_named_in_one_error_before_any_work(tmp_path):
    weights = TrainingWeights(alexnet=str(tmp_path / "nope" / "alexnet.pth"))
    opts = TrainOptions(output_size=SIZE, id_lambda=0.1, lpips_lambda=0.8,
                        stylegan_weights=str(tmp_path / "missing_stylegan.pt"))
    with pytest.raises(MissingWeightsError) as err:
        PspTrainer(opts, weights)
    msg = str(err.value)
    for what in ("stylegan", "missing_stylegan.pt", "ir_se50", "alexnet", "nope/alexnet.pth", "lpips"):
        assert what in msg, f"{what!r} not named in: {msg}"
    assert "moco" not in msg
    assert msg.count("ir_se50 (") == 1  # needed twice (encoder start, ID loss), named once
    with pytest.raises(MissingWeightsError, match=r"moco .*not given"):
        TrainingWeights().check(TrainOptions(checkpoint_path=__file__, lpips_lambda=0, moco_lambda=0.5))
    TrainingWeights().check(TrainOptions(checkpoint_path=__file__, lpips_lambda=0))  # L2 only: nothing else


def test_a_run_from_scratch_starts_from_ir_se50_and_the_generator(gen_weights):
    opts = TrainOptions(output_size=SIZE, lpips_lambda=0, start_from_latent_avg=True)
    net = PspTrainer(opts, gen_weights, seed=0).net
    ir = torch.load(gen_weights.ir_se50, weights_only=True)
    enc = net.encoder.state_dict()
    assert torch.equal(enc["input_layer.0.weight"], ir["input_layer.0.weight"])
    assert torch.equal(enc["body.23.res_layer.1.weight"], ir["body.23.res_layer.1.weight"])
    gen = torch.load(gen_weights.stylegan, weights_only=True)
    assert all(torch.equal(v, gen["g_ema"][k]) for k, v in net.decoder.state_dict().items())
    assert torch.equal(net.latent_avg, gen["latent_avg"].repeat(8, 1))  # [n_styles, 512]
    # A seg encoder (label_nc != 0) keeps its own input layer; learn_in_w keeps one row.
    seg = TrainOptions(output_size=SIZE, lpips_lambda=0, input_nc=19, label_nc=19, dataset_type="celebs_seg_to_face",
                       encoder_type="BackboneEncoderUsingLastLayerIntoW", learn_in_w=True, start_from_latent_avg=True)
    net = PspTrainer(seg, gen_weights, seed=0).net
    assert net.encoder.input_layer[0].weight.shape[1] == 19
    assert torch.equal(net.encoder.body[0].res_layer[1].weight, ir["body.0.res_layer.1.weight"])
    assert net.latent_avg.shape == (1, 512)


# -- checkpoints and resume ---------------------------------------------------------------------------


def test_checkpoint_dict_loads_with_load_psp_and_inverts(tmp_path, start_ckpt):
    opts = TrainOptions(output_size=SIZE, lpips_lambda=0, optim_name="adam", start_from_latent_avg=True)
    trainer = PspTrainer.from_checkpoint(start_ckpt, TrainingWeights(), opts=opts, seed=0)
    x, y = _batch(1)
    trainer.train_step(x, y)
    path = tmp_path / "iteration_1.pt"
    torch.save(trainer.checkpoint_dict(), path)
    ckpt, _ = read_checkpoint(path)
    assert set(ckpt) == {"state_dict", "opts", "latent_avg"}
    assert ckpt["opts"]["checkpoint_path"] == start_ckpt and ckpt["opts"]["n_styles"] == 8
    net = load_psp(path)
    trainer.net.eval()
    with torch.no_grad():
        ours = trainer.net(x, randomize_noise=False, resize=False)
        loaded = net(x, randomize_noise=False, resize=False)
        assert torch.equal(net.encode(x), trainer.net.encode(x))
    assert torch.equal(ours, loaded)
    # Fine-tuning from the written file with its stored options.
    again = PspTrainer.from_checkpoint(path, TrainingWeights(), learning_rate=1e-5)
    assert again.opts.learning_rate == 1e-5 and again.opts.optim_name == "adam"
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in again.net.state_dict().items())


@pytest.fixture
def one_thread():
    """One intra-op thread: with several, the CPU kernels (oneDNN, MKL) may split their sums
    differently from run to run, so two identical steps can differ in the last bit (measured on a
    busy 2-core machine: up to 3e-8 in 203 of 325 tensors between two straight runs, even with
    torch.use_deterministic_algorithms; none in 3 tries with one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.tier2
def test_resume_continues_exactly(tmp_path, start_ckpt, one_thread):
    """2 steps == 1 step, state_dict saved and loaded (weights_only) into a new trainer, 1 step:
    Ranger's moments, the step count and the generator-noise RNG all carry over (bit for bit, on
    deterministic kernels)."""
    opts = TrainOptions(output_size=SIZE, lpips_lambda=0, checkpoint_path=start_ckpt, start_from_latent_avg=True)
    batches = [_batch(10), _batch(11)]
    straight = PspTrainer(opts, TrainingWeights(), seed=3)
    for x, y in batches:
        straight.train_step(x, y)
    first = PspTrainer(opts, TrainingWeights(), seed=3)
    first.train_step(*batches[0])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    resumed = PspTrainer(opts, TrainingWeights(), seed=99)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert resumed.step == 1
    losses = resumed.train_step(*batches[1])
    assert resumed.step == 2
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert losses["loss"] > 0


def test_ranger_state_round_trips_across_lookahead():
    """Ranger over 8 steps == 4 steps, state_dict through torch.save/load(weights_only), 4 steps
    (the Lookahead sync at step 6 needs the saved slow weights)."""
    rng = seeded_rng(5)
    init = uniform(rng, (3, 4, 2, 2), -1, 1)
    grads = [uniform(rng, (3, 4, 2, 2), -1, 1) for _ in range(8)]

    def run(p, opt, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    p1 = torch.nn.Parameter(init.clone())
    o1 = Ranger([p1], lr=0.1)
    run(p1, o1, grads)
    p2 = torch.nn.Parameter(init.clone())
    o2 = Ranger([p2], lr=0.1)
    run(p2, o2, grads[:4])
    buf = io.BytesIO()
    torch.save({"p": p2.detach(), "opt": o2.state_dict()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    p3 = torch.nn.Parameter(saved["p"].clone())
    o3 = Ranger([p3], lr=0.1)
    o3.load_state_dict(saved["opt"])
    run(p3, o3, grads[4:])
    assert torch.equal(p1, p3)
    assert not torch.equal(o1.state[p1]["slow_buffer"], init)  # the Lookahead sync did happen


def test_validate_averages_the_losses_in_eval_mode(start_ckpt):
    opts = TrainOptions(output_size=SIZE, lpips_lambda=0, checkpoint_path=start_ckpt, start_from_latent_avg=True)
    trainer = PspTrainer(opts, TrainingWeights(), seed=0)
    b1, b2 = _batch(20), _batch(21)
    torch.manual_seed(7)  # validation draws the generator noise as the original (randomize_noise)
    result = trainer.validate([b1, b2])
    assert trainer.net.training
    trainer.net.eval()
    torch.manual_seed(7)
    with torch.no_grad():
        l2 = [torch.nn.functional.mse_loss(trainer.net(x), y).item() for x, y in (b1, b2)]
    assert result["loss_l2"] == pytest.approx(sum(l2) / 2, abs=1e-6) and result["loss"] == result["loss_l2"]
    assert trainer.validate([]) == {}


# -- data --------------------------------------------------------------------------------------------


def _photo(seed: int, size=(300, 280)) -> Image.Image:
    return Image.fromarray((seeded_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def test_transforms_follow_the_original_per_task():
    target, source = _photo(1), _photo(2)
    ref = get_task("ffhq_encode").transform(target)  # pinned against the original's transforms
    enc = TrainTransforms(TrainOptions())
    x, y = enc(None, target, sample_rng(0, 0))
    assert x is not None and torch.equal(x, y)  # encode: the source is the target tensor
    assert torch.equal(enc.to_tensors(None, torch.from_numpy(enc.prepare_target(target, SampleDraw(True)))[None])[1][0],
                       ref.flip(-1))
    flips = [enc.draw(sample_rng(0, i)).flip_target for i in range(200)]
    assert 70 < sum(flips) < 130 and flips == [enc.draw(sample_rng(0, i)).flip_target for i in range(200)]
    assert not any(TrainTransforms(TrainOptions(), train=False).draw(sample_rng(0, i)).flip_target for i in range(50))

    front = TrainTransforms(TrainOptions(dataset_type="ffhq_frontalize"), train=False)
    draws = [front.draw(sample_rng(1, i)) for i in range(64)]
    assert any(d.flip_source for d in draws) and not any(d.flip_target for d in draws)  # test: source flips only

    sketch = TrainTransforms(TrainOptions(dataset_type="celebs_sketch_to_face", input_nc=1, label_nc=1))
    x, _ = sketch(source, target, sample_rng(0, 0))
    assert torch.equal(x, get_task("celebs_sketch_to_face").transform(source))

    labels = Image.fromarray((seeded_rng(3).random((200, 210)) * 19).astype(np.uint8), mode="L")
    seg = TrainTransforms(TrainOptions(dataset_type="celebs_seg_to_face", input_nc=19, label_nc=19))
    x, _ = seg(labels, target, sample_rng(0, 0))
    assert torch.equal(x, get_task("celebs_seg_to_face").transform(labels))

    sr = TrainTransforms(TrainOptions(dataset_type="celebs_super_resolution", resize_factors="4,8"))
    draws = [sr.draw(sample_rng(2, i)) for i in range(40)]
    assert {d.factor for d in draws} == {4, 8}
    x, _ = sr(target, target, sample_rng(2, 0))
    assert torch.equal(x, get_task("celebs_super_resolution").transform(target, draws[0].factor))
