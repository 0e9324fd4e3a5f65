"""Listing inputs and fetching their bytes: folders, S3 prefixes, tar shards, Parquet, manifests."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.items import InputError, SourceItem
from pipelines.read import read_batch
from pipelines.sources import list_inputs


def _batch(items: list[SourceItem]) -> dict[str, np.ndarray]:
    rows = [i.to_row() for i in items]
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def _read(items, storage_options=None) -> dict[str, np.ndarray]:
    return read_batch(_batch(items), storage_options=storage_options)


def test_folder_lists_images_by_extension_recursively(tmp_path):
    (tmp_path / "a.JPG").write_bytes(b"1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"22")
    (tmp_path / "sub" / "c.webp").write_bytes(b"333")
    (tmp_path / "notes.txt").write_text("not an input")
    (tmp_path / "_SUCCESS.json").write_text("{}")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.jpg").write_bytes(b"4")
    items = list_inputs(str(tmp_path))
    assert [i.uri for i in items] == [
        f"file://{tmp_path}/a.JPG", f"file://{tmp_path}/sub/b.png", f"file://{tmp_path}/sub/c.webp"
    ]
    assert [i.size for i in items] == [1, 2, 3]
    assert all(i.kind == "file" and i.mtime is not None for i in items)
    got = _read(items)
    assert list(got["data"]) == [b"1", b"22", b"333"] and set(got["status"]) == {"ok"}


def test_missing_input_and_unreadable_object_fail_differently(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))
    item = SourceItem(uri=f"file://{tmp_path}/gone.jpg")
    got = _read([item])
    assert got["status"][0] == "read_error"
    assert "gone.jpg" in got["error"][0] and got["data"][0] == b""


def test_tar_shard_expands_to_one_item_per_image_member(tmp_path):
    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, blob in [("0001.jpg", b"jpeg-1"), ("0001.json", b"{}"), ("./0002.png", b"png-2")]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    items = list_inputs(str(shard))
    assert [i.uri for i in items] == [f"file://{shard}#0001.jpg", f"file://{shard}#./0002.png"]
    assert {i.kind for i in items} == {"tar_member"}
    missing = SourceItem(uri=f"file://{shard}#0003.jpg", kind="tar_member")
    got = _read(items + [missing])
    assert list(got["data"][:2]) == [b"jpeg-1", b"png-2"]
    assert list(got["status"]) == ["ok", "ok", "read_error"] and "0003.jpg" in got["error"][2]


def test_parquet_rows_with_image_bytes_and_img2dataset_urls(tmp_path):
    path = tmp_path / "00000.parquet"
    table = pa.table({
        "url": ["http://x/a.jpg", "http://x/b.jpg", "http://x/c.jpg"],
        "jpg": [b"A", None, b"C"],
        "status": ["success", "failed_to_download", "success"],
    })
    pq.write_table(table, path, row_group_size=2)
    items = list_inputs(str(tmp_path))
    # img2dataset rows that failed to download carry no image: they are not inputs.
    assert [i.uri for i in items] == [f"file://{path}#row=0", f"file://{path}#row=2"]
    assert [i.source_uri for i in items] == ["http://x/a.jpg", "http://x/c.jpg"]
    got = _read(items)
    assert list(got["data"]) == [b"A", b"C"] and list(got["source_uri"]) == ["http://x/a.jpg", "http://x/c.jpg"]

    pq.write_table(pa.table({"pixels": [b"P"]}), tmp_path / "other.parquet")
    # No image column: the file is one row whose status says what to do (the run goes on).
    [whole] = list_inputs(str(tmp_path / "other.parquet"))
    got = _read([whole])
    assert (whole.kind, got["status"][0]) == ("container", "container_error")
    assert "other.parquet" in got["error"][0] and "--image-column" in got["error"][0]
    other = list_inputs(str(tmp_path / "other.parquet"), image_column="pixels")
    assert list(_read(other)["data"]) == [b"P"]


def test_manifest_lists_relative_and_absolute_uris(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"a")
    (tmp_path / "b.png").write_bytes(b"b")
    manifest = tmp_path / "todo.txt"
    manifest.write_text(f"# inputs\nimgs/a.jpg\n\n{tmp_path}/b.png\n")
    items = list_inputs(str(manifest))
    assert [i.uri for i in items] == [f"file://{tmp_path}/imgs/a.jpg", f"file://{tmp_path}/b.png"]


def test_s3_prefix_listing_and_read(s3_server):
    bucket = s3_server.make_bucket("src")
    client = s3_server.client()
    for key, body in [("raw/x.jpg", b"xx"), ("raw/deep/y.png", b"yyy"), ("raw/readme.md", b"#"), ("other/z.jpg", b"z")]:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    items = list_inputs(f"s3://{bucket}/raw/", s3_server.storage_options)
    assert [i.uri for i in items] == [f"s3://{bucket}/raw/deep/y.png", f"s3://{bucket}/raw/x.jpg"]
    assert all(i.etag for i in items) and [i.size for i in items] == [3, 2]
    got = _read(items + [SourceItem(uri=f"s3://{bucket}/raw/missing.jpg")], s3_server.storage_options)
    assert list(got["data"][:2]) == [b"yyy", b"xx"]
    assert got["status"][2] == "read_error" and "missing.jpg" in got["error"][2]
