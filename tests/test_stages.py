"""The stages as plain callables on batch dicts (no Ray): decode, align (+ the PIL part of the task
transform), the model stage, the outputs stage, and the resource decisions."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from jobs.demo import sample_files
from pipelines.align import AlignFaces
from pipelines.model import InvertFaces, ModelOptions, invert_resources, model_actor_memory
from pipelines.outputs import EncodeOutputs, encode_image, encode_png, outputs_resources


def _read_batch(named_blobs: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    """What the read stage hands on: source_uri, data, source_sha256, status, error."""
    n = len(named_blobs)

    def obj(values):
        out = np.empty(n, dtype=object)
        for i, v in enumerate(values):
            out[i] = v
        return out

    return {
        "source_uri": obj([f"mem://{name}" for name, _ in named_blobs]),
        "data": obj([blob for _, blob in named_blobs]),
        "source_sha256": obj(["x" * 64] * n),
        "status": obj(["ok"] * n),
        "error": obj([""] * n),
    }


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {name: blob for name, blob, _ in sample_files(20)}


@pytest.fixture(scope="module")
def aligned(files):
    """The align stage's output for two faces, the four broken files and an upstream read error."""
    names = ["face_full.png", "face_exif_rot.jpg", "bad_truncated.jpg", "bad_empty.jpg", "bad_text.jpg", "bad_no_face.jpg"]
    batch = _read_batch([(n, files[n]) for n in names] + [("unreadable.jpg", b"")])
    batch["status"][-1] = "read_error"
    batch["error"][-1] = "cannot read mem://unreadable.jpg: FileNotFoundError"
    return AlignFaces(mode="dlib", task="ffhq_encode")(batch)


def test_align_stage_statuses_and_geometry(aligned):
    assert list(aligned["status"]) == ["ok", "ok", "decode_error", "decode_error", "decode_error", "no_face", "read_error"]
    assert "truncated" in aligned["error"][2] and "bad_truncated.jpg" in aligned["error"][2]
    assert "no face" in aligned["error"][5]
    assert aligned["aligned"].shape == (7, 256, 256, 3) and aligned["landmarks"].shape == (7, 68, 2)
    assert not np.isnan(aligned["landmarks"][:2]).any() and np.isnan(aligned["landmarks"][2:]).all()
    # The EXIF orientation is applied: the stored (rotated) JPEG is 512x512 either way, but the
    # face is found upright and lands where it does in the plain image.
    np.testing.assert_allclose(aligned["landmarks"][1], aligned["landmarks"][0], atol=3)
    assert list(aligned["source_width"][:2]) == [512, 512] and aligned["source_width"][2] == -1
    assert "data" not in aligned and "image" not in aligned


def test_speed_mode_align_stage_decodes_camera_jpegs_at_reduced_scale(files, astronaut):
    """--align-detect-size: a camera-size JPEG reaches the aligner undecoded and is aligned from its
    1/2 scale decode (landmarks within 2 % of the inter-ocular distance of the exact mode's, the
    photo's own size recorded); PNGs, EXIF-rotated and broken JPEGs give what the exact mode gives."""
    buf = io.BytesIO()
    astronaut.resize((1414, 1414), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=92)
    names = ["face_full.png", "face_exif_rot.jpg", "bad_truncated.jpg", "bad_empty.jpg", "bad_no_face.jpg"]
    batch = _read_batch([(n, files[n]) for n in names] + [("camera.jpg", buf.getvalue())])
    exact = AlignFaces(mode="dlib", task="ffhq_encode")(batch)
    speed = AlignFaces(mode="dlib", task="ffhq_encode", aligner_kwargs={"detect_size": 512})(batch)
    assert list(speed["status"]) == list(exact["status"]) == ["ok", "ok", "decode_error", "decode_error", "no_face", "ok"]
    assert list(speed["error"]) == list(exact["error"])
    np.testing.assert_array_equal(speed["source_width"], exact["source_width"])
    assert speed["source_width"][-1] == speed["source_height"][-1] == 1414
    lm_e, lm_s = exact["landmarks"][-1], speed["landmarks"][-1]
    iod = np.linalg.norm(lm_e[42:48].mean(0) - lm_e[36:42].mean(0))
    assert np.linalg.norm(lm_s - lm_e, axis=1).mean() < 0.02 * iod
    diff = np.abs(speed["model_input"][-1].astype(np.int16) - exact["model_input"][-1].astype(np.int16))
    assert diff.mean() < 4.0


