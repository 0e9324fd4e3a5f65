"""The stages as plain callables on batch dicts (no Ray): decode, align, invert, and the invert
stage's resource decision."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from jobs.demo import sample_files
from pipelines.align import AlignFaces
from pipelines.invert import InvertFaces, invert_resources


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
    return AlignFaces(mode="dlib")(batch)


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
    return InvertFaces(tiny_checkpoint, "ffhq_encode", run_id="test-run", device="cpu", cpu_threads=2)


@pytest.fixture(scope="module")
def inverted(inverter, aligned):
    return inverter(aligned)


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


def test_invert_mix_is_per_row_seeded_and_full_size_jpeg(tiny_checkpoint, aligned):
    """--mix: one row per input with N mixes; a row's mixes do not depend on its batch."""
    stage = InvertFaces(
        tiny_checkpoint, "ffhq_encode", run_id="mix", device="cpu", images="jpeg", image_size="full",
        mix=2, latent_mask=[4, 5, 6, 7], seed=7, metrics=True,
    )
    both = stage(aligned).to_pylist()  # rows 0 and 1 in one batch
    alone = stage({k: v[1:2] for k, v in aligned.items()}).to_pylist()
    assert len(both[1]["mix_w_plus"]) == 2 and len(both[1]["mix_images"]) == 2
    np.testing.assert_allclose(both[1]["mix_w_plus"], alone[0]["mix_w_plus"], atol=1e-5)
    assert not np.allclose(both[0]["mix_w_plus"][0], both[0]["mix_w_plus"][1])
    img = Image.open(io.BytesIO(both[1]["output_image"]))
    assert (img.format, img.size, both[1]["image_format"]) == ("JPEG", (32, 32), "jpeg")
    assert both[1]["psnr"] is not None and both[1]["ssim"] is not None and both[2]["psnr"] is None


def test_invert_resources_requests_a_gpu_when_the_cluster_has_one():
    gpu = invert_resources({"CPU": 16.0, "GPU": 4.0}, "auto", None)
    assert gpu == {"device": "cuda", "num_gpus": 1, "num_cpus": 1, "actors": 4}
    assert invert_resources({"CPU": 16.0, "GPU": 4.0}, "cuda", 2)["actors"] == 2
    cpu = invert_resources({"CPU": 2.0}, "auto", None)
    assert cpu["device"] == "cpu" and cpu["num_gpus"] == 0 and 0 < cpu["num_cpus"] < 1
    assert invert_resources({"CPU": 16.0, "GPU": 4.0}, "cpu", None)["device"] == "cpu"
    # An autoscaling cluster may have no GPU node up yet: --gpus says to wait for them.
    assert invert_resources({"CPU": 2.0}, "cuda", 1)["num_gpus"] == 1
    with pytest.raises(ValueError, match="no GPUs"):
        invert_resources({"CPU": 2.0}, "cuda", None)
