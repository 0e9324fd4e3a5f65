"""e4e and ReStyle checkpoints in the stages (no Ray): non-square car inputs through the align stage,
ReStyle's refinement in the model stage (--n-iters, --keep-iterations), the family columns."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.align import AlignFaces
from pipelines.model import InvertFaces, ModelOptions
from pipelines.outputs import EncodeOutputs
from psp_core import load_psp
from psp_core.tasks import get_task


def _batch(images: list[Image.Image]) -> dict[str, np.ndarray]:
    """What the read stage hands on for in-memory PNGs."""
    n = len(images)

    def obj(values):
        out = np.empty(n, dtype=object)
        out[:] = values
        return out

    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return {
        "source_uri": obj([f"mem://car{i}.png" for i in range(n)]),
        "data": obj(blobs),
        "source_sha256": obj(["x" * 64] * n),
        "status": obj(["ok"] * n),
        "error": obj([""] * n),
    }


@pytest.fixture(scope="module")
def cars(astronaut):
    """Two photos of other shapes than 256x256 and one unreadable input."""
    batch = _batch([astronaut.resize((300, 200)), astronaut.crop((0, 0, 512, 400))])
    for k in batch:
        batch[k] = np.append(batch[k], np.array([b"" if k == "data" else "mem://bad.png" if k == "source_uri"
                                                 else batch[k][0]], dtype=object))
    return batch


@pytest.fixture(scope="module")
def restyle_cars(tmp_path_factory) -> str:
    from psp_core.testing import random_restyle_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "restyle_cars.pt"
    return random_restyle_checkpoint(str(path), output_size=64, encoder_type="ResNetBackboneEncoder",
                                     dataset_type="cars_encode", seed=3)


def test_align_none_prepares_car_inputs_from_the_photo(cars, astronaut):
    """--align none with a 192x256 task: model_input is the task transform of the photo itself."""
    task = get_task("cars_encode")
    out = AlignFaces(mode="none", task="cars_encode", keep_aligned=False)(cars)
    assert out["model_input"].shape == (3, 192, 256, 3) and out["model_input"].dtype == np.uint8
    assert list(out["status"]) == ["ok", "ok", "decode_error"]
    expected = task.transform(astronaut.resize((300, 200)))
    got = task.to_model_input(torch.from_numpy(out["model_input"][:1]))[0]
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def restyle_cars_direct(cars, restyle_cars):
    """(align-none batch, ReStyle's own encode_iterations of its two photos [2, 3, 10, 512]):
    computed once, both image sizes compare against it."""
    aligned = AlignFaces(mode="none", task="cars_encode", keep_aligned=False)(cars)
    model = load_psp(restyle_cars, n_iters=3)
    x = get_task("cars_encode").to_model_input(torch.from_numpy(aligned["model_input"][:2]))
    with torch.inference_mode():
        return aligned, torch.stack(model.encode_iterations(x), dim=1).numpy()


@pytest.mark.parametrize("image_size", ["256", "full"])
def test_restyle_cars_rows_keep_every_iteration(restyle_cars_direct, restyle_cars, image_size):
    """ReStyle on cars: W+ and every iteration's W+ as ReStyle's own encode_iterations, the car rows
    of the reconstruction (3/4 as high as wide), the family columns on every row."""
    aligned, direct = restyle_cars_direct
    stage = InvertFaces(restyle_cars, ModelOptions("cars_encode", device="cpu", cpu_threads=2, image_size=image_size,
                                                     n_iters=3, keep_iterations=True))
    out = stage(aligned)
    side = 256 if image_size == "256" else 64
    assert out["image"].shape == (3, side * 3 // 4, side, 3)
    assert out["iteration_w_plus"].shape == (3, 3, 10, 512)
    np.testing.assert_allclose(out["iteration_w_plus"][:2], direct, atol=1e-4)
    np.testing.assert_allclose(out["w_plus"][:2], direct[:, -1], atol=1e-4)

    table = EncodeOutputs("cars_encode", run_id="r", n_styles=10)(out)
    rows = table.to_pylist()
    assert [r["model_family"] for r in rows] == ["restyle_psp"] * 3 and [r["n_iters"] for r in rows] == [3] * 3
    assert rows[2]["iteration_w_plus"] is None and rows[2]["status"] == "decode_error"
    np.testing.assert_allclose(np.asarray(rows[1]["iteration_w_plus"]).reshape(3, 10, 512), direct[1], atol=1e-4)
    img = Image.open(io.BytesIO(rows[0]["output_image"]))
    assert img.size == (side, side * 3 // 4)


def test_e4e_rows_and_n_iters_refused(tmp_path, cars):
    from psp_core.testing import random_e4e_checkpoint

    path = random_e4e_checkpoint(str(tmp_path / "e4e.pt"), output_size=32, seed=1)
    with pytest.raises(ValueError, match="only apply to ReStyle"):
        InvertFaces(path, ModelOptions("ffhq_encode", device="cpu", keep_iterations=True))
    aligned = AlignFaces(mode="none", task="ffhq_encode", keep_aligned=False)(cars)
    out = InvertFaces(path, ModelOptions("ffhq_encode", device="cpu", cpu_threads=2))(aligned)
    assert "iteration_w_plus" not in out and out["image"].shape == (3, 256, 256, 3)
    rows = EncodeOutputs("ffhq_encode", run_id="r", n_styles=8)(out).to_pylist()
    assert {(r["model_family"], r["n_iters"]) for r in rows} == {("e4e", 1)}
    x = get_task("ffhq_encode").to_model_input(torch.from_numpy(aligned["model_input"][:1]))
    with torch.inference_mode():
        direct = load_psp(path).encode(x)[0].numpy()
    np.testing.assert_allclose(np.asarray(rows[0]["w_plus"]).reshape(8, 512), direct, atol=1e-4)
