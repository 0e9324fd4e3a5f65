"""e4e and ReStyle end to end on a real local Ray cluster: S3 (moto over HTTP) in, one Delta table
per run out. One test, two runs (Ray runs are slow): an e4e checkpoint with dlib alignment, and a
ReStyle (e4e flavour, ResNet-34) checkpoint with --align none, --n-iters 3 and --keep-iterations."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.demo import sample_files
from pipelines.config import InvertConfig
from pipelines.run import run_invert
from psp_core import load_psp
from psp_core.tasks import get_task
from schemas import image_id_for, read_latents, read_outputs, tensor_shapes

pytestmark = pytest.mark.slow

NAMES = ("face_full.png", "face_crop_wide.jpg", "bad_text.jpg")


@pytest.mark.tier2
def test_e4e_and_restyle_runs_from_s3_record_family_iterations_and_equal_direct_encode(
    ray_cluster, s3_server, tmp_path
):
    from psp_core.align import FaceAligner
    from psp_core.testing import random_e4e_checkpoint, random_restyle_checkpoint

    bucket = s3_server.make_bucket("fam")
    client = s3_server.client()
    blobs = {name: blob for name, blob, _ in sample_files(20) if name in NAMES}
    for name in NAMES:
        client.put_object(Bucket=bucket, Key=f"raw/{name}", Body=blobs[name])
    e4e = random_e4e_checkpoint(str(tmp_path / "e4e.pt"), output_size=32, seed=2)
    restyle = random_restyle_checkpoint(str(tmp_path / "restyle.pt"), output_size=32,
                                        encoder_type="ResNetProgressiveBackboneEncoder", seed=2)
    so = s3_server.storage_options
    common = {"input": f"s3://{bucket}/raw/", "storage_options": so, "batch_size": 4}
    e4e_run = run_invert(InvertConfig(output=f"s3://{bucket}/e4e/", checkpoint=e4e, **common))
    restyle_run = run_invert(InvertConfig(output=f"s3://{bucket}/restyle/", checkpoint=restyle, align="none",
                                          n_iters=3, keep_iterations=True, **common))
    assert e4e_run.counts == restyle_run.counts == {"ok": 2, "decode_error": 1}
    assert (e4e_run.model_family, e4e_run.n_iters, restyle_run.model_family, restyle_run.n_iters) == (
        "e4e", 1, "restyle_e4e", 3)  # also in the run summary (_runs/<run_id>.json, the commit)
    uri = {name: f"s3://{bucket}/raw/{name}" for name in NAMES}
    task = get_task("ffhq_encode")

    # e4e: W+ of the aligned crop as e4e's encoder gives it; one pass; no iterations kept.
    table = read_outputs(f"s3://{bucket}/e4e/", so)
    rows = {r["source_uri"]: r for r in table.select(["source_uri", "status", "model_family", "n_iters",
                                                       "iteration_w_plus"]).to_pylist()}
    assert {(r["model_family"], r["n_iters"]) for r in rows.values()} == {("e4e", 1)}
    assert all(r["iteration_w_plus"] is None for r in rows.values())
    ids, w_plus = read_latents(f"s3://{bucket}/e4e/", so)
    crop = FaceAligner(output_size=256)(blobs["face_full.png"]).image
    with torch.inference_mode():
        direct = load_psp(e4e).encode(task.transform(crop)[None])[0].numpy()
    np.testing.assert_allclose(w_plus[ids.index(image_id_for(uri["face_full.png"]))], direct, atol=1e-4)

    # ReStyle: every iteration's W+ equals encode_iterations, the last one is w_plus.
    table = read_outputs(f"s3://{bucket}/restyle/", so)
    assert tensor_shapes(table.schema)["iteration_w_plus"] == [-1, 8, 512]
    rows = {r["source_uri"]: r for r in table.to_pylist()}
    assert {(r["model_family"], r["n_iters"]) for r in rows.values()} == {("restyle_e4e", 3)}
    bad = rows[uri["bad_text.jpg"]]
    assert bad["status"] == "decode_error" and bad["w_plus"] is None and bad["iteration_w_plus"] is None
    model = load_psp(restyle, n_iters=3)
    for name in NAMES[:2]:
        row = rows[uri[name]]
        photo = Image.open(io.BytesIO(blobs[name])).convert("RGB")
        with torch.inference_mode():
            direct = torch.stack(model.encode_iterations(task.transform(photo)[None]), dim=1)[0].numpy()
        got = np.asarray(row["iteration_w_plus"], np.float32).reshape(-1, 8, 512)
        assert got.shape == (3, 8, 512)
        np.testing.assert_allclose(got, direct, atol=1e-4)
        np.testing.assert_allclose(np.asarray(row["w_plus"]).reshape(8, 512), direct[-1], atol=1e-4)
        assert Image.open(io.BytesIO(row["output_image"])).size == (256, 256)
