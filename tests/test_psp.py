"""pSp model and checkpoint loading: official format, forward semantics, mixing, clear errors.

Architecture checks at 1024 use checkpoints written on the meta device (shapes only, instant);
numerical checks use one seeded 32 px checkpoint (the IR-SE50 encoder is full size at any output
size, so encoder calls are kept few).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os

import fsspec
import pytest
import torch

from psp_core.checkpoint import CheckpointError, load_psp, load_stylegan2
from psp_core.psp import PSP
from psp_core.testing import psp_opts, random_checkpoint, random_stylegan2_checkpoint, randomize_

ENCODERS = ["GradualStyleEncoder", "BackboneEncoderUsingLastLayerIntoW", "BackboneEncoderUsingLastLayerIntoWPlus"]
# Hand count from the spec (§1.4): 792 entries for the 1024 GradualStyleEncoder, of which
# 232 are the 18 map2style heads (3x10 + 4x12 + 11x14) and 4 the lateral 1x1 convs.
EXPECTED_ENTRIES_1024 = {
    "GradualStyleEncoder": 792,
    "BackboneEncoderUsingLastLayerIntoW": 792 - 236 + 2,  # + linear
    "BackboneEncoderUsingLastLayerIntoWPlus": 792 - 236 + 5 + 2 + 2,  # + BN, Linear, EqualLinear
}


def _meta_model(tmp_path, **kw) -> PSP:
    path = random_checkpoint(tmp_path / "meta.pt", device="meta", **kw)
    return load_psp(path, device="meta")


# -- official format / architecture -----------------------------------------------------------


def test_released_1024_layout_legacy_opts(tmp_path):
    net = _meta_model(tmp_path, output_size=1024, legacy_opts=True)
    assert net.output_size == 1024 and net.n_styles == 18 and net.opts["learn_in_w"] is False
    assert "device" not in net.opts  # the stored 'cuda:0' is ignored
    sd = net.state_dict()
    assert len(sd) == 792
    n_params = sum(p.numel() for p in net.parameters())
    assert round(n_params / 1e6, 1) == 297.5
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 52
    assert tuple(sd["decoder.noises.noise_16"].shape) == (1, 1, 1024, 1024)
    assert tuple(sd["decoder.noises.noise_0"].shape) == (1, 1, 4, 4)
    assert tuple(sd["encoder.body.21.shortcut_layer.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(sd["encoder.styles.17.convs.10.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd["decoder.convs.14.conv.blur.kernel"].shape) == (4, 4)
    assert tuple(sd["decoder.to_rgbs.7.upsample.kernel"].shape) == (4, 4)
    assert tuple(net.latent_avg.shape) == (18, 512)
    assert all(k.split(".")[0] in ("encoder", "decoder") for k in sd)


@pytest.mark.parametrize("encoder_type", ENCODERS)
@pytest.mark.parametrize("input_nc", [1, 3, 19])
def test_1024_checkpoints_load_for_every_encoder_and_input_nc(tmp_path, encoder_type, input_nc):
    net = _meta_model(tmp_path, output_size=1024, encoder_type=encoder_type, input_nc=input_nc)
    sd = net.state_dict()
    assert len(sd) == EXPECTED_ENTRIES_1024[encoder_type]
    assert tuple(sd["encoder.input_layer.0.weight"].shape) == (64, input_nc, 3, 3)
    if encoder_type == "BackboneEncoderUsingLastLayerIntoWPlus":
        assert tuple(sd["encoder.output_layer_2.3.weight"].shape) == (512, 25088)
        assert tuple(sd["encoder.linear.weight"].shape) == (512 * 18, 512)
    if encoder_type == "BackboneEncoderUsingLastLayerIntoW":
        assert tuple(net.latent_avg.shape) == (1, 512) and net.opts["learn_in_w"] is True


@pytest.mark.parametrize("output_size,n_styles", [(256, 14), (64, 10), (32, 8)])
@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_smaller_output_sizes_load(tmp_path, output_size, n_styles, encoder_type):
    net = _meta_model(tmp_path, output_size=output_size, encoder_type=encoder_type, input_nc=3)
    sd = net.state_dict()
    assert net.n_styles == n_styles and net.decoder.n_latent == n_styles
    n_noise = int(math.log2(output_size)) * 2 - 3
    assert f"decoder.noises.noise_{n_noise - 1}" in sd and f"decoder.noises.noise_{n_noise}" not in sd
    if encoder_type == "GradualStyleEncoder":
        assert f"encoder.styles.{n_styles - 1}.linear.weight" in sd
        assert f"encoder.styles.{n_styles}.linear.weight" not in sd


# -- a real (random-weight) 32 px model --------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt32(tiny_checkpoint) -> str:
    # The session's seeded 32 px checkpoint (tests/conftest.py): official format, GradualStyleEncoder.
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def net32(ckpt32) -> PSP:
    return load_psp(ckpt32)


@pytest.fixture(scope="module")
def batch4(net32):
    x = torch.randn(4, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        w = net32.encode(x)
    return x, w


def test_loaded_model_metadata(net32, ckpt32):
    with open(ckpt32, "rb") as f:
        assert net32.checkpoint_sha256 == hashlib.sha256(f.read()).hexdigest()
    assert not net32.training and net32.device == torch.device("cpu")
    assert net32.n_styles == 8 and net32.output_size == 32
    assert tuple(net32.latent_avg.shape) == (8, 512)
    ckpt = torch.load(ckpt32, map_location="cpu", weights_only=True)
    assert ckpt["opts"]["device"] == "cuda:0"  # like the released files
    for k, v in net32.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    assert torch.equal(net32.latent_avg, ckpt["latent_avg"])  # every row, as stored


def test_random_checkpoint_latent_avg_rows_differ(net32):
    # A loader/forward that used row 0 for every style must not pass the tests above and below.
    rows = net32.latent_avg
    assert min((rows[i] - rows[j]).abs().max() for i in range(8) for j in range(i)) > 1e-2


@torch.inference_mode()
def test_batch_of_four_equals_single_calls(net32, batch4):
    x, w = batch4
    assert w.shape == (4, 8, 512)
    # Singles through the raw encoder: also checks that encode adds latent_avg [n_styles, 512].
    singles = torch.cat([net32.encoder(x[i : i + 1]) for i in range(4)]) + net32.latent_avg
    torch.testing.assert_close(w, singles, rtol=0, atol=1e-5)
    images = net32.decode(w)
    single_images = torch.cat([net32.decode(w[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(images, single_images, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_forward_is_encode_then_decode(net32, batch4):
    x, w = batch4
    images, latents = net32(x[:1], randomize_noise=False, return_latents=True)
    torch.testing.assert_close(latents, w[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(images, net32.decode(w[:1]), rtol=0, atol=1e-5)
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


@torch.inference_mode()
def test_fixed_noise_is_deterministic_random_noise_is_not(net32, batch4):
    _, w = batch4
    a, b = net32.decode(w[:2]), net32.decode(w[:2])
    r1, r2 = net32.decode(w[:2], randomize_noise=True), net32.decode(w[:2], randomize_noise=True)
    assert torch.equal(a, b)
    assert (r1 - a).abs().max() > 1e-3 and (r1 - r2).abs().max() > 1e-3


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["zero", "inject", "alpha"])
def test_latent_mask_semantics(net32, batch4, mode):
    x, w = batch4
    mask = [0, 5]
    inject = torch.randn(1, 8, 512, generator=torch.Generator().manual_seed(9))
    kwargs = {"inject": dict(inject_latent=inject), "alpha": dict(inject_latent=inject, alpha=0.3), "zero": {}}[mode]
    images, latents = net32(x[1:2], latent_mask=mask, randomize_noise=False, return_latents=True, **kwargs)
    expected = w[1:2].clone()
    for i in mask:
        expected[:, i] = {"zero": 0.0, "inject": inject[:, i], "alpha": 0.3 * inject[:, i] + 0.7 * w[1:2, i]}[mode]
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(images, net32.decode(expected), rtol=0, atol=1e-5)


@torch.inference_mode()
def test_input_code_true_maps_z_and_leaves_the_callers_tensor(net32):
    z = torch.randn(2, 512, generator=torch.Generator().manual_seed(3))
    z_copy = z.clone()
    images, latents = net32(z, input_code=True, return_latents=True, randomize_noise=False, latent_mask=[1])
    w = net32.decoder.get_latent(z_copy)
    expected = w.unsqueeze(1).repeat(1, 8, 1)
    assert torch.equal(z, z_copy)
    images_plain, latents_plain = net32(z, input_code=True, return_latents=True, randomize_noise=False)
    torch.testing.assert_close(latents_plain, expected)
    torch.testing.assert_close(images_plain, net32.decode(expected))
    assert images.shape == (2, 3, 256, 256)


@torch.inference_mode()
def test_resize_replicates_pixels_below_256(net32, batch4):
    _, w = batch4
    small = net32.decode(w[:1], resize=False)
    big = net32.decode(w[:1], resize=True)
    assert small.shape == (1, 3, 32, 32) and big.shape == (1, 3, 256, 256)
    torch.testing.assert_close(big, small.repeat_interleave(8, 2).repeat_interleave(8, 3))


@pytest.mark.parametrize("size", [1024, 512])
def test_face_pool_is_an_exact_box_mean_above_256(net32, size):
    img = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    f = size // 256
    expected = img.reshape(1, 3, 256, f, 256, f).mean(dim=(3, 5))
    torch.testing.assert_close(net32.face_pool(img), expected)


@torch.inference_mode()
def test_mix_rows_do_not_depend_on_the_batch_and_match_the_original_route(net32, batch4):
    x, w = batch4
    mask = [4, 5, 6, 7]
    images, mixed = net32.mix(x[:2], n_outputs=3, latent_mask=mask, mix_alpha=0.5, seed=[11, 12])
    assert images.shape == (2, 3, 3, 256, 256) and mixed.shape == (2, 3, 8, 512)
    alone_images, alone_mixed = net32.mix(x[1:2], n_outputs=3, latent_mask=mask, mix_alpha=0.5, seed=[12])
    torch.testing.assert_close(alone_images[0], images[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone_mixed[0], mixed[1], rtol=0, atol=1e-5)
    # Unmasked styles are the sample's own; the z of output k comes from Generator().manual_seed(seed).
    torch.testing.assert_close(mixed[:, :, :4], w[:2, None, :4].expand(2, 3, 4, 512), rtol=0, atol=1e-5)
    z = torch.randn(3, 512, generator=torch.Generator().manual_seed(12))
    # The original style_mixing.py route: inject = W of net(z, input_code=True, return_latents=True).
    _, inject = net32(z[2:3], input_code=True, return_latents=True)
    original = net32(x[1:2], latent_mask=mask, inject_latent=inject, alpha=0.5, randomize_noise=False)
    torch.testing.assert_close(images[1, 2:3], original, rtol=0, atol=1e-5)
    # Different seeds give different outputs; a single int seed is used for every row.
    assert (images[0, 0] - images[1, 0]).abs().max() > 1e-3
    # Given the W+ it already has, mix skips the encoder and gives the same result.
    reused_images, reused_mixed = net32.mix(None, 3, mask, mix_alpha=0.5, seed=[11, 12], w_plus=w[:2])
    torch.testing.assert_close(reused_images, images, rtol=0, atol=1e-5)
    torch.testing.assert_close(reused_mixed, mixed, rtol=0, atol=1e-5)


# -- W encoder (BackboneEncoderUsingLastLayerIntoW): a W code [B, 512] ---------------------------


@pytest.fixture(scope="module")
def w32():
    """A random 32 px W encoder trained with --learn_in_w (latent_avg [1, 512]), its input and raw code."""
    net = randomize_(PSP(psp_opts(32, "BackboneEncoderUsingLastLayerIntoW", learn_in_w=True)), seed=4).eval()
    net.latent_avg = torch.randn(1, 512, generator=torch.Generator().manual_seed(8))
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        raw = net.encoder(x)
    assert raw.shape == (2, 512)
    return net, x, raw


@torch.inference_mode()
def test_encode_of_a_w_encoder_is_repeated_over_the_styles(w32):
    net, x, raw = w32
    w = net.encode(x[:1])
    assert w.shape == (1, 8, 512)
    torch.testing.assert_close(w, (raw[:1] + net.latent_avg).unsqueeze(1).expand(1, 8, 512))


@torch.inference_mode()
def test_latent_mask_on_a_w_code_zeroes_w_dimensions_like_the_original(w32):
    # The original indexes the [B, 512] code: codes[:, i] = 0 zeroes W dimension i (in every style).
    net, x, raw = w32
    images, latents = net(x[:1], latent_mask=[1, 7, 300], randomize_noise=False, return_latents=True)
    w = raw[:1] + net.latent_avg
    w[:, [1, 7, 300]] = 0
    expected = w.unsqueeze(1).expand(1, 8, 512)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(images, net.decode(expected), rtol=0, atol=1e-5)
    assert (latents[0, :, 300] == 0).all() and (latents[0, 2] != 0).any()  # style 2 stays whole


def test_w_code_mask_errors_point_to_mix(w32):
    net, x, _ = w32
    inject = torch.zeros(1, 8, 512)
    with pytest.raises(ValueError, match=r"inject_latent has shape \(1, 8, 512\).*2-D.*PSP\.mix.*W\+ encoder"):
        net(x[:1], latent_mask=[1], inject_latent=inject)
    with pytest.raises(ValueError, match=r"outside 0\.\.511.*W dimensions"):
        net(x[:1], latent_mask=[512])


@torch.inference_mode()
def test_mix_works_on_w_plus_for_a_w_encoder(w32):
    net, x, raw = w32
    images, mixed = net.mix(x[:1], n_outputs=2, latent_mask=[6, 7], seed=3)
    own = (raw[:1] + net.latent_avg)[0]
    assert images.shape == (1, 2, 3, 256, 256) and mixed.shape == (1, 2, 8, 512)
    torch.testing.assert_close(mixed[0, :, :6], own.expand(2, 6, 512), rtol=0, atol=1e-5)
    assert (mixed[0, 0, 6] - own).abs().max() > 1e-2  # styles 6, 7 come from z


@torch.inference_mode()
def test_w_encoder_without_learn_in_w_gives_w_plus_at_any_batch(w32):
    # The coach repeats latent_avg to [n_styles, 512] when --learn_in_w is off; the original then
    # computes codes + latent_avg (W+) and works at B=1 only. Ours: codes.unsqueeze(1) + avg, any B.
    net, x, raw = w32
    rows = torch.randn(8, 512, generator=torch.Generator().manual_seed(9))
    with torch.device("meta"):
        alt = PSP(dict(net.opts, learn_in_w=False)).eval()
    alt.load_state_dict(net.state_dict(), assign=True)  # shares w32's weights
    alt.latent_avg = rows
    images, latents = alt(x, randomize_noise=False, return_latents=True)
    expected = raw.unsqueeze(1) + rows
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(images, alt.decode(expected), rtol=0, atol=1e-5)


def test_loader_accepts_w_encoder_latent_avg_rows_only_without_learn_in_w(tmp_path):
    path = random_checkpoint(
        tmp_path / "w.pt", output_size=32, device="meta", encoder_type="BackboneEncoderUsingLastLayerIntoW", learn_in_w=False
    )
    net = load_psp(path, device="meta")
    assert tuple(net.latent_avg.shape) == (8, 512) and net._code_is_w_plus()
    ckpt = torch.load(path, weights_only=True)
    ckpt["opts"]["learn_in_w"] = True
    with pytest.raises(CheckpointError, match=r"\[8, 512\] belongs to one trained without it.*learn_in_w.. = False"):
        load_psp(_save(tmp_path, ckpt), device="meta")


def test_to_moves_latent_avg_with_the_model():
    with torch.device("meta"):
        net = PSP(psp_opts(32))
    net.latent_avg = torch.zeros(8, 512, device="meta")
    net.double()
    assert net.latent_avg.dtype == torch.float64


# -- input validation ------------------------------------------------------------------------


def test_wrong_input_size_and_channels_are_explained(net32):
    with pytest.raises(ValueError, match="256x256"):
        net32.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"expects input_nc=3"):
        net32.encode(torch.zeros(1, 1, 256, 256))
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        net32.mix(torch.zeros(1, 3, 256, 256), n_outputs=1, latent_mask=[8])
    with pytest.raises(ValueError, match=r"\[B, 8, 512\]"):
        net32.decode(torch.zeros(1, 18, 512))


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(1, 3, 256, 256, dtype=torch.uint8), r"dtype torch\.uint8.*task's transform"),
        (torch.zeros(1, 3, 256, 256, dtype=torch.float64), r"dtype torch\.float64.*x\.float\(\)"),
        (torch.zeros(1, 3, 256, 256, dtype=torch.int64), r"dtype torch\.int64.*one-hot float.*x\.float\(\)"),
    ],
    ids=["uint8", "float64", "int64-onehot"],
)
def test_wrong_input_dtype_is_explained(net32, x, match):
    # The original fails deep inside a conv ("expected scalar type ... but found Float").
    with pytest.raises(ValueError, match=match):
        net32(x)
    with pytest.raises(ValueError, match=match):
        net32.encode(x)


def test_bad_mask_and_inject_shapes_fail_before_encoding(net32):
    x = torch.zeros(1, 3, 256, 256)
    with pytest.raises(ValueError, match=r"outside 0\.\.7: they name styles"):
        net32(x, latent_mask=[8])
    with pytest.raises(ValueError, match=r"inject_latent has shape \(1, 4, 512\)"):
        net32(x, latent_mask=[6], inject_latent=torch.zeros(1, 4, 512))
    with pytest.raises(ValueError, match=r"does not fit codes of shape \(1, 8, 512\)"):
        net32(x, latent_mask=[1], inject_latent=torch.zeros(3, 8, 512))


# -- loading from anywhere, and clear errors ---------------------------------------------------


def test_load_from_fsspec_memory_and_file_uris(tmp_path):
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=64)
    data = open(path, "rb").read()
    with fsspec.open("memory://ckpts/psp64.pt", "wb") as f:
        f.write(data)
    net = load_psp("memory://ckpts/psp64.pt", device="meta", storage_options={})
    assert net.checkpoint_sha256 == hashlib.sha256(data).hexdigest() and net.n_styles == 10
    assert load_psp(f"file://{path}", device="meta").checkpoint_sha256 == net.checkpoint_sha256
    with pytest.raises(FileNotFoundError, match="memory://ckpts/nope.pt"):
        load_psp("memory://ckpts/nope.pt")


def test_load_from_s3_with_storage_options(tmp_path, s3_server):
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32)
    bucket = s3_server.make_bucket("ckpt")
    s3_server.filesystem().put(str(path), f"{bucket}/models/psp32.pt")
    net = load_psp(f"s3://{bucket}/models/psp32.pt", device="meta", storage_options=s3_server.storage_options)
    assert net.checkpoint_sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert net.n_styles == 8


def test_header_is_one_pass_of_opts_keys_size_and_sha256(tmp_path):
    """The run's one read of its checkpoint: the opts exactly as torch.load gives them (tensors
    never loaded), the top-level keys, the size and the sha256 the model's loader computes -- for
    a zip file on disk or behind an fsspec URI, a legacy (pre-zip) file and a generator file."""
    from psp_core.checkpoint import read_checkpoint_header

    path = random_checkpoint(tmp_path / "h.pt", device="meta", output_size=32, dataset_type="toonify")
    data = open(path, "rb").read()
    with fsspec.open("memory://ckpts/h.pt", "wb") as f:
        f.write(data)
    for uri in (path, f"file://{path}", "memory://ckpts/h.pt"):
        header = read_checkpoint_header(uri, {})
        assert header.sha256 == hashlib.sha256(data).hexdigest() == load_psp(uri, device="meta").checkpoint_sha256
        assert header.opts == torch.load(path, weights_only=True, mmap=True)["opts"]
        assert set(header.keys) == {"state_dict", "opts", "latent_avg"} and header.size_bytes == len(data)
    legacy = tmp_path / "legacy.pt"
    torch.save({"opts": {"output_size": 32, "dataset_type": "ffhq_encode"}, "state_dict": {"w": torch.ones(2)}},
               legacy, _use_new_zipfile_serialization=False)
    header = read_checkpoint_header(str(legacy))
    assert header.opts == {"output_size": 32, "dataset_type": "ffhq_encode"}
    assert header.sha256 == hashlib.sha256(legacy.read_bytes()).hexdigest()
    generator = read_checkpoint_header(random_stylegan2_checkpoint(tmp_path / "sg.pt", size=8))
    assert generator.opts is None and "g_ema" in generator.keys
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_checkpoint_header(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="directory"):
        read_checkpoint_header(str(tmp_path))


def _save(tmp_path, obj, name="bad.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_not_a_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not a dict"):
        load_psp(_save(tmp_path, [1, 2, 3]))


def test_no_state_dict_points_to_the_decoder_only_path(tmp_path):
    with pytest.raises(CheckpointError, match="has no 'state_dict'.*load_stylegan2"):
        load_psp(_save(tmp_path, {"opts": {}}))


def test_stylegan_checkpoint_given_to_load_psp(tmp_path):
    path = random_stylegan2_checkpoint(tmp_path / "sg.pt", size=8)
    with pytest.raises(CheckpointError, match="StyleGAN2 generator checkpoint.*load_stylegan2"):
        load_psp(path)


def test_namespace_opts_get_a_re_save_recipe(tmp_path):
    path = _save(tmp_path, {"state_dict": {}, "opts": argparse.Namespace(output_size=32)})
    with pytest.raises(CheckpointError, match="Namespace.*vars"):
        load_psp(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["decoder.noises.noise_3"]
    ckpt["state_dict"]["encoder.extra_head.weight"] = torch.zeros(1, device="meta")
    ckpt["state_dict"]["decoder.style.1.weight"] = torch.zeros(512, 256, device="meta")
    with pytest.raises(CheckpointError) as e:
        load_psp(_save(tmp_path, ckpt), device="meta")
    msg = str(e.value)
    assert "bad.pt" in msg
    assert "missing keys: decoder.noises.noise_3" in msg
    assert "unexpected keys: encoder.extra_head.weight" in msg
    assert "decoder.style.1.weight: checkpoint (512, 256) vs model (512, 512)" in msg


def test_opts_output_size_that_contradicts_the_weights(tmp_path):
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32)
    ckpt = torch.load(path, weights_only=True)
    ckpt["opts"]["output_size"] = 64
    del ckpt["opts"]["n_styles"]
    ckpt["latent_avg"] = ckpt["latent_avg"][:1]  # a shape every size accepts: the weights must fail
    with pytest.raises(CheckpointError, match="output_size=64"):
        load_psp(_save(tmp_path, ckpt), device="meta")


def test_start_from_latent_avg_without_latent_avg_names_the_file(tmp_path):
    path = random_checkpoint(tmp_path / "nolatent.pt", device="meta", output_size=32, latent_avg_shape="none")
    with pytest.raises(CheckpointError, match="nolatent.pt.*no 'latent_avg'"):
        load_psp(path, device="meta")


def test_latent_avg_shapes(tmp_path):
    flat = _meta_model(tmp_path, output_size=32, latent_avg_shape="flat")
    assert tuple(flat.latent_avg.shape) == (512,)
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32)
    ckpt = torch.load(path, weights_only=True)
    ckpt["latent_avg"] = torch.zeros(3, 512)
    with pytest.raises(CheckpointError, match=r"'latent_avg' has shape \[3, 512\]"):
        load_psp(_save(tmp_path, ckpt), device="meta")
    no_avg = random_checkpoint(tmp_path / "n.pt", device="meta", output_size=32, start_from_latent_avg=False)
    assert load_psp(no_avg, device="meta").latent_avg is None


def test_damaged_file(tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="truncated.pt.*not a readable torch checkpoint"):
        load_psp(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_psp(tmp_path / "nowhere.pt")


def test_a_directory_is_named_as_such(tmp_path):
    (tmp_path / "psp_ffhq_encode.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a directory.*path of the \.pt file.*psp_ffhq_encode\.pt"):
        load_psp(tmp_path)


def test_numpy_values_in_opts_get_numpy_advice_not_namespace_advice(tmp_path):
    import numpy as np

    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32)
    ckpt = torch.load(path, weights_only=True)
    ckpt["opts"]["lpips_lambda"] = np.float64(0.8)
    with pytest.raises(CheckpointError) as e:
        load_psp(_save(tmp_path, ckpt), device="meta")
    msg = str(e.value)
    assert "Unsupported global: GLOBAL numpy" in msg and "v.item()" in msg and "weights_only=True" in msg
    assert "Namespace" not in msg and "\x1b" not in msg


def test_legacy_opts_on_a_non_1024_model_say_what_the_weights_imply(tmp_path):
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32)
    ckpt = torch.load(path, weights_only=True)
    for key in ("output_size", "n_styles"):
        del ckpt["opts"][key]
    with pytest.raises(CheckpointError, match=r"legacy default.*output_size 32 \(3 decoder\.to_rgbs.*opts\['output_size'\] = 32"):
        load_psp(_save(tmp_path, ckpt), device="meta")


def test_data_parallel_module_prefix(tmp_path):
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {"module." + k: v for k, v in ckpt["state_dict"].items()}
    net = load_psp(_save(tmp_path, ckpt, "all.pt"), device="meta")  # every key prefixed: stripped
    assert "decoder.input.input" in net.state_dict()
    first = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][first.removeprefix("module.")] = ckpt["state_dict"].pop(first)
    with pytest.raises(CheckpointError, match=r"keys start with 'module\.'.*removeprefix"):
        load_psp(_save(tmp_path, ckpt, "some.pt"), device="meta")


def test_latent_avg_is_not_checked_when_unused(tmp_path):
    # The original ignores latent_avg without start_from_latent_avg: any shape loads (kept, unused).
    path = random_checkpoint(tmp_path / "m.pt", device="meta", output_size=32, start_from_latent_avg=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["latent_avg"] = torch.zeros(3, 512)
    net = load_psp(_save(tmp_path, ckpt), device="meta")
    assert tuple(net.latent_avg.shape) == (3, 512) and not net.start_from_latent_avg


# -- StyleGAN2 generator files ----------------------------------------------------------------


def test_load_stylegan2_rosinality_format(tmp_path, ckpt32):
    path = random_stylegan2_checkpoint(tmp_path / "sg16.pt", size=16, seed=2)
    gen = load_stylegan2(path)
    saved = torch.load(path, weights_only=True)
    assert gen.size == 16 and gen.n_latent == 6 and not gen.training
    assert tuple(gen.latent_avg.shape) == (512,)
    assert gen.checkpoint_sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    for k, v in gen.state_dict().items():
        assert torch.equal(v, saved["g_ema"][k]), k
    with torch.inference_mode():
        img, _ = gen([gen.latent_avg[None]], input_is_latent=True, randomize_noise=False)
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    with pytest.raises(CheckpointError, match="use load_psp"):
        load_stylegan2(ckpt32)


def test_legacy_non_zip_serialization_still_loads(tmp_path):
    path = random_stylegan2_checkpoint(tmp_path / "sg8.pt", size=8, seed=1)
    ckpt = torch.load(path, weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    gen = load_stylegan2(legacy)
    torch.testing.assert_close(gen.style[1].weight, ckpt["g_ema"]["style.1.weight"])


def test_locations_follow_one_rule_no_url_chaining(tmp_path):
    """`::` is part of a name for every reader (psp_core.uris): a checkpoint saved as `m::1.pt`
    loads by that path, as `file://` and from `memory://`, the same bytes each time; a chained
    URL is a name that does not exist, not a cache in front of another store."""
    from psp_core.checkpoint import read_checkpoint_header
    from psp_core.uris import filesystem_for, is_local, open_uri

    path = random_checkpoint(tmp_path / "m::1.pt", device="meta", output_size=32)
    data = open(path, "rb").read()
    with open_uri("memory://odd::dir/m::1.pt", "wb") as f:
        f.write(data)
    for uri in (str(path), f"file://{path}", "memory://odd::dir/m::1.pt"):
        assert read_checkpoint_header(uri).sha256 == hashlib.sha256(data).hexdigest()
        assert load_psp(uri, device="meta").checkpoint_sha256 == hashlib.sha256(data).hexdigest()
    assert is_local(str(path)) and is_local(f"file://{path}") and not is_local("memory://odd::dir/m::1.pt")
    fs, where = filesystem_for("simplecache::memory://odd::dir/m::1.pt")
    assert fs.protocol in ("file", ("file", "local")) and where.startswith(os.getcwd()) and where.endswith("/m::1.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint_header(f"simplecache::file://{path}")
