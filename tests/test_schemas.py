"""Output schema v1: tables built by the writers read back exactly with pyarrow, pandas and DuckDB
(no Ray), the readers dedup reruns and return W+ with its shape, and the JSON export is in sync."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
        "image_id", "source_uri", "source_sha256", "source_width", "source_height", "status",
        "error", "face_score", "landmarks", "quad", "task", "w_plus", "output_image",
        "image_format", "aligned_image", "mix_w_plus", "mix_images", "mse", "psnr", "ssim",
        "identity_distance", "checkpoint_sha256", "code_version", "run_id", "processed_at",
    ]
    assert schema.field("w_plus").type == so._list(pa.float32(), 18 * 512)
    assert schema.field("landmarks").type == so._list(pa.float32(), 136)
    assert schema.field("quad").type == so._list(pa.float32(), 8)
    assert schema.field("source_width").type == pa.int32()
    assert schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert not schema.field("image_id").nullable and schema.field("w_plus").nullable
    assert so.schema_version(schema) == "1"
    assert so.schema_n_styles(schema) == 18
    assert so.tensor_shapes(schema) == {
        "w_plus": [18, 512], "landmarks": [68, 2], "quad": [4, 2], "mix_w_plus": [-1, 18, 512],
    }
    with pytest.raises(ValueError, match="n_styles"):
        so.output_schema(0)


def test_image_id_is_sha256_prefix_of_uri():
    uri = "s3://bucket/faces/0001.jpg"
    assert so.image_id_for(uri) == hashlib.sha256(uri.encode()).hexdigest()[:32]
    assert so.image_id_for(uri) != so.image_id_for(uri + "x")
    rows = so.rows_to_table([{"source_uri": uri, "status": "ok", "run_id": "r"}], N_STYLES)
    assert rows["image_id"][0].as_py() == so.image_id_for(uri)


def test_roundtrip_pyarrow_pandas_duckdb_without_ray(tmp_path):
    import duckdb
    import pandas as pd

    rows = make_rows()
    table = so.rows_to_table(rows, N_STYLES)
    assert table.schema.equals(so.output_schema(N_STYLES), check_metadata=True)
    write(table, tmp_path / "out", "part-0.parquet")

    # pyarrow: exact schema (fixed-size lists and metadata) and bit-exact tensors
    back = pq.read_table(tmp_path / "out" / "part-0.parquet")
    assert back.schema.equals(so.output_schema(N_STYLES), check_metadata=True)
    w = so.w_plus_to_numpy(back.slice(0, 4))
    np.testing.assert_array_equal(w, np.stack([r["w_plus"] for r in rows[:4]]))
    lm = np.asarray(back["landmarks"][1].as_py(), np.float32).reshape(68, 2)
    np.testing.assert_array_equal(lm, rows[1]["landmarks"])
    # error rows: nulls, error text kept
    assert back["w_plus"].to_pylist()[4:] == [None, None]
    assert back["source_width"].to_pylist()[4:] == [None, None]
    assert back["error"].to_pylist()[:4] == [None] * 4
    assert back["error"][5].as_py() == "cannot identify image file bad1.jpg"

    # pandas
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 6
    np.testing.assert_array_equal(
        np.asarray(df["w_plus"].iloc[2], np.float32).reshape(N_STYLES, 512), rows[2]["w_plus"]
    )
    assert df["w_plus"].iloc[5] is None and df["status"].iloc[5] == "decode_error"

    # DuckDB: the list is readable with SQL
    glob = str(tmp_path / "out" / "*.parquet")
    res = duckdb.sql(
        f"select status, count(*) as n, min(len(w_plus)) as wlen from read_parquet('{glob}') "
        "group by status order by status"
    ).fetchall()
    assert res == [("decode_error", 2, None), ("ok", 4, N_STYLES * 512)]
    first = duckdb.sql(
        f"select w_plus from read_parquet('{glob}') where image_id = '{so.image_id_for(rows[0]['source_uri'])}'"
    ).fetchall()[0][0]
    np.testing.assert_array_equal(np.asarray(first, np.float32).reshape(N_STYLES, 512), rows[0]["w_plus"])


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
        ({"source_uri": "a", "status": "ok", "run_id": "r", "wplus": 1}, "unknown output column"),
        ({"source_uri": "a", "status": "ok", "run_id": "r", "w_plus": np.zeros((18, 512))}, "w_plus"),
        ({"source_uri": "a", "status": None, "run_id": "r"}, "status"),
        ({"source_uri": "a", "status": "ok"}, "run_id"),
    ],
)
def test_rows_to_table_rejects_rows_that_would_change_the_schema(row, match):
    with pytest.raises(ValueError, match=match):
        so.rows_to_table([row], N_STYLES)


def test_read_latents_ok_rows_in_read_order(tmp_path):
    rows = make_rows(n_ok=3, n_err=2, prefix="a") + make_rows(n_ok=2, n_err=0, seed=5, prefix="b")
    write(so.rows_to_table(rows[:5], N_STYLES), tmp_path, "part-1.parquet")
    write(so.rows_to_table(rows[5:], N_STYLES), tmp_path, "part-2.parquet")
    (tmp_path / "_SUCCESS.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not parquet")
    ids, w = so.read_latents(str(tmp_path))
    ok = [r for r in rows if r["status"] == "ok"]
    assert ids == [so.image_id_for(r["source_uri"]) for r in ok]
    assert w.shape == (5, N_STYLES, 512) and w.dtype == np.float32
    np.testing.assert_array_equal(w, np.stack([r["w_plus"] for r in ok]))


def test_rerun_rows_dedup_to_latest(tmp_path):
    first = make_rows(n_ok=3, n_err=1, run_id="run-a", t=T0)
    # The rerun fixes the failed image and recomputes image 0; it lands in a file that sorts FIRST,
    # so the reader must go by processed_at, not by file order.
    later = T0 + dt.timedelta(hours=1)
    rerun = [dict(first[0], w_plus=np.ones((N_STYLES, 512), np.float32), run_id="run-b", processed_at=later),
             dict(first[3], status="ok", error=None, w_plus=np.full((N_STYLES, 512), 2, np.float32),
                  run_id="run-b", processed_at=later)]
    write(so.rows_to_table(first, N_STYLES), tmp_path, "part-z.parquet")
    write(so.rows_to_table(rerun, N_STYLES), tmp_path, "part-a.parquet")

    assert so.read_outputs(str(tmp_path), dedup=False).num_rows == 6
    t = so.read_outputs(str(tmp_path))
    assert t.num_rows == 4
    by_id = {r["image_id"]: r for r in t.select(["image_id", "status", "run_id"]).to_pylist()}
    assert by_id[so.image_id_for(first[0]["source_uri"])]["run_id"] == "run-b"
    assert by_id[so.image_id_for(first[3]["source_uri"])]["status"] == "ok"
    assert by_id[so.image_id_for(first[1]["source_uri"])]["run_id"] == "run-a"
    ids, w = so.read_latents(str(tmp_path))
    assert len(ids) == len(set(ids)) == 4
    np.testing.assert_array_equal(w[ids.index(so.image_id_for(first[0]["source_uri"]))], 1.0)
    # columns= keeps the metadata and dedups the same way
    sub = so.read_outputs(str(tmp_path), columns=["image_id", "w_plus"])
    assert sub.column_names == ["image_id", "w_plus"] and sub.num_rows == 4
    assert so.tensor_shapes(sub.schema)["w_plus"] == [N_STYLES, 512]


def test_reader_rejects_foreign_parquet_and_mixed_models(tmp_path):
    write(so.rows_to_table(make_rows(1, 0), N_STYLES), tmp_path / "a", "part-1.parquet")
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "a" / "other.parquet")
    with pytest.raises(ValueError, match=r"other\.parquet.*schema_version=None"):
        so.read_outputs(str(tmp_path / "a"))

    write(so.rows_to_table(make_rows(1, 0), N_STYLES), tmp_path / "b", "part-1.parquet")
    write(so.rows_to_table([{"source_uri": "z", "status": "ok", "run_id": "r"}], 18), tmp_path / "b", "part-2.parquet")
    with pytest.raises(ValueError, match="n_styles"):
        so.read_outputs(str(tmp_path / "b"))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        so.read_outputs(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        so.read_outputs(str(tmp_path / "empty"))


def test_json_export_in_sync_with_code():
    exports = collect_exports()
    assert "output_v1.json" in exports
    for filename, doc in exports.items():
        committed = Path(so.__file__).parent / filename
        assert committed.read_text() == render(doc), f"run `python -m schemas export` ({filename})"
    fields = {f["name"]: f for f in json.loads(render(exports["output_v1.json"]))["schema"]["fields"]}
    assert fields["w_plus"]["type"] == "fixed_size_list<element: float>[9216]"
    assert fields["image_id"]["nullable"] is False


def test_nightly_output_is_read_through_its_manifest(tmp_path):
    """A nightly folder: only rows the committed manifest names are visible; a crashed run's files
    (under runs/<id>/, never committed) are not."""
    from schemas import manifest as mf

    out = tmp_path / "nightly"
    done = make_rows(n_ok=2, n_err=1, run_id="run-a", prefix="n")
    write(so.rows_to_table(done, N_STYLES), out / "runs" / "run-a", "part-0.parquet")
    crashed = [dict(done[0], run_id="run-b", processed_at=T0 + dt.timedelta(days=1))]
    write(so.rows_to_table(crashed, N_STYLES), out / "runs" / "run-b", "part-0.parquet")
    entries = mf.make_entries(
        dict(image_id=so.image_id_for(r["source_uri"]), source_uri=r["source_uri"], run_id="run-a",
             status=r["status"], output_file="runs/run-a/part-0.parquet", schema_version=1)
        for r in done
    )
    mf.commit_manifest(str(out), entries, "run-a", expected=None)

    assert so.list_output_files(str(out)) == [str(out / "runs" / "run-a" / "part-0.parquet")]
    t = so.read_outputs(str(out))
    assert sorted(t["run_id"].to_pylist()) == ["run-a"] * 3
    ids, w = so.read_latents(str(out))
    assert ids == [so.image_id_for(r["source_uri"]) for r in done[:2]]
    np.testing.assert_array_equal(w[0], done[0]["w_plus"])
