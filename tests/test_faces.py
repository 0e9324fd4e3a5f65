"""One row per face (`--faces all`): the align stage's explode, the row keys, the table keeping one
row per (input, face) across reruns, adoption and nightly runs. Unit tests without Ray; one slow
end-to-end test on a real local Ray cluster."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from schemas import image_id_for
from schemas import outputs as so
from schemas.ids import face_image_id

N_STYLES = 8


def group_photo(scales=(1.0, 0.8, 0.6)) -> Image.Image:
    """Astronaut face crops pasted side by side on a gray canvas: one face per scale. dlib's boxes
    for (1.0, 0.8, 0.6) are about 90, 76 and 53 px (the last is under the default --min-face)."""
    from skimage import data

    face = Image.fromarray(data.astronaut()).crop((90, 0, 360, 270))
    tiles = [face.resize((int(270 * s), int(270 * s)), Image.Resampling.LANCZOS) for s in scales]
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + 20 * (len(tiles) + 1), max(t.height for t in tiles) + 40),
                       (128, 128, 128))
    x = 20
    for t in tiles:
        canvas.paste(t, (x, 20))
        x += t.width + 20
    return canvas


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def read_batch(named_blobs):
    from pipelines.read import object_column

    n = len(named_blobs)
    return {
        "source_uri": object_column([f"mem://{name}" for name, _ in named_blobs]),
        "data": object_column([blob for _, blob in named_blobs]),
        "source_sha256": object_column(["x" * 64] * n),
        "status": object_column(["ok"] * n),
        "error": object_column([""] * n),
    }


# -- the align stage ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blobs():
    from jobs.demo import sample_files

    files = {name: blob for name, blob, _ in sample_files(1)}
    return [("group.png", png(group_photo())), ("bad_no_face.jpg", files["bad_no_face.jpg"]),
            ("bad_text.jpg", files["bad_text.jpg"]), ("face_full.jpg", files["face_full.jpg"])]


def test_align_all_explodes_one_row_per_face_best_first(blobs):
    from pipelines.align import AlignFaces
    from psp_core.align import FaceAligner

    out = AlignFaces(mode="dlib", task="ffhq_encode", faces="all", min_face=0)(read_batch(blobs))
    uris = list(out["source_uri"])
    # (the astronaut photo has a second, weak detection: a 90 px box at score 0.13 on the suit)
    assert uris == ["mem://group.png"] * 3 + ["mem://bad_no_face.jpg", "mem://bad_text.jpg"] + ["mem://face_full.jpg"] * 2
    assert list(out["status"]) == ["ok"] * 3 + ["no_face", "decode_error", "ok", "ok"]
    assert list(out["face_index"]) == [0, 1, 2, -1, -1, 0, 1]
    assert list(out["face_count"]) == [3, 3, 3, -1, -1, 2, 2]
    assert list(out["source_sha256"]) == ["x" * 64] * 7 and list(out["source_width"][:3]) == [group_photo().width] * 3
    assert out["face_score"][0] > out["face_score"][1] > out["face_score"][2]
    boxes = out["face_box"]
    assert len({tuple(b) for b in boxes[:3]}) == 3 and np.isnan(boxes[3:5]).all()
    # each face row is that face's FFHQ crop (and its prepared model input)
    direct = FaceAligner(output_size=256, select="all")(np.asarray(group_photo()))
    for k in range(3):
        np.testing.assert_array_equal(out["aligned"][k], np.asarray(direct[k].image))
        np.testing.assert_array_equal(boxes[k], direct[k].box)
    assert out["model_input"].shape[0] == 7 and out["model_input"][:3].any(axis=(1, 2, 3)).all()


def test_align_all_keeps_faces_of_min_face_px_and_best_is_todays_row(blobs):
    from pipelines.align import AlignFaces

    group = read_batch(blobs[:1])
    out = AlignFaces(mode="dlib", faces="all")(group)  # default --min-face 64: the 53 px face goes
    assert list(out["face_index"]) == [0, 1] and list(out["face_count"]) == [2, 2]
    tiny = AlignFaces(mode="dlib", faces="all", min_face=200)(read_batch(blobs[:1]))
    assert list(tiny["status"]) == ["no_face"] and "smaller than the minimum face size 200 px" in tiny["error"][0]
    best = AlignFaces(mode="dlib")(read_batch(blobs[:1]))  # the default: one row, the best face
    assert list(best["face_index"]) == [0] and list(best["face_count"]) == [1]
    np.testing.assert_array_equal(best["aligned"][0], out["aligned"][0])
    largest = AlignFaces(mode="dlib", faces="largest")(read_batch(blobs[:1]))
    assert largest["face_box"][0][2] - largest["face_box"][0][0] > best["face_box"][0][2] - best["face_box"][0][0]


def test_each_face_row_has_its_own_mix_seed(blobs, tiny_checkpoint):
    """--mix with --faces all: the styles mixed into face 1 are not face 0's (seeds per row key)."""
    from pipelines.align import AlignFaces
    from pipelines.model import InvertFaces, ModelOptions

    out = AlignFaces(mode="dlib", task="ffhq_encode", faces="all")(read_batch(blobs[:1]))
    mixed = InvertFaces(tiny_checkpoint, ModelOptions("ffhq_encode", device="cpu", cpu_threads=2, images="none",
                                                        mix=1, latent_mask=[6, 7], seed=3))(out)["mix_w_plus"]  # [2 faces, 1 mix, 8, 512]
    assert mixed.shape[:2] == (2, 1)
    assert not np.allclose(mixed[0, 0, 6:], mixed[1, 0, 6:])


