"""Output schema v3 and the output table's readers, without Ray: tables built by the writers,
committed to a real Delta table, read back exactly by `schemas.read_outputs` / `read_latents`,
deltalake + pyarrow, pandas and DuckDB (over the Arrow dataset); one row per input after a
replacement; time travel; and the JSON export is in sync."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from schemas import outputs as so
from schemas.__main__ import collect_exports, render
from schemas.testing import EXAMPLE_TIME, example_rows

N_STYLES = 8
T0 = EXAMPLE_TIME


def make_rows(n_ok: int = 4, n_err: int = 2, seed: int = 0, run_id: str = "run-a", t=T0, prefix="img"):
    return example_rows(n_ok, n_err, N_STYLES, seed=seed, run_id=run_id, processed_at=t, prefix=prefix)


def write(table: pa.Table, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pq.write_table(table, path)
    return path


def test_schema_columns_types_and_metadata():
    schema = so.output_schema(18)
    assert schema.names == [
        "image_id", "source_id", "source_uri", "source_size", "source_mtime", "source_etag", "source_sha256",
        "source_width", "source_height", "status",
        "error", "face_score", "face_index", "face_count", "face_box", "landmarks", "quad", "task", "w_plus",
        "model_family", "n_iters", "iteration_w_plus", "output_image",
        "image_format", "aligned_image", "mix_w_plus", "mix_images", "mse", "psnr", "ssim",
        "identity_distance", "checkpoint_sha256", "code_version", "run_id", "processed_at",
    ]
    f32_list = pa.list_(pa.field("element", pa.float32()))  # Delta has no fixed-size list
    for name in ("w_plus", "landmarks", "quad", "face_box", "iteration_w_plus"):
        assert schema.field(name).type == f32_list
    assert schema.field("n_iters").type == pa.int32()
    assert so.tensor_shapes(schema)["iteration_w_plus"] == [-1, 18, 512]
    assert schema.field("mix_w_plus").type == pa.list_(pa.field("element", f32_list))
    assert schema.field("source_width").type == pa.int32()
    assert schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert not schema.field("image_id").nullable and schema.field("w_plus").nullable
    assert not schema.field("source_id").nullable and schema.field("face_index").type == pa.int32()
    assert so.schema_version(schema) == "3"
    assert so.schema_n_styles(schema) == 18
    assert so.tensor_shapes(schema) == {
        "w_plus": [18, 512], "landmarks": [68, 2], "quad": [4, 2], "face_box": [4],
        "mix_w_plus": [-1, 18, 512], "iteration_w_plus": [-1, 18, 512],
    }
    with pytest.raises(ValueError, match="n_styles"):
        so.output_schema(0)


def test_image_id_is_sha256_prefix_of_uri():
    uri = "s3://bucket/faces/0001.jpg"
    assert so.image_id_for(uri) == hashlib.sha256(uri.encode()).hexdigest()[:32]
    assert so.image_id_for(uri) != so.image_id_for(uri + "x")
    rows = so.rows_to_table([{"source_uri": uri, "status": "ok", "run_id": "r"}], N_STYLES)
    assert rows["image_id"][0].as_py() == so.image_id_for(uri)


def test_dense_columns_and_mix_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, N_STYLES, 512)).astype(np.float32)
    mix = [rng.standard_normal((2, N_STYLES, 512)).astype(np.float32), None, np.zeros((1, N_STYLES, 512))]
    table = so.columns_to_table(
        {
            "source_uri": ["a", "b", "c"],
            "status": np.array(["ok", "ok", "ok"], dtype=object),
            "run_id": ["r"] * 3,
            "w_plus": w,
            "mix_w_plus": mix,
            "mix_images": [[b"1", b"2"], None, [b"3"]],
            "mse": np.array([0.1, 0.2, 0.3]),
        },
        N_STYLES,
    )
    path = write(table, tmp_path, "x.parquet")
    back = pq.read_table(path)
    np.testing.assert_array_equal(so.w_plus_to_numpy(back), w)
    m0 = np.asarray(back["mix_w_plus"][0].as_py(), np.float32).reshape(-1, N_STYLES, 512)
    np.testing.assert_array_equal(m0, mix[0])
    assert back["mix_w_plus"][1].as_py() is None
    assert back["mix_images"].to_pylist() == [[b"1", b"2"], None, [b"3"]]
    assert back["mse"].type == pa.float32()
    assert back["processed_at"].null_count == 0  # defaulted to now


@pytest.mark.parametrize(
    "row, match",
    [
        ({"source_uri": "a", "status": "ok", "run_id": "r", "quad": np.zeros(7)}, "quad"),
        ({"source_uri": "a", "status": "ok", "run_id": "r", "wplus": 1}, "unknown output column"),
        ({"source_uri": "a", "status": "ok", "run_id": "r", "w_plus": np.zeros((18, 512))}, "w_plus"),
        ({"source_uri": "a", "status": None, "run_id": "r"}, "status"),
        ({"source_uri": "a", "status": "ok"}, "run_id"),
    ],
)
def test_rows_to_table_rejects_rows_that_would_change_the_schema(row, match):
    with pytest.raises(ValueError, match=match):
        so.rows_to_table([row], N_STYLES)




def test_validate_tensors_catches_a_row_of_another_model():
    table = so.rows_to_table(make_rows(2, 1), N_STYLES)
    so.validate_tensors(table, N_STYLES)
    with pytest.raises(ValueError, match="w_plus has 4096 values, expected 9216"):
        so.validate_tensors(table, 18)


# -- the output table (Delta), written by pipelines.table's committer ------------------------------

def commit_rows(out, rows, run_id, remove=()):
    """Write `rows` as run `run_id`'s file and commit it (no Ray): what a run does at its end."""
    from pipelines.commit import commit_run
    from pipelines.table import OutputTable
    from pipelines.writer import WrittenRun

    table = OutputTable(str(out))
    dt = table.ensure(N_STYLES)
    data = so.rows_to_table(rows, N_STYLES)
    written = WrittenRun(run_id)
    written.extend([table.write_file(f"runs/{run_id}/part-0.parquet", data)], data["image_id"], data["status"])
    return commit_run(table, written, N_STYLES, {"run_id": run_id, "kind": "test"}, dt.version(), remove)


