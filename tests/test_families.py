"""Loading e4e and ReStyle checkpoints: family detection, legacy defaults, the shared interface,
the ResNet-34 backbone's torchvision names, other generator sizes and the loader's errors.
(Numerical fidelity to the original code: test_fidelity_golden_families.py.)"""
from __future__ import annotations

import pytest
import torch

from psp_core.checkpoint import CheckpointError, checkpoint_family, load_psp, model_spec
from psp_core.encoders import ResNetBackboneEncoder, resnet34_body
from psp_core.testing import (
    e4e_opts,
    psp_opts,
    random_checkpoint,
    random_e4e_checkpoint,
    random_restyle_checkpoint,
    restyle_opts,
    seeded_rng,
    uniform,
)


def test_family_and_spec_come_from_the_opts_as_released():
    assert checkpoint_family(psp_opts(legacy_opts=True, output_size=1024)) == "psp"
    spec = model_spec(e4e_opts(512, dataset_type="cars_encode"))
    assert (spec.family, spec.output_size, spec.n_styles, spec.input_nc, spec.input_size, spec.n_iters) == (
        "e4e", 512, 16, 3, (192, 256), 1)
    e4e_legacy = {k: v for k, v in e4e_opts(1024).items() if k != "stylegan_size"}
    assert model_spec(e4e_legacy).output_size == 1024  # e4e's training default
    assert model_spec(e4e_opts(256, "SingleStyleCodeEncoder")).n_styles == 14
    spec = model_spec(restyle_opts(256, "ResNetProgressiveBackboneEncoder", "church_encode"))
    assert (spec.family, spec.n_styles, spec.input_nc, spec.input_size, spec.n_iters) == (
        "restyle_e4e", 14, 3, (256, 256), 5)
    assert model_spec(restyle_opts(1024, "BackboneEncoder")).family == "restyle_psp"
    assert model_spec(dict(psp_opts(1024), input_nc=6)).family == "restyle_psp"  # ReStyle's GradualStyleEncoder
    with pytest.raises(CheckpointError, match="not a e4e encoder.*Encoder4Editing"):
        model_spec(e4e_opts(256, "ResNetBackboneEncoderX"))
    with pytest.raises(CheckpointError, match="takes 6 channels"):
        model_spec(dict(restyle_opts(256), input_nc=3))


def test_resnet34_body_has_torchvisions_names_and_sizes():
    body = resnet34_body()
    names = set(body.state_dict())
    # torchvision's layer1.0 .. layer4.2, renamed body.0 .. body.15 as ReStyle does.
    assert len(body) == 16
    for k in ("0.conv1.weight", "0.bn1.num_batches_tracked", "2.conv2.weight", "3.downsample.0.weight",
              "3.downsample.1.running_var", "7.downsample.0.weight", "13.downsample.1.weight", "15.bn2.bias"):
        assert k in names, k
    assert not any(k.startswith(("0.downsample", "4.downsample", "8.downsample")) for k in names)
    # torchvision's resnet34 has 21,797,672 parameters: minus conv1 (9,408), bn1 (128) and fc (513,000).
    assert sum(p.numel() for p in body.parameters()) == 21_275_136
    enc = ResNetBackboneEncoder(input_nc=6, n_styles=8)
    assert tuple(enc.conv1.weight.shape) == (64, 6, 7, 7) and tuple(enc.relu.weight.shape) == (64,)
    with torch.inference_mode():
        feats = enc.eval().features(torch.zeros(1, 6, 256, 256))
    assert tuple(feats.shape) == (1, 512, 16, 16)