def test_align_none_matches_the_task_transform(files):
    """--align none resizes exactly as the task transform would, for photos and sketches."""
    from psp_core.tasks import get_task

    src = Image.open(io.BytesIO(files["face_crop_wide.jpg"])).convert("RGB")
    for task, gray in (("ffhq_encode", False), ("celebs_sketch_to_face", True)):
        out = AlignFaces(mode="none", gray=gray)(_read_batch([("x.jpg", files["face_crop_wide.jpg"])]))
        assert out["status"][0] == "ok" and np.isnan(out["quad"][0]).all()
        t = get_task(task)
        assert np.array_equal(t.transform(Image.fromarray(out["aligned"][0])).numpy(), t.transform(src).numpy())


@pytest.fixture(scope="module")
def inverter(tiny_checkpoint):
    return InvertFaces(tiny_checkpoint, ModelOptions("ffhq_encode", device="cpu", cpu_threads=2))


@pytest.fixture(scope="module")
def model_out(inverter, aligned):
    return inverter(aligned)


@pytest.fixture(scope="module")
def inverted(model_out):
    return EncodeOutputs("ffhq_encode", run_id="test-run", n_styles=8)(model_out)


def test_invert_stage_one_row_per_input_and_direct_encode(inverted, aligned, tiny_checkpoint):
    import torch

    from psp_core import load_psp
    from psp_core.tasks import get_task

    rows = inverted.to_pylist()
    assert [r["status"] for r in rows] == list(aligned["status"])
    assert [r["error"] for r in rows][2:] == list(aligned["error"][2:]) and rows[0]["error"] is None
    assert rows[6]["source_sha256"] == "x" * 64 and rows[2]["source_width"] is None
    model = load_psp(tiny_checkpoint)
    x = get_task("ffhq_encode").transform(Image.fromarray(aligned["aligned"][0]))[None]
    with torch.inference_mode():
        direct = model.encode(x)[0].numpy()
    np.testing.assert_allclose(np.asarray(rows[0]["w_plus"]).reshape(8, 512), direct, atol=1e-4)
    img = Image.open(io.BytesIO(rows[0]["output_image"]))
    assert (img.format, img.size) == ("PNG", (256, 256))
    assert rows[0]["landmarks"] is not None and rows[5]["landmarks"] is None
    assert all(r["w_plus"] is None and r["output_image"] is None for r in rows[2:])
    assert {r["run_id"] for r in rows} == {"test-run"}


@pytest.mark.parametrize("impl", ["auto", "fpng", "pillow"])
def test_png_outputs_decode_to_exactly_the_pixels(impl, files):
    """Every PNG encoder is lossless: RGB and grayscale, odd sizes, a photo and noise."""
    if impl == "fpng":
        pytest.importorskip("fpng")
    photo = np.asarray(Image.open(io.BytesIO(files["face_full.png"])).convert("RGB"))
    rng = np.random.default_rng(7)
    cases = [photo, photo[:255, 3:260], rng.integers(0, 256, (64, 37, 3), dtype=np.uint8)]
    grays = [photo[:, :, 1], rng.integers(0, 256, (33, 70, 1), dtype=np.uint8)]
    for pixels in cases + (grays if impl != "fpng" else []):
        img = Image.open(io.BytesIO(encode_png(pixels, impl)))
        assert img.format == "PNG" and img.mode == ("RGB" if pixels.ndim == 3 and pixels.shape[2] == 3 else "L")
        assert np.array_equal(np.asarray(img), pixels.reshape(np.asarray(img).shape))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(photo.astype(np.float32), impl)


def test_output_rows_record_their_image_format(model_out):
    """image_format says how output_image is encoded: PNG and JPEG bytes, or none."""
    for fmt, pil_format in (("png", "PNG"), ("jpeg", "JPEG"), ("none", None)):
        rows = EncodeOutputs("ffhq_encode", run_id="fmt", n_styles=8, images=fmt)(model_out).to_pylist()
        assert rows[0]["image_format"] == fmt
        got = rows[0]["output_image"]
        assert (Image.open(io.BytesIO(got)).format if got else None) == pil_format
        assert rows[0]["output_image"] == encode_image(model_out["image"][0], fmt)


def test_invert_mix_is_per_row_seeded_and_full_size_jpeg(tiny_checkpoint, aligned):
    """--mix: one row per input with N mixes; a row's mixes do not depend on its batch."""
    model = InvertFaces(tiny_checkpoint, ModelOptions(
        "ffhq_encode", device="cpu", image_size="full", mix=2, latent_mask=[4, 5, 6, 7], seed=7, metrics=True,
    ))
    outputs = EncodeOutputs("ffhq_encode", run_id="mix", n_styles=8, images="jpeg", metrics=True)

    def stage(batch):
        return outputs(model(batch))

    both = stage(aligned).to_pylist()  # rows 0 and 1 in one batch
    alone = stage({k: v[1:2] for k, v in aligned.items()}).to_pylist()
    assert len(both[1]["mix_w_plus"]) == 2 and len(both[1]["mix_images"]) == 2
    np.testing.assert_allclose(both[1]["mix_w_plus"], alone[0]["mix_w_plus"], atol=1e-5)
    assert not np.allclose(both[0]["mix_w_plus"][0], both[0]["mix_w_plus"][1])
    img = Image.open(io.BytesIO(both[1]["output_image"]))
    assert (img.format, img.size, both[1]["image_format"]) == ("JPEG", (32, 32), "jpeg")
    assert both[1]["psnr"] is not None and both[1]["ssim"] is not None and both[2]["psnr"] is None