def test_table_reads_back_exactly_with_every_reader(tmp_path):
    import duckdb
    from deltalake import DeltaTable

    out = tmp_path / "out"
    rows = make_rows()
    commit_rows(out, rows, "run-a")

    # schemas readers: exact v3 schema (metadata included), W+ as float32 [N, n_styles, 512]
    back = schemas.read_outputs(str(out))
    assert back.schema.equals(so.output_schema(N_STYLES), check_metadata=True)
    by_id = {r["image_id"]: r for r in back.to_pylist()}
    lm = np.asarray(by_id[so.image_id_for(rows[1]["source_uri"])]["landmarks"], np.float32).reshape(68, 2)
    np.testing.assert_array_equal(lm, rows[1]["landmarks"])
    bad = by_id[so.image_id_for(rows[5]["source_uri"])]
    assert bad["w_plus"] is None and bad["error"] == "cannot identify image file bad1.jpg"
    ids, w = schemas.read_latents(str(out))
    assert w.shape == (4, N_STYLES, 512) and w.dtype == np.float32
    want = {so.image_id_for(r["source_uri"]): r["w_plus"] for r in rows if r["status"] == "ok"}
    for image_id, latent in zip(ids, w):
        np.testing.assert_array_equal(latent, want[image_id])

    # deltalake + pyarrow, and the table properties that say how to reshape
    dt = DeltaTable(str(out))
    conf = dt.metadata().configuration
    assert conf["psp.schema_version"] == so.SCHEMA_VERSION == "3" and conf["psp.n_styles"] == str(N_STYLES)
    assert json.loads(conf["psp.tensor_shapes"])["w_plus"] == [N_STYLES, 512]
    assert dt.to_pyarrow_table().num_rows == 6

    # pandas
    df = dt.to_pandas()
    assert sorted(df["status"].value_counts().items()) == [("decode_error", 2), ("ok", 4)]
    first = df[df["image_id"] == ids[0]]["w_plus"].iloc[0]
    np.testing.assert_array_equal(np.asarray(first, np.float32).reshape(N_STYLES, 512), want[ids[0]])

    # DuckDB over the Arrow dataset (delta_scan needs DuckDB's delta extension, a download)
    faces = dt.to_pyarrow_dataset()  # noqa: F841 - DuckDB finds it by name
    res = duckdb.sql("select status, count(*) n, min(len(w_plus)) wlen from faces group by status order by status").fetchall()
    assert res == [("decode_error", 2, None), ("ok", 4, N_STYLES * 512)]