def test_faces_all_needs_dlib_alignment(tiny_checkpoint, tmp_path):
    from pipelines.config import ConfigError, InvertConfig, resolve_config

    config = InvertConfig(input=str(tmp_path), output=str(tmp_path / "out"), checkpoint=tiny_checkpoint,
                          faces="all", align="none")
    with pytest.raises(ConfigError, match="--faces all.*--align dlib"):
        resolve_config(config)
    with pytest.raises(ConfigError, match="--faces"):
        resolve_config(InvertConfig(input=str(tmp_path), output=str(tmp_path / "o"), checkpoint=tiny_checkpoint,
                                    faces="every"))


# -- keys --------------------------------------------------------------------------------------

def test_face_rows_keys_face_zero_keeps_the_input_key():
    uri = "s3://b/group.jpg"
    assert face_image_id(uri, 0) == face_image_id(uri, None) == image_id_for(uri)
    keys = {face_image_id(uri, k) for k in range(5)}
    assert len(keys) == 5 and face_image_id("s3://b/other.jpg", 1) not in keys
    table = so.columns_to_table({"source_uri": [uri] * 3 + ["s3://b/x.jpg"], "status": ["ok"] * 3 + ["no_face"],
                                 "face_index": [0, 1, 2, -1], "run_id": ["r"] * 4}, N_STYLES)
    assert table["image_id"].to_pylist() == [face_image_id(uri, k) for k in range(3)] + [image_id_for("s3://b/x.jpg")]
    assert table["source_id"].to_pylist() == [image_id_for(uri)] * 3 + [image_id_for("s3://b/x.jpg")]
    assert table["face_index"].to_pylist() == [0, 1, 2, None]


# -- the table: one row per (input, face) ------------------------------------------------------

def face_rows(uri, n, run_id, etag="e1"):
    rng = np.random.default_rng(n)
    return [{"source_uri": uri, "status": "ok", "face_index": k, "face_count": n, "run_id": run_id,
             "source_size": 100, "source_etag": etag, "checkpoint_sha256": "ab" * 32,
             "face_box": np.arange(4, dtype=np.float32) + k,
             "w_plus": rng.standard_normal((N_STYLES, 512)).astype(np.float32)} for k in range(n)]


def stage(table, run_id, rows, name="part-0.parquet"):
    from pipelines.writer import WrittenRun

    data = so.rows_to_table(rows, N_STYLES)
    written = WrittenRun(run_id)
    written.extend([table.write_file(f"runs/{run_id}/{name}", data)], data["image_id"], data["status"])
    return written


def rows_by_input(out):
    import schemas

    t = schemas.read_outputs(out, columns=["image_id", "source_id", "source_uri", "face_index", "run_id"])
    assert len(set(t["image_id"].to_pylist())) == t.num_rows
    got: dict[str, list] = {}
    for r in t.to_pylist():
        assert r["source_id"] == image_id_for(r["source_uri"])
        got.setdefault(r["source_uri"], []).append((r["face_index"], r["run_id"]))
    return {k: sorted(v) for k, v in got.items()}


def test_fewer_faces_replace_all_old_face_rows_and_deletion_removes_them_all(tmp_path):
    from pipelines.commit import commit_run
    from pipelines.table import OutputTable

    out = str(tmp_path / "out")
    table = OutputTable(out)
    v = table.ensure(N_STYLES).version()
    first = stage(table, "r1", face_rows("/p/group.jpg", 3, "r1") + face_rows("/p/solo.jpg", 1, "r1")
                  + face_rows("/p/pair.jpg", 2, "r1"))
    v = commit_run(table, first, N_STYLES, {"run_id": "r1"}, v).version
    assert rows_by_input(out) == {"/p/group.jpg": [(0, "r1"), (1, "r1"), (2, "r1")], "/p/solo.jpg": [(0, "r1")],
                                  "/p/pair.jpg": [(0, "r1"), (1, "r1")]}
    # group.jpg now has one face; pair.jpg is deleted: no face row of either outlives the commit
    second = stage(table, "r2", face_rows("/p/group.jpg", 1, "r2", etag="e2"))
    res = commit_run(table, second, N_STYLES, {"run_id": "r2"}, v, remove_ids=[image_id_for("/p/pair.jpg")])
    assert res.removed == 5
    assert rows_by_input(out) == {"/p/group.jpg": [(0, "r2")], "/p/solo.jpg": [(0, "r1")]}