def test_invert_resources_requests_a_gpu_when_the_cluster_has_one():
    gpu = invert_resources({"CPU": 16.0, "GPU": 4.0}, "auto", None, memory=5 * 2**30)
    assert gpu == {"device": "cuda", "num_gpus": 1, "num_cpus": 1, "actors": 4, "memory": 5 * 2**30}
    assert invert_resources({"CPU": 16.0, "GPU": 4.0}, "cuda", 2)["actors"] == 2
    cpu = invert_resources({"CPU": 2.0}, "auto", None)
    assert cpu["device"] == "cpu" and cpu["num_gpus"] == 0 and 0 < cpu["num_cpus"] < 1
    assert invert_resources({"CPU": 16.0, "GPU": 4.0}, "cpu", None)["device"] == "cpu"
    # An autoscaling cluster may have no GPU node up yet: --gpus says to wait for them.
    assert invert_resources({"CPU": 2.0}, "cuda", 1)["num_gpus"] == 1
    with pytest.raises(ValueError, match="no GPUs"):
        invert_resources({"CPU": 2.0}, "cuda", None)


def test_precision_fails_fast_where_it_cannot_run():
    with pytest.raises(ValueError, match="needs a GPU"):
        invert_resources({"CPU": 2.0}, "auto", None, precision="fp16")
    with pytest.raises(ValueError, match="needs a GPU"):
        invert_resources({"CPU": 16.0, "GPU": 4.0}, "cpu", None, precision="tf32")
    with pytest.raises(ValueError, match="expected one of"):
        invert_resources({"CPU": 16.0, "GPU": 4.0}, "auto", None, precision="fp8")
    assert invert_resources({"CPU": 2.0}, "auto", None, precision="bf16")["device"] == "cpu"
    assert invert_resources({"CPU": 2.0, "GPU": 1.0}, "auto", None, precision="fp16")["device"] == "cuda"


def test_model_actor_memory_grows_with_the_model_and_the_batch():
    small = model_actor_memory(50 * 2**20, 64, 8, "cpu")
    assert 1.25 * 2**30 < small <= 2 * 2**30 and small % (2**28) == 0
    released_cpu = model_actor_memory(1_200_000_000, 1024, 8, "cpu")
    assert released_cpu > 2 * 1_200_000_000 + 8 * 1024 * 1024 * 512  # weights twice + activations
    # on a GPU the activations live in GPU memory: the host keeps weights, driver and buffers
    assert model_actor_memory(1_200_000_000, 1024, 8, "cuda") < released_cpu
    assert model_actor_memory(1_200_000_000, 1024, 8, "cpu", mix=4) > released_cpu


def test_outputs_resources_scale_with_the_cluster():
    assert outputs_resources({"CPU": 64.0, "GPU": 8.0}) == {"num_cpus": 1, "actors": 32}
    assert outputs_resources({"CPU": 64.0}, actors=5)["actors"] == 5
    assert outputs_resources({"CPU": 2.0}) == {"num_cpus": 0.25, "actors": 1}


def test_model_stage_hands_uint8_images_and_w_plus_to_the_outputs_stage(model_out, aligned):
    """The column contract: no model_input after the model, uint8 images equal to tensor2im of the
    model's own decode, zeros on failed rows, one checkpoint sha per row."""
    assert "model_input" not in model_out and np.array_equal(model_out["aligned"], aligned["aligned"])
    assert model_out["image"].dtype == np.uint8 and model_out["image"].shape == (7, 256, 256, 3)
    assert model_out["w_plus"].dtype == np.float32 and model_out["w_plus"].shape == (7, 8, 512)
    assert not model_out["w_plus"][2:5].any() and not model_out["image"][2:5].any()
    assert len(set(model_out["checkpoint_sha256"])) == 1


def test_a_block_larger_than_the_forward_pass_runs_in_passes(tiny_checkpoint, aligned, model_out):
    """Ray hands the model stage blocks of many rows; it runs them in forward passes of
    `forward_rows` images (what bounds its memory) with the same outputs, row for row."""
    calls = []

    class Counted(InvertFaces):
        def _run_model(self, model_input, rows, n, seeds):
            calls.append(len(rows))
            return super()._run_model(model_input, rows, n, seeds)

    out = Counted(tiny_checkpoint, ModelOptions("ffhq_encode", device="cpu", cpu_threads=2, forward_rows=1))(aligned)
    assert calls == [1, 1]  # the block's two ok rows, one pass each
    assert list(out["status"]) == list(model_out["status"])
    for name, atol in (("w_plus", 1e-4), ("image", 1)):  # uint8 images: a float ulp may round across
        assert out[name].shape == model_out[name].shape
        np.testing.assert_allclose(out[name][:2].astype(np.float32), model_out[name][:2].astype(np.float32), atol=atol)
        assert not out[name][2:].any()