@torch.inference_mode()
def test_every_family_shares_one_interface(tmp_path):
    for path, family, n_iters in (
        (random_e4e_checkpoint(tmp_path / "e4e.pt", output_size=32, seed=5), "e4e", 1),
        (random_restyle_checkpoint(tmp_path / "rs.pt", output_size=32, encoder_type="ResNetBackboneEncoder",
                                   seed=6), "restyle_psp", 2),
    ):
        net = load_psp(path, n_iters=n_iters if family.startswith("restyle") else None)
        assert (net.family, net.n_iters, net.n_styles, net.input_nc, net.input_size) == (
            family, n_iters, 8, 3, (256, 256))
        x = uniform(seeded_rng(7), (2, 3, 256, 256), -1.0, 1.0)
        w_plus = net.encode(x)
        assert tuple(w_plus.shape) == (2, 8, 512) and torch.isfinite(w_plus).all()
        assert tuple(net.decode(w_plus).shape) == (2, 3, 256, 256)
        assert tuple(net.decode(w_plus, resize=False).shape) == (2, 3, 32, 32)
        images, mixed = net.mix(None, n_outputs=2, latent_mask=[6, 7], seed=[1, 2], w_plus=w_plus)
        assert tuple(images.shape) == (2, 2, 3, 256, 256) and torch.equal(mixed[:, :, :6], w_plus[:, None, :6].expand(-1, 2, -1, -1))
        # One row's code does not depend on the rest of the batch.
        assert torch.allclose(net.encode(x[1:]), w_plus[1:], atol=1e-5)
        if family.startswith("restyle"):
            steps = net.encode_iterations(x)
            assert len(steps) == n_iters and torch.equal(steps[-1], w_plus)
            assert not torch.equal(steps[0], steps[1])  # each iteration adds a residual
            assert tuple(net.avg_image.shape) == (1, 3, 256, 256)
        with pytest.raises(ValueError, match="channels"):
            net.encode(torch.zeros(1, 6, 256, 256))


@torch.inference_mode()
def test_other_generator_sizes_load_and_run(tmp_path):
    cars = load_psp(random_e4e_checkpoint(tmp_path / "cars.pt", output_size=512, dataset_type="cars_encode", seed=8))
    assert (cars.n_styles, cars.input_size, cars.decoder.size) == (16, (192, 256), 512)
    x = uniform(seeded_rng(9), (1, 3, 192, 256), -1.0, 1.0)
    w_plus = cars.encode(x)
    assert tuple(w_plus.shape) == (1, 16, 512)
    assert tuple(cars.decode(w_plus, resize=False).shape) == (1, 3, 512, 512)
    with pytest.raises(ValueError, match="needs 192x256 inputs"):
        cars.encode(torch.zeros(1, 3, 256, 256))
    church = load_psp(random_restyle_checkpoint(tmp_path / "church.pt", output_size=256, dataset_type="church_encode",
                                                encoder_type="ResNetProgressiveBackboneEncoder", seed=10), n_iters=1)
    w_plus = church.encode(uniform(seeded_rng(11), (1, 3, 256, 256), -1.0, 1.0))
    assert (church.family, tuple(w_plus.shape)) == ("restyle_e4e", (1, 14, 512))


def test_loader_errors_name_the_problem(tmp_path):
    psp = random_checkpoint(tmp_path / "psp.pt", output_size=32, seed=1, device="meta")
    with pytest.raises(CheckpointError, match="only ReStyle checkpoints refine iteratively"):
        load_psp(psp, device="meta", n_iters=5)
    no_avg = random_restyle_checkpoint(tmp_path / "noavg.pt", output_size=32, seed=2, latent_avg_shape="none")
    with pytest.raises(CheckpointError, match="ReStyle checkpoint without 'latent_avg'"):
        load_psp(no_avg)
    with pytest.raises(ValueError, match="n_iters=0"):
        load_psp(random_restyle_checkpoint(tmp_path / "rs.pt", output_size=32, seed=3), n_iters=0)
    ckpt = torch.load(random_e4e_checkpoint(tmp_path / "e4e.pt", output_size=32, seed=4), weights_only=True)
    ckpt["opts"]["stylegan_size"] = 64
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"stylegan_size=64 but its decoder weights are for stylegan_size 32"):
        load_psp(tmp_path / "bad.pt")
    ckpt["opts"]["stylegan_size"] = 32
    ckpt["state_dict"] = {k.replace("styles.3.", "styles.3x."): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"e4e opts: encoder_type=Encoder4Editing.*missing keys: encoder\.styles\.3\."):
        load_psp(tmp_path / "keys.pt")
