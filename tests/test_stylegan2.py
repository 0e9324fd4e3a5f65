"""StyleGAN2 generator: state-dict layout, modulated-conv implementations, forward bookkeeping."""
from __future__ import annotations

import pytest
import torch

from psp_core.stylegan2 import Generator, ModulatedConv2d, set_modulated_conv_impl
from psp_core.testing import randomize_


@pytest.fixture(scope="module")
def gen() -> Generator:
    # 16 px keeps the suite fast: every layer kind is present (4x4 input, two upsampling blocks).
    return randomize_(Generator(16), seed=3).eval()


def test_state_dict_layout_matches_rosinality_names():
    with torch.device("meta"):
        g = Generator(1024)
    sd = g.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert [f"style.{i}.weight" for i in range(1, 9)] == [k for k in sd if k.startswith("style.") and k.endswith("weight")]
    assert "style.0.weight" not in sd  # index 0 is PixelNorm
    assert shapes["input.input"] == (1, 512, 4, 4)
    assert shapes["conv1.conv.weight"] == (1, 512, 512, 3, 3)
    assert shapes["conv1.conv.modulation.weight"] == (512, 512)
    assert shapes["conv1.noise.weight"] == (1,)
    assert shapes["conv1.activate.bias"] == (512,)
    assert shapes["to_rgb1.conv.weight"] == (1, 3, 512, 1, 1)
    assert shapes["to_rgb1.bias"] == (1, 3, 1, 1)
    assert shapes["convs.0.conv.blur.kernel"] == (4, 4)
    assert "convs.1.conv.blur.kernel" not in sd  # only upsampling convs blur
    assert shapes["to_rgbs.0.upsample.kernel"] == (4, 4)
    assert shapes["convs.15.conv.weight"] == (1, 32, 32, 3, 3)  # 16 * channel_multiplier at 1024
    assert len([k for k in sd if k.startswith("convs.") and k.endswith(".conv.weight")]) == 16
    assert len([k for k in sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight")]) == 8
    noises = [k for k in sd if k.startswith("noises.")]
    assert noises == [f"noises.noise_{i}" for i in range(17)]
    for i in range(17):
        r = (i + 5) // 2
        assert shapes[f"noises.noise_{i}"] == (1, 1, 2**r, 2**r)
    assert g.n_latent == 18 and g.num_layers == 17


def test_blur_kernels_are_the_originals_fixed_buffers():
    g = Generator(8)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    expected = (k[None, :] * k[:, None]) / 64 * 4
    torch.testing.assert_close(g.convs[0].conv.blur.kernel, expected)
    torch.testing.assert_close(g.to_rgbs[0].upsample.kernel, expected)


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_batched_modulated_conv_equals_grouped_reference(upsample, demodulate, kernel_size):
    if upsample and kernel_size == 1:
        pytest.skip("StyleGAN2 only upsamples with 3x3 convs")
    torch.manual_seed(upsample * 4 + demodulate * 2 + kernel_size)
    conv = ModulatedConv2d(16, 24, kernel_size, 32, demodulate=demodulate, upsample=upsample)
    randomize_(conv, seed=5)
    x = torch.randn(3, 16, 8, 8)
    style = torch.randn(3, 32)
    conv.impl = "grouped"
    ref = conv(x, style)
    conv.impl = "batched"
    out = conv(x, style)
    assert out.shape == ref.shape == (3, 24, 16 if upsample else 8, 16 if upsample else 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="grouped"):
        ModulatedConv2d(4, 4, 3, 8, impl="cuda")


def test_whole_generator_same_output_with_either_impl(gen):
    w = torch.randn(2, gen.n_latent, 512)
    with torch.no_grad():
        a, _ = gen([w], input_is_latent=True, randomize_noise=False)
        set_modulated_conv_impl(gen, "grouped")
        try:
            b, _ = gen([w], input_is_latent=True, randomize_noise=False)
        finally:
            set_modulated_conv_impl(gen, "batched")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_of_four_equals_single_calls(gen):
    w = torch.randn(4, gen.n_latent, 512)
    with torch.no_grad():
        batch, _ = gen([w], input_is_latent=True, randomize_noise=False)
        singles = torch.cat([gen([w[i : i + 1]], input_is_latent=True, randomize_noise=False)[0] for i in range(4)])
    assert batch.shape == (4, 3, 16, 16)
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-5)


def test_fixed_noise_buffers_vs_random_noise(gen):
    w = torch.randn(1, gen.n_latent, 512)
    with torch.no_grad():
        a, _ = gen([w], input_is_latent=True, randomize_noise=False)
        b, _ = gen([w], input_is_latent=True, randomize_noise=False)
        explicit = [getattr(gen.noises, f"noise_{i}") for i in range(gen.num_layers)]
        c, _ = gen([w], input_is_latent=True, noise=explicit)
        r1, _ = gen([w], input_is_latent=True, randomize_noise=True)
        r2, _ = gen([w], input_is_latent=True, randomize_noise=True)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert (r1 - a).abs().max() > 1e-3 and (r1 - r2).abs().max() > 1e-3


def test_z_input_goes_through_mapping_and_returns_repeated_w(gen):
    z = torch.randn(2, 512)
    with torch.no_grad():
        img_z, lat = gen([z], return_latents=True, randomize_noise=False)
        w = gen.get_latent(z)
        img_w, _ = gen([w], input_is_latent=True, randomize_noise=False)
    assert lat.shape == (2, gen.n_latent, 512)
    torch.testing.assert_close(lat, w.unsqueeze(1).repeat(1, gen.n_latent, 1))
    torch.testing.assert_close(img_z, img_w)
    # Without return_latents the second value is None, as in the original.
    assert gen([w], input_is_latent=True)[1] is None


def test_two_styles_mix_at_inject_index(gen):
    w1, w2 = torch.randn(1, 512), torch.randn(1, 512)
    with torch.no_grad():
        mixed, lat = gen([w1, w2], input_is_latent=True, inject_index=3, return_latents=True, randomize_noise=False)
        manual = torch.cat([w1.repeat(3, 1), w2.repeat(gen.n_latent - 3, 1)])[None]
        ref, _ = gen([manual], input_is_latent=True, randomize_noise=False)
    torch.testing.assert_close(lat, manual)
    torch.testing.assert_close(mixed, ref)


def test_every_style_index_reaches_the_image(gen):
    # Bookkeeping: conv1 <- 0, to_rgb1 and convs[0] <- 1, ..., the last to_rgb <- n_latent - 1.
    w = torch.randn(1, gen.n_latent, 512)
    with torch.no_grad():
        base, _ = gen([w], input_is_latent=True, randomize_noise=False)
        for i in range(gen.n_latent):
            w2 = w.clone()
            w2[:, i] += 1.0
            out, _ = gen([w2], input_is_latent=True, randomize_noise=False)
            assert (out - base).abs().max() > 1e-4, f"style {i} has no effect"


def test_truncation_pulls_towards_truncation_latent(gen):
    z = torch.randn(2, 512)
    with torch.no_grad():
        mean = gen.mean_latent(256, generator=torch.Generator().manual_seed(0))
        full, _ = gen([z], truncation=0.0, truncation_latent=mean, randomize_noise=False)
        avg, _ = gen([mean], input_is_latent=True, randomize_noise=False)
    assert mean.shape == (1, 512)
    torch.testing.assert_close(full, avg.expand_as(full))


def test_random_weights_give_finite_bounded_images(gen):
    with torch.no_grad():
        img, _ = gen([torch.randn(4, 512)], randomize_noise=False)
    assert torch.isfinite(img).all()
    assert 0.05 < img.std() < 2.0 and img.abs().max() < 10


def test_generator_rejects_a_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Generator(48)