def test_one_row_per_input_after_a_replacement_and_history_keeps_the_old(tmp_path):
    out = tmp_path / "out"
    first = make_rows(n_ok=3, n_err=1, run_id="run-a", t=T0)
    v1 = commit_rows(out, first, "run-a").version
    later = T0 + dt.timedelta(hours=1)
    redo = [dict(first[0], w_plus=np.ones((N_STYLES, 512), np.float32), run_id="run-b", processed_at=later),
            dict(first[3], status="ok", error=None, w_plus=np.full((N_STYLES, 512), 2, np.float32),
                 run_id="run-b", processed_at=later)]
    gone = so.image_id_for(first[2]["source_uri"])
    result = commit_rows(out, redo, "run-b", remove=[gone])
    assert result.removed == 3  # two replaced rows and the deleted input's row

    t = schemas.read_outputs(str(out), columns=["image_id", "status", "run_id"])
    assert t.num_rows == 3 and len(set(t["image_id"].to_pylist())) == 3 and gone not in t["image_id"].to_pylist()
    by_id = {r["image_id"]: r for r in t.to_pylist()}
    assert by_id[so.image_id_for(first[0]["source_uri"])]["run_id"] == "run-b"
    assert by_id[so.image_id_for(first[3]["source_uri"])]["status"] == "ok"
    assert by_id[so.image_id_for(first[1]["source_uri"])]["run_id"] == "run-a"
    ids, w = schemas.read_latents(str(out))
    np.testing.assert_array_equal(w[ids.index(so.image_id_for(first[0]["source_uri"]))], 1.0)

    # history: the version before has the old rows, by number and by time
    old = schemas.read_outputs(str(out), columns=["image_id", "run_id"], as_of=v1)
    assert old.num_rows == 4 and set(old["run_id"].to_pylist()) == {"run-a"}
    runs = schemas.read_runs(str(out))
    assert [r["run_id"] for r in runs] == ["run-a", "run-b"] and runs[0]["version"] == v1
    assert schemas.read_outputs(str(out), columns=["run_id"], as_of=runs[0]["committed_at"]).num_rows == 4
    with pytest.raises(ValueError, match="has no version 99"):
        schemas.read_outputs(str(out), as_of=99)


def test_readers_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no psp output table"):
        schemas.read_outputs(str(tmp_path / "missing"))
    from deltalake import write_deltalake

    write_deltalake(str(tmp_path / "other"), pa.table({"x": [1, 2]}))
    with pytest.raises(ValueError, match="psp.schema_version=None"):
        schemas.read_outputs(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="unknown column"):
        schemas.read_outputs(str(tmp_path / "other"), columns=["wplus"])


def test_json_export_in_sync_with_code():
    exports = collect_exports()
    assert "output_v3.json" in exports
    for filename, doc in exports.items():
        committed = Path(so.__file__).parent / filename
        assert committed.read_text() == render(doc), f"run `python -m schemas export` ({filename})"
    fields = {f["name"]: f for f in json.loads(render(exports["output_v3.json"]))["schema"]["fields"]}
    assert fields["w_plus"]["type"] == "list<element: float>"
    assert fields["image_id"]["nullable"] is False
    assert json.loads(render(exports["output_v3.json"]))["schema"]["metadata"]["psp.tensor_shapes"]["w_plus"] == [18, 512]


def test_image_id_and_run_ids_have_one_definition():
    import pipelines.plan
    import schemas.ids

    assert schemas.image_id_for is schemas.ids.image_id_for is pipelines.plan.image_id_for
    assert schemas.check_run_id(schemas.make_run_id())
    with pytest.raises(ValueError, match="run_id"):
        schemas.check_run_id("2026/11/26 run.1")
