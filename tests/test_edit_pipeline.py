"""`psp edit` / `psp direction`: the stages without Ray, one end-to-end run on Ray, fail-fast errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from deltalake import write_deltalake
from output_tables import commit_table
from PIL import Image

import schemas
from schemas.testing import example_rows

N_STYLES = 8


def _write_table(folder, n_ok=3, n_err=1, seed=0) -> np.ndarray:
    """A psp output table (Delta) whose ok rows hold W+ near a plausible range."""

    rows = example_rows(n_ok=n_ok, n_err=n_err, n_styles=N_STYLES, seed=seed)
    for r in rows:
        if r.get("w_plus") is not None:
            r["w_plus"] = (r["w_plus"] * 0.3).astype(np.float32)
    commit_table(folder, schemas.rows_to_table(rows, N_STYLES), N_STYLES)
    return np.stack([r["w_plus"] for r in rows if r.get("w_plus") is not None])


@pytest.fixture()
def direction_file(tmp_path):
    d = torch.randn(1, 512, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "smile.pt"
    torch.save(d, path)
    return path, d[0].numpy()


def test_edit_stage_images_equal_a_direct_decode(tiny_checkpoint, direction_file):
    from pipelines.edit import EditLatents, EncodeEditImages, expand_strengths
    from psp_core import load_psp
    from psp_core.editing import load_direction
    from psp_core.tasks import tensor2im

    path, d = direction_file
    w = np.random.default_rng(1).standard_normal((2, N_STYLES, 512)).astype(np.float32) * 0.3
    batch = {"image_id": np.array(["a", "b"], dtype=object), "source_uri": np.array(["s3://x/a", "s3://x/b"], dtype=object),
             "w_plus": w.reshape(2, -1)}  # flat, as a fixed-size list column arrives
    strengths = [-3.0, 0.0, 2.5]
    expanded = expand_strengths(batch, strengths, N_STYLES)
    assert list(expanded["image_id"]) == ["a"] * 3 + ["b"] * 3
    stage = EditLatents(tiny_checkpoint, load_direction(path), device="cpu", cpu_threads=1)
    out = stage(expanded)
    s = np.tile(np.float32(strengths), 2)[:, None, None]
    want_w = np.repeat(w, 3, axis=0) + s * d.astype(np.float32)
    np.testing.assert_array_equal(out["w_plus"], want_w)  # exactly w + s * direction
    net = load_psp(tiny_checkpoint)
    with torch.inference_mode():
        direct = net.decode(torch.from_numpy(want_w))
    assert out["image"].dtype == np.uint8 and out["image"].shape == (6, 256, 256, 3)
    for i in range(6):
        np.testing.assert_array_equal(out["image"][i], tensor2im(direct[i]))  # equal to a direct decode
    assert len({out["image"][i].tobytes() for i in range(3)}) == 3  # the strengths do change the image
    assert list(out["status"]) == ["ok"] * 6 and list(out["direction"]) == ["smile"] * 6

    table = EncodeEditImages("run-1", N_STYLES, "png")(out)
    assert table.schema.equals(schemas.edits_schema(N_STYLES), check_metadata=True)
    assert table.num_rows == 6 and len(set(table["edit_id"].to_pylist())) == 6
    png = Image.open(io.BytesIO(table["image"][4].as_py()))
    np.testing.assert_array_equal(np.asarray(png), out["image"][4])
    np.testing.assert_array_equal(schemas.edits_w_plus_to_numpy(table), want_w)


def test_read_edits_keeps_the_latest_row_per_edit(tmp_path):
    import datetime as dt

    from schemas.edits import edit_columns_to_table

    def batch(strength_shift, when):
        return edit_columns_to_table({
            "image_id": ["a", "a"], "source_uri": ["u", "u"], "direction": ["age", "age"],
            "strength": [-1.0, 1.0], "status": ["ok", "ok"], "run_id": [when.isoformat()] * 2,
            "w_plus": np.full((2, N_STYLES, 512), strength_shift, np.float32), "processed_at": [when] * 2,
        }, N_STYLES)

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    write_deltalake(str(tmp_path / "e"), batch(2.0, t0 + dt.timedelta(days=1)))  # the rerun, written first
    write_deltalake(str(tmp_path / "e"), batch(1.0, t0), mode="append")
    table = schemas.read_edits(str(tmp_path / "e"))
    assert table.num_rows == 2 and set(table["run_id"].to_pylist()) == {(t0 + dt.timedelta(days=1)).isoformat()}
    assert (schemas.edits_w_plus_to_numpy(table) == 2.0).all()
    light = schemas.read_edits(str(tmp_path / "e"), columns=["strength", "status"])
    assert light.column_names == ["strength", "status"] and light.num_rows == 2
    with pytest.raises(ValueError, match="unknown edit column"):
        schemas.read_edits(str(tmp_path / "e"), columns=["nope"])


def test_direction_cli_fits_from_labels(tmp_path, direction_file):
    from jobs.cli import main
    from psp_core.editing import load_direction

    rng = np.random.default_rng(3)
    planted = rng.standard_normal(512)
    planted /= np.linalg.norm(planted)

    rows = example_rows(n_ok=40, n_err=1, n_styles=N_STYLES, seed=3)
    labels = []
    for k, r in enumerate(rows):
        if r.get("w_plus") is None:
            continue
        y = k % 3 == 0
        r["w_plus"] = (r["w_plus"] * 0.2 + (1.5 if y else -1.5) * planted).astype(np.float32)
        labels.append((schemas.image_id_for(r["source_uri"]), "true" if y else "false"))
    commit_table(tmp_path / "out", schemas.rows_to_table(rows, N_STYLES), N_STYLES)
    csv = tmp_path / "labels.csv"
    csv.write_text("image_id,smiling\n" + "\n".join(f"{i},{y}" for i, y in labels) + "\nnot-an-id,true\n")
    for method, shared, shape in (("logistic", False, (N_STYLES, 512)), ("mean_difference", True, (512,))):
        out = tmp_path / f"{method}.npy"
        argv = ["direction", str(tmp_path / "out"), "--labels", str(csv), "--label", "smiling", "-o", str(out),
                "--method", method] + (["--shared"] if shared else [])
        assert main(argv) == 0
        d = np.load(out)
        assert d.shape == shape and abs(np.linalg.norm(d) - 1) < 1e-5
        per_style = d.reshape(-1, 512)
        target = np.tile(planted, (len(per_style), 1)) / np.sqrt(len(per_style))  # unit, same offset per style
        assert float((per_style * target).sum()) > 0.8  # 40 noisy rows: close to the planted direction
        assert load_direction(out).kind == "linear"  # what psp direction writes, psp edit reads
    assert main(["direction", str(tmp_path / "out"), "--labels", str(csv), "--label", "missing", "-o",
                 str(tmp_path / "x.npy")]) == 2


def test_edit_fails_fast_before_ray(tmp_path, tiny_checkpoint, direction_file, capsys, monkeypatch):
    from jobs.cli import main
    from psp_core.testing import random_stylegan2_checkpoint

    _write_table(tmp_path / "out")
    path, _ = direction_file
    big = random_stylegan2_checkpoint(tmp_path / "g64.pt", size=64, seed=1)
    cases = [
        (["--generator", big, "--direction", str(path)], "10 styles"),
        (["--generator", tiny_checkpoint, "--direction", str(tmp_path / "nope.pt")], "--direction"),
        (["--generator", tiny_checkpoint, "--direction", str(path), "--strengths", "a,b"], "--strengths"),
        (["--generator", tiny_checkpoint, "--direction", str(path), "--ganspace-edit", "1,2,3"], "drop --ganspace-edit"),
    ]
    def no_ray():  # whether or not this session's cluster is up, these runs must not reach Ray
        raise AssertionError("psp edit started Ray work before refusing its options")

    monkeypatch.setattr("pipelines.dataflow.ensure_ray", no_ray)
    for extra, message in cases:
        assert main(["edit", str(tmp_path / "out"), str(tmp_path / "edits"), *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_psp_edit_end_to_end_on_ray(ray_cluster, tmp_path, tiny_checkpoint, direction_file):
    from jobs.cli import main
    from psp_core import load_psp
    from psp_core.tasks import tensor2im

    w = _write_table(tmp_path / "out", n_ok=3, n_err=1)
    ids = [schemas.image_id_for(r["source_uri"]) for r in example_rows(n_ok=3, n_err=0, n_styles=N_STYLES)]
    path, d = direction_file
    argv = ["edit", str(tmp_path / "out"), str(tmp_path / "edits"), "--generator", tiny_checkpoint,
            "--direction", str(path), "--strengths", "-3,0,3", "--device", "cpu", "--batch-size", "4",
            "--run-id", "edit-1"]
    assert main(argv) == 0
    table = schemas.read_edits(str(tmp_path / "edits"))
    assert table.num_rows == 3 * 3  # one row per ok input x strength; the error row is not edited
    assert set(table["status"].to_pylist()) == {"ok"} and set(table["direction"].to_pylist()) == {"smile"}
    assert set(table["run_id"].to_pylist()) == {"edit-1"}
    got = schemas.edits_w_plus_to_numpy(table)
    net = load_psp(tiny_checkpoint)
    for k, row in enumerate(table.select(["image_id", "strength", "image"]).to_pylist()):
        i = ids.index(row["image_id"])
        want = w[i] + np.float32(row["strength"]) * d.astype(np.float32)
        np.testing.assert_array_equal(got[k], want)
        with torch.inference_mode():
            direct = tensor2im(net.decode(torch.from_numpy(want)[None])[0]).astype(int)
        image = np.asarray(Image.open(io.BytesIO(row["image"]))).astype(int)
        # another batch composition than the direct decode: float sums may differ in the last bit
        assert np.abs(image - direct).max() <= 1 and (image != direct).mean() < 0.01
    assert (tmp_path / "edits" / "_delta_log").is_dir()  # a Delta table any reader opens
    assert len(list((tmp_path / "edits" / "_runs").glob("*.json"))) == 1


def test_edit_stage_with_a_ganspace_direction(tmp_path, tiny_checkpoint):
    from pipelines.edit import EditLatents, expand_strengths
    from psp_core import load_psp
    from psp_core.editing import edit, load_direction
    from psp_core.tasks import tensor2im

    rng = np.random.default_rng(4)
    comp = rng.standard_normal((3, 1, 512)).astype(np.float32)
    comp /= np.linalg.norm(comp, axis=-1, keepdims=True)
    np.savez(tmp_path / "pca.npz", lat_mean=np.zeros((1, 512), np.float32), lat_comp=comp,
             lat_stdev=np.float32([2.0, 1.0, 0.5]))
    direction = load_direction(tmp_path / "pca.npz", ganspace_edit=(1, 0, 4))
    w = rng.standard_normal((2, N_STYLES, 512)).astype(np.float32) * 0.3
    batch = expand_strengths({"image_id": np.array(["a", "b"], dtype=object),
                              "source_uri": np.array(["u/a", "u/b"], dtype=object), "w_plus": w}, [-4.0, 4.0], N_STYLES)
    out = EditLatents(tiny_checkpoint, direction, device="cpu", cpu_threads=1)(batch)
    want = edit(np.repeat(w, 2, axis=0), direction, np.float32([-4, 4, -4, 4]))
    np.testing.assert_array_equal(out["w_plus"], want)
    np.testing.assert_array_equal(out["w_plus"][:, 4:], np.repeat(w, 2, axis=0)[:, 4:])  # styles 4.. untouched
    with torch.inference_mode():
        direct = load_psp(tiny_checkpoint).decode(torch.from_numpy(want))
    for i in range(4):
        np.testing.assert_array_equal(out["image"][i], tensor2im(direct[i]))
    assert list(out["direction"]) == ["pca[1,0:4]"] * 4 and list(out["direction_kind"]) == ["ganspace"] * 4