@pytest.mark.parametrize("forward_rows", [None, 1])
def test_a_bad_row_fails_alone_in_the_model_stage(tiny_checkpoint, aligned, model_out, forward_rows):
    """A batch (or forward pass) that fails is retried row by row: only the failing row gets
    invert_error, the others get exactly what the whole batch would have given."""

    class FailsOnRow0(InvertFaces):  # an injected fault (e.g. an OOM caused by one input)
        def _run_model(self, model_input, rows, n, seeds):
            if 0 in rows:
                raise RuntimeError("injected failure")
            return super()._run_model(model_input, rows, n, seeds)

    out = FailsOnRow0(tiny_checkpoint, ModelOptions("ffhq_encode", device="cpu", cpu_threads=2,
                                                    forward_rows=forward_rows))(aligned)
    assert list(out["status"][:2]) == ["invert_error", "ok"]
    assert "inversion failed (RuntimeError: injected failure)" in out["error"][0]
    assert "face_full.png" in out["error"][0]
    np.testing.assert_allclose(out["w_plus"][1], model_out["w_plus"][1], atol=1e-5)
    assert not out["w_plus"][0].any() and out["image"].shape == model_out["image"].shape


def test_bf16_on_cpu_runs_and_stays_close_to_fp32(tiny_checkpoint, aligned, model_out):
    """--precision bf16 is autocast arithmetic: not the original's bytes, but close to them."""
    from psp_core.metrics import psnr

    out = InvertFaces(tiny_checkpoint, ModelOptions("ffhq_encode", device="cpu", cpu_threads=2, precision="bf16"))(aligned)
    assert list(out["status"]) == list(model_out["status"])
    ok = [0, 1]
    dw = np.abs(out["w_plus"][ok] - model_out["w_plus"][ok]).max()
    assert 0 < dw < 0.1
    assert out["w_plus"].dtype == np.float32 and out["image"].dtype == np.uint8
    assert min(psnr(out["image"][ok], model_out["image"][ok])) > 35


def test_model_blocks_are_large_where_rows_are_cheap_and_passes_stay_the_batch_size(tiny_checkpoint, tmp_path):
    """The model and outputs stages take blocks of at least 32 rows, 512 without detection (Ray's
    cost per call is spread over them), while the model's forward passes, what bounds its memory,
    stay --batch-size."""
    from pipelines.config import InvertConfig, resolve_config
    from pipelines.dataflow import stage_options

    def stages(device, **kw):
        config = InvertConfig(input=str(tmp_path), output=str(tmp_path / "out"), checkpoint=tiny_checkpoint, **kw)
        return stage_options(resolve_config(config), device)

    s = stages("cpu", align="none")
    assert (s.read_rows, s.align_rows, s.model_rows, s.model.forward_rows) == (512, 512, 512, 8)
    s = stages("cpu", align="none", batch_size=3)
    assert (s.model_rows, s.model.forward_rows) == (513, 3)
    # blocks stay near Ray's 128 MiB target: a kept 256 px crop per row shrinks the align blocks
    # (model input + crop), generated images the model's (W+ of 8 styles + image + crop)
    s = stages("cpu", align="none", save_aligned=True, images="png")
    assert s.align_rows == 128 * 2**20 // (2 * 256 * 256 * 3) == 341
    assert s.model_rows == 328 and 128 * 2**20 // (8 * 2048 + 2 * 256 * 256 * 3) == 327
    s = stages("cuda", align="dlib")
    assert (s.align_rows, s.model_rows, s.model.forward_rows) == (4, 32, 32)
    s = stages("cpu", align="dlib")
    assert (s.align_rows, s.model_rows, s.model.forward_rows) == (4, 32, 8)
    # a small run: at least 8 blocks, so its stages overlap and its first files land early
    s = stage_options(resolve_config(InvertConfig(input=str(tmp_path), output=str(tmp_path / "o"), align="none",
                                                  checkpoint=tiny_checkpoint, batch_size=2)), "cpu", rows=24)
    assert (s.read_rows, s.align_rows, s.model_rows) == (3, 3, 4)
    assert stage_options(resolve_config(InvertConfig(input=str(tmp_path), output=str(tmp_path / "o"),
                                                     checkpoint=tiny_checkpoint)), "cpu", rows=6).model_rows == 8
