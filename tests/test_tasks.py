"""Per-task input transforms: checked against independent PIL/numpy computations of the original
pSp `transform_inference` (spec section 3.2), not against our own code."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from psp_core.tasks import bicubic_downsample, get_task, known_tasks, tensor2im

ALL_TASKS = ["ffhq_encode", "ffhq_frontalize", "celebs_sketch_to_face", "celebs_seg_to_face",
             "celebs_super_resolution",
             # e4e / ReStyle
             "toonify", "cars_encode", "church_encode", "horse_encode", "afhq_wild_encode"]


def _random_rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# Independent reference: the bicubic downsampler written as per-output-pixel weighted sums.


def _keys_cubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _reflect(i: int, n: int) -> int:
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def _reference_downsample(img: np.ndarray, f: int) -> np.ndarray:
    """img [C,H,W] float64 -> [C,H//f,W//f]: out[y,x] = sum_ij k[i] k[j] img[refl(y*f+i-p), refl(x*f+j-p)]."""
    n = 4 * f
    k = np.array([_keys_cubic((i - n // 2 + 0.5) / f) for i in range(n)])
    k /= k.sum()
    p = (3 * f) // 2  # the floor half of the 3f padding goes above / left
    c, h, w = img.shape
    out = np.zeros((c, h // f, w // f))
    for y in range(h // f):
        rows = [_reflect(y * f + i - p, h) for i in range(n)]
        for x in range(w // f):
            cols = [_reflect(x * f + j - p, w) for j in range(n)]
            patch = img[:, rows][:, :, cols]
            out[:, y, x] = np.einsum("i,j,cij->c", k, k, patch)
    return out


# ---------------------------------------------------------------------------------------------
# Task registry


def test_every_released_dataset_type_has_a_task():
    assert set(known_tasks()) == set(ALL_TASKS)
    for name in ALL_TASKS:
        assert get_task(name).name == name


def test_unknown_dataset_type_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_task("ffhq_toonify")
    for name in ALL_TASKS:
        assert name in str(err.value)


def test_task_channels_alignment_and_mixing_defaults():
    sketch, seg = get_task("celebs_sketch_to_face"), get_task("celebs_seg_to_face")
    assert (sketch.input_nc, sketch.label_nc) == (1, 1)
    assert (seg.input_nc, seg.label_nc) == (19, 19)
    assert not sketch.needs_alignment and not seg.needs_alignment
    assert sketch.default_latent_mask == seg.default_latent_mask == tuple(range(8, 18))
    for name in ("ffhq_encode", "ffhq_frontalize", "celebs_super_resolution"):
        task = get_task(name)
        assert (task.input_nc, task.label_nc, task.needs_alignment) == (3, 0, True)
        assert task.default_latent_mask is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        sketch.label_nc = 3  # frozen: a shared registry entry must not be mutable


def test_e4e_restyle_domains_are_unaligned_photos_and_cars_are_192x256():
    # Faces (toonify) are FFHQ-aligned; cars, churches, horses and animals are not aligned.
    assert get_task("toonify").needs_alignment
    for name in ("cars_encode", "church_encode", "horse_encode", "afhq_wild_encode"):
        task = get_task(name)
        assert (task.input_nc, task.label_nc, task.needs_alignment, task.normalized) == (3, 0, False, True)
    img = _random_rgb(300, 500, seed=3)
    cars = get_task("cars_encode").transform(img)
    assert tuple(cars.shape) == (3, 192, 256)
    # torchvision's Resize((192, 256)) on PIL is a bilinear PIL resize to (w, h) = (256, 192).
    expected = np.asarray(img.resize((256, 192), Image.Resampling.BILINEAR), dtype=np.float32) / 255 * 2 - 1
    assert np.abs(cars.permute(1, 2, 0).numpy() - expected).max() < 1e-6
    assert tuple(get_task("church_encode").transform(img).shape) == (3, 256, 256)


# ---------------------------------------------------------------------------------------------
# Photo tasks: Resize(256) bilinear -> ToTensor -> Normalize(.5, .5)


@pytest.mark.parametrize("name", ["ffhq_encode", "ffhq_frontalize"])
def test_photo_transform_matches_pil_bilinear_and_normalize(name, astronaut):
    x = get_task(name).transform(astronaut)
    assert x.dtype == torch.float32 and x.shape == (3, 256, 256)
    expected = np.asarray(astronaut.resize((256, 256), Image.Resampling.BILINEAR), dtype=np.float64)
    expected = expected.transpose(2, 0, 1) / 255 * 2 - 1
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)


def test_photo_pixel_values_by_hand():
    arr = np.zeros((256, 256, 3), dtype=np.uint8)
    arr[0, 0] = (0, 51, 255)  # already 256x256: the resize keeps pixels
    x = get_task("ffhq_encode").transform(Image.fromarray(arr))
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0, 51 / 127.5 - 1, 1.0], abs=1e-6)


def test_resize_is_antialiased_when_shrinking():
    # 1-pixel black/white stripes at 512: an antialiased 2x shrink averages them to mid-gray,
    # point sampling would keep pure black or white.
    stripes = np.zeros((512, 512, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    x = get_task("ffhq_encode").transform(Image.fromarray(stripes))
    assert x[:, 8:-8, 8:-8].abs().max().item() < 0.02


def test_photo_input_modes_are_converted_to_rgb():
    gray = Image.fromarray(np.full((64, 48), 200, dtype=np.uint8))
    rgba = Image.new("RGBA", (64, 48), (10, 20, 30, 0))
    task = get_task("ffhq_encode")
    xg, xa = task.transform(gray), task.transform(rgba)
    assert xg.shape == xa.shape == (3, 256, 256)
    np.testing.assert_allclose(xg.numpy(), 200 / 127.5 - 1, atol=1e-6)
    # alpha is dropped, not composited
    np.testing.assert_allclose(xa[:, 100, 100].numpy(), [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1], atol=1e-6)


def test_transform_accepts_a_uint8_array(astronaut):
    task = get_task("ffhq_encode")
    assert torch.equal(task.transform(np.asarray(astronaut)), task.transform(astronaut))
    with pytest.raises(ValueError, match="uint8"):
        task.transform(np.zeros((8, 8, 3), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Sketch: convert('L') -> Resize -> ToTensor, no Normalize


def test_sketch_transform_is_one_gray_channel_in_0_1(astronaut):
    x = get_task("celebs_sketch_to_face").transform(astronaut)
    assert x.dtype == torch.float32 and x.shape == (1, 256, 256)
    expected = np.asarray(astronaut.convert("L").resize((256, 256), Image.Resampling.BILINEAR)) / 255
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)
    red = Image.new("RGB", (256, 256), (255, 0, 0))
    # PIL's ITU-R 601 luma: 255 * 0.299 -> 76
    assert get_task("celebs_sketch_to_face").transform(red)[0, 5, 5].item() == pytest.approx(76 / 255)


# ---------------------------------------------------------------------------------------------
# Seg: convert('L') -> Resize (bilinear!) -> one-hot(19)


def test_seg_one_hot_values_and_shape():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 19, size=(256, 256)).astype(np.uint8)
    x = get_task("celebs_seg_to_face").transform(Image.fromarray(labels))
    assert x.dtype == torch.float32 and x.shape == (19, 256, 256)
    assert set(torch.unique(x).tolist()) == {0.0, 1.0}
    assert torch.all(x.sum(0) == 1)
    np.testing.assert_array_equal(x.argmax(0).numpy(), labels)


def test_seg_bilinear_resize_blends_labels_like_the_original():
    # 512x512: label 2 on the left, 10 on the right. The original's bilinear 2x shrink creates
    # in-between labels (never drawn) on the border; a faithful transform keeps them.
    labels = np.full((512, 512), 2, dtype=np.uint8)
    labels[:, 256:] = 10
    x = get_task("celebs_seg_to_face").transform(Image.fromarray(labels))
    present = set(np.unique(x.argmax(0).numpy()).tolist())
    assert {2, 10} < present and present <= set(range(2, 11))
    blended = np.asarray(Image.fromarray(labels).resize((256, 256), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(x.argmax(0).numpy(), blended)


def test_seg_label_out_of_range_is_a_readable_error():
    labels = np.zeros((256, 256), dtype=np.uint8)
    labels[10:20, 10:20] = 19
    with pytest.raises(ValueError, match=r"19 classes.*class indices"):
        get_task("celebs_seg_to_face").transform(Image.fromarray(labels))


# ---------------------------------------------------------------------------------------------
# Super-resolution: Resize -> BicubicDownSample(f) -> clamp -> uint8 truncation -> Resize -> Normalize


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_bicubic_downsample_matches_direct_weighted_sums(factor):
    rng = np.random.default_rng(factor)
    img = rng.random((3, 24, 20))
    got = bicubic_downsample(torch.from_numpy(img).float(), factor)
    assert got.shape == (3, 24 // factor, 20 // factor)
    np.testing.assert_allclose(got.numpy(), _reference_downsample(img, factor), atol=2e-6)
    batched = bicubic_downsample(torch.from_numpy(img).float()[None], factor)
    assert torch.equal(batched[0], got)


def test_bicubic_downsample_is_not_clamped_and_factor_one_blurs():
    step = torch.zeros(3, 16, 16)
    step[:, :, 8:] = 1.0
    out = bicubic_downsample(step, 1)
    assert out.shape == step.shape
    # the cubic's negative lobes over- and undershoot at the edge; the forward leaves them
    assert out.min().item() < 0 and out.max().item() > 1
    assert not torch.equal(out, step)


def _black_white_blocks(size: int, block: int, seed: int = 0) -> Image.Image:
    """Hard 0/255 edges: the bicubic overshoots there, so the clamp before uint8 matters."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 2, size=(size // block, size // block, 3), dtype=np.uint8) * 255
    return Image.fromarray(np.kron(cells, np.ones((block, block, 1), dtype=np.uint8)))


@pytest.mark.parametrize("factor", [1, 4, 16])
@pytest.mark.parametrize("source", ["noise", "blocks"])
def test_super_resolution_transform_matches_independent_pipeline(factor, source):
    src = _random_rgb(300, 280, seed=factor) if source == "noise" else _black_white_blocks(256, 24)
    x = get_task("celebs_super_resolution").transform(src, factor=factor)
    assert x.dtype == torch.float32 and x.shape == (3, 256, 256)

    first = np.asarray(src.resize((256, 256), Image.Resampling.BILINEAR)).transpose(2, 0, 1) / 255
    low = np.clip(_reference_downsample(first, factor), 0, 1)
    low_u8 = np.floor(low * 255).astype(np.uint8)  # ToPILImage truncates
    back = np.asarray(Image.fromarray(low_u8.transpose(1, 2, 0)).resize((256, 256), Image.Resampling.BILINEAR))
    expected = back.transpose(2, 0, 1) / 255 * 2 - 1
    diff = np.abs(x.numpy() - expected)
    # float32 vs float64 sums may flip a truncation at an exact level boundary: allow that only
    assert diff.max() <= 2 / 255 + 1e-6
    assert (diff > 1e-6).mean() < 0.01


def test_super_resolution_actually_removes_detail():
    src = _random_rgb(256, 256)
    task = get_task("celebs_super_resolution")
    sharp = get_task("ffhq_encode").transform(src)
    mild, strong = task.transform(src, factor=2), task.transform(src, factor=16)
    assert (mild - sharp).abs().mean() < (strong - sharp).abs().mean()
    # factor 16 on 256: a 16x16 image upsampled, so neighbouring pixels barely differ
    assert (strong[:, :, 1:] - strong[:, :, :-1]).abs().mean() < 0.05


def test_super_resolution_factor_is_required_and_validated():
    task = get_task("celebs_super_resolution")
    src = _random_rgb(64, 64)
    with pytest.raises(ValueError, match="factor="):
        task.transform(src)
    for bad in (0, -2, 2.5, "4", True, 1000):
        with pytest.raises(ValueError, match="factor"):
            task.transform(src, factor=bad)
    assert torch.equal(task.transform(src, factor=np.int64(4)), task.transform(src, factor=4))
    # other tasks ignore a factor
    enc = get_task("ffhq_encode")
    assert torch.equal(enc.transform(src, factor=8), enc.transform(src))


# ---------------------------------------------------------------------------------------------
# Tensor -> image


def test_tensor2im_floors_and_clips():
    t = torch.zeros(3, 2, 2)
    t[0, 0, 0] = 127.9 / 127.5 - 1  # maps to 127.9 -> 127, rounding would give 128
    t[1, 0, 1] = -3.0  # clipped to 0
    t[2, 1, 0] = 3.0  # clipped to 255
    t[0, 1, 1] = 1.0
    im = tensor2im(t)
    assert im.dtype == np.uint8 and im.shape == (2, 2, 3)
    assert im[0, 0, 0] == 127
    assert im[0, 1, 1] == 0 and im[1, 0, 2] == 255 and im[1, 1, 0] == 255
    assert im[0, 0, 1] == 127  # 0.0 -> 127.5 -> 127
    np.testing.assert_array_equal(tensor2im(t.numpy()), im)
    with pytest.raises(ValueError, match=r"batch\[i\]"):
        tensor2im(t[None])


def test_tensor2im_inverts_the_photo_transform(astronaut):
    x = get_task("ffhq_encode").transform(astronaut)
    expected = np.asarray(astronaut.resize((256, 256), Image.Resampling.BILINEAR))
    # k/255 -> [-1,1] -> back may land a hair below k and floor to k-1, never further
    diff = expected.astype(int) - tensor2im(x).astype(int)
    assert set(np.unique(diff).tolist()) <= {0, 1}


def test_visualize_input_per_task():
    labels = np.arange(19, dtype=np.uint8).repeat(14)[:256]
    labels = np.tile(labels, (256, 1))
    seg = get_task("celebs_seg_to_face")
    vis = seg.visualize_input(seg.transform(Image.fromarray(labels)))
    assert vis.dtype == np.uint8 and vis.shape == (256, 256, 3)
    # CelebAMask-HQ palette of the original get_colors(): background, skin, ..., index 18
    assert vis[0, 0].tolist() == [0, 0, 0]
    assert vis[0, 14].tolist() == [204, 0, 0]
    assert vis[0, 4 * 14].tolist() == [51, 51, 255]
    assert vis[0, 7 * 14].tolist() == [255, 204, 204]
    assert vis[0, 18 * 14].tolist() == [0, 204, 0]

    sketch = get_task("celebs_sketch_to_face")
    s = sketch.visualize_input(torch.full((1, 4, 4), 0.5))
    assert s.shape == (4, 4, 3) and np.all(s == 127)

    photo = torch.zeros(3, 4, 4)
    np.testing.assert_array_equal(get_task("ffhq_encode").visualize_input(photo), tensor2im(photo))


# ---------------------------------------------------------------------------------------------
# The two halves the pipeline runs apart: prepare (PIL, CPU workers) and to_model_input (device)


def _old_transform_tensor_part(task, prepared: np.ndarray) -> torch.Tensor:
    """The single-image ToTensor/Normalize/one-hot as written before the split (torchvision's ops)."""
    if task.label_nc == 0:
        x = torch.from_numpy(prepared).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub(0.5).div(0.5)
    if task.label_nc == 1:
        return torch.from_numpy(prepared[:, :, None]).permute(2, 0, 1).contiguous().float().div(255)
    one_hot = np.zeros(prepared.shape + (task.label_nc,), dtype=np.int64)
    np.put_along_axis(one_hot, prepared[..., None].astype(np.intp), 1, axis=-1)
    return torch.from_numpy(one_hot.transpose(2, 0, 1).copy()).float()


@pytest.mark.parametrize("name", ALL_TASKS)
def test_prepare_then_to_model_input_is_bit_identical_to_the_torchvision_ops(name):
    """Every byte value, batched: the device half equals ToTensor/Normalize/one-hot exactly."""
    task = get_task(name)
    rng = np.random.default_rng(3)
    high = 256 if task.label_nc in (0, 1) else task.label_nc
    images = [rng.integers(0, high, size=(300, 280, 3) if task.label_nc == 0 else (300, 280), dtype=np.uint8)
              for _ in range(2)]
    images.append(np.arange(256 * 256 * 3, dtype=np.int64).reshape(256, 256, 3).astype(np.uint8)
                  if task.label_nc == 0 else (np.arange(256 * 256) % high).reshape(256, 256).astype(np.uint8))
    factor = 4 if task.needs_factor else None
    prepared = np.stack([task.prepare(Image.fromarray(im), factor) for im in images])
    assert prepared.dtype == np.uint8 and prepared.shape[1:] == task.prepared_shape
    # written into the caller's array (the align stage's block), the same bytes
    into = np.full_like(prepared, 7)
    for row, im in zip(into, images):
        assert task.prepare(Image.fromarray(im), factor, out=row) is row
    np.testing.assert_array_equal(into, prepared)
    batch = task.to_model_input(torch.from_numpy(prepared))
    assert batch.dtype == torch.float32 and batch.shape == (3, task.input_nc, *task.input_size) and batch.is_contiguous()
    for i, im in enumerate(images):
        expected = _old_transform_tensor_part(task, prepared[i])
        assert torch.equal(batch[i], expected)
        assert torch.equal(task.transform(Image.fromarray(im), factor), expected)


def test_prepare_passes_an_aligned_crop_through_and_rejects_bad_labels():
    crop = np.asarray(_random_rgb(256, 256, seed=4))
    out = get_task("ffhq_encode").prepare(crop)
    assert np.array_equal(out, np.asarray(Image.fromarray(crop).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)))
    assert out is not crop
    into = np.zeros_like(crop)
    get_task("ffhq_encode").prepare(crop, out=into)
    np.testing.assert_array_equal(into, crop)
    with pytest.raises(ValueError, match="shape"):
        get_task("ffhq_encode").prepare(crop, out=np.zeros((256, 256), np.uint8))
    labels = np.zeros((256, 256), dtype=np.uint8)
    labels[0, 0] = 25
    with pytest.raises(ValueError, match="label values \\[25\\]"):
        get_task("celebs_seg_to_face").prepare(labels)
    with pytest.raises(ValueError, match="uint8"):
        get_task("ffhq_encode").to_model_input(torch.zeros(1, 256, 256, 3))


def test_images_to_uint8_equals_tensor2im_byte_for_byte():
    from psp_core.tasks import _uint8_batched, images_to_uint8

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=gen) * 1.2
    # exact level boundaries, the clip edges, NaN and infinities
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    x[0, 0] = levels.reshape(16, 16)
    x[1, 1, 0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1.0])
    out = images_to_uint8(x)  # on the CPU: tensor2im of each image
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16, 3) and out.is_contiguous()
    for i in range(3):
        np.testing.assert_array_equal(out[i].numpy(), tensor2im(x[i]))
    half = x.to(torch.bfloat16)
    np.testing.assert_array_equal(images_to_uint8(half)[2].numpy(), tensor2im(half[2]))
    # the batched form other devices take gives the same bytes (here on the CPU)
    assert torch.equal(_uint8_batched(x), out)
    assert torch.equal(_uint8_batched(x.double()), images_to_uint8(x.double()))