def test_adoption_takes_an_input_only_with_all_its_face_rows(tmp_path):
    from pipelines.adoption import adoptable_rows, wanted_facts
    from pipelines.listing import items_table
    from pipelines.table import OutputTable

    out = str(tmp_path / "out")
    table = OutputTable(out)
    dt = table.ensure(N_STYLES)
    split = face_rows("/p/split.jpg", 3, "crashed")
    torn = face_rows("/p/torn.jpg", 3, "crashed")
    stage(table, "crashed", split[:2] + torn[:2], "part-0.parquet")  # one input across two files
    stage(table, "crashed", split[2:], "part-1.parquet")  # torn.jpg's third face was never written

    class Item:
        def __init__(self, uri):
            self.source_uri, self.size, self.etag, self.mtime = uri, 100, "e1", None

    wanted = wanted_facts(items_table([Item("/p/split.jpg"), Item("/p/torn.jpg")]))
    adopted = adoptable_rows(table, dt, wanted, "ab" * 32, retry_failed=False, exclude_run="rerun")
    assert sorted(adopted.ids.to_pylist()) == sorted(face_image_id("/p/split.jpg", k) for k in range(3))


# -- end to end (Ray) --------------------------------------------------------------------------

@pytest.mark.slow
def test_invert_faces_all_rerun_and_nightly_keep_one_row_per_input_and_face(ray_cluster, tiny_checkpoint, tmp_path):
    import torch

    import schemas
    from jobs.demo import make_sample_inputs
    from pipelines.align import DEFAULT_MIN_FACE, box_side
    from pipelines.config import InvertConfig
    from pipelines.run import run_invert, run_nightly
    from psp_core import load_psp
    from psp_core.align import FaceAligner
    from psp_core.tasks import get_task

    folder = tmp_path / "photos"
    samples = make_sample_inputs(folder, n_good=1)  # the astronaut + 4 broken/no-face inputs
    group = folder / "group.png"
    group.write_bytes(png(group_photo()))
    out = str(tmp_path / "out")
    config = InvertConfig(input=str(folder), output=out, checkpoint=tiny_checkpoint, faces="all")
    summary = run_invert(config)
    table = schemas.read_outputs(out)
    rows = table.select(["image_id", "source_uri", "status", "face_index", "face_count", "face_box"]).to_pylist()
    by_uri: dict[str, list] = {}
    for r in rows:
        by_uri.setdefault(r["source_uri"], []).append(r)
    assert len(by_uri) == len(samples) + 1 == summary.processed
    faces = sorted(by_uri.pop(f"file://{group}" if f"file://{group}" in by_uri else str(group)),
                   key=lambda r: r["face_index"])
    assert [(r["face_index"], r["face_count"], r["status"]) for r in faces] == [(0, 2, "ok"), (1, 2, "ok")]
    assert faces[0]["face_box"] != faces[1]["face_box"]
    failed = [v for v in by_uri.values() if v[0]["status"] != "ok"]
    assert len(failed) == len(samples) - 1  # every broken / no-face demo input: one image-level row
    assert all(len(v) == 1 and v[0]["face_index"] is None for v in failed)
    assert {v[0]["status"] for v in failed} == {"decode_error", "no_face"}

    # W+ of each face row == a direct encode of that face's aligned crop (the faces of at least the
    # default --min-face, best score first: the 53 px face is not a row)
    ids, w = schemas.read_latents(out)
    crops = [c for c in FaceAligner(output_size=256, select="all")(group.read_bytes())
             if box_side(c.box) >= DEFAULT_MIN_FACE]
    assert [list(c.box) for c in crops] == [r["face_box"] for r in faces]
    model = load_psp(tiny_checkpoint)
    with torch.inference_mode():
        for r in faces:
            x = get_task("ffhq_encode").transform(crops[r["face_index"]].image)[None]
            np.testing.assert_allclose(w[ids.index(r["image_id"])], model.encode(x)[0].numpy(), atol=1e-4)

    again = run_invert(config)  # a rerun adds nothing
    assert (again.processed, again.version) == (0, None)
    assert schemas.read_outputs(out, columns=["image_id"]).num_rows == table.num_rows

    # nightly: the group photo becomes a single-face photo -> exactly one row for it
    group.write_bytes(png(group_photo((1.0,))))
    import os
    os.utime(group, (1e9, 1e9))
    result = run_nightly(config)
    assert result.plan.changed == [faces[0]["source_uri"]] and result.committed
    after = schemas.read_outputs(out, columns=["source_uri", "face_index", "face_count", "status"]).to_pylist()
    mine = [r for r in after if r["source_uri"] == faces[0]["source_uri"]]
    assert [(r["face_index"], r["face_count"], r["status"]) for r in mine] == [(0, 1, "ok")]
    assert len(after) == table.num_rows - 1
