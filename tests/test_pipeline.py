"""End to end on a real local Ray cluster: S3 (moto over HTTP), local folders and .tar shards in,
one Delta table out. Few pipeline runs (each costs seconds); each run's output serves several tests."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs.demo import make_sample_tar, sample_files
from pipelines.config import InvertConfig
from pipelines.run import run_invert
from schemas import image_id_for, read_latents, read_outputs, read_runs

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

N_GOOD_S3 = 16  # + 4 bad = 20 inputs


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_server, tiny_checkpoint):
    """20 astronaut-derived inputs (4 broken) under s3://<bucket>/raw/ -> s3://<bucket>/out/."""
    bucket = s3_server.make_bucket("e2e")
    client = s3_server.client()
    files = sample_files(N_GOOD_S3)
    for name, blob, _ in files:
        client.put_object(Bucket=bucket, Key=f"raw/{name}", Body=blob)
    config = InvertConfig(
        input=f"s3://{bucket}/raw/",
        output=f"s3://{bucket}/out/",
        checkpoint=tiny_checkpoint,
        storage_options=s3_server.storage_options,
        batch_size=8,
    )
    summary = run_invert(config)
    table = read_outputs(config.output, s3_server.storage_options)
    return {"bucket": bucket, "files": files, "config": config, "summary": summary, "table": table}


def test_s3_every_input_exactly_once_with_status(s3_run):
    table, files, bucket = s3_run["table"], s3_run["files"], s3_run["bucket"]
    uris = table["source_uri"].to_pylist()
    assert sorted(uris) == sorted(f"s3://{bucket}/raw/{name}" for name, _, _ in files)
    assert len(set(table["image_id"].to_pylist())) == len(files)
    by_uri = {r["source_uri"]: r for r in table.select(["source_uri", "status", "error", "w_plus"]).to_pylist()}
    for name, _, expected in files:
        row = by_uri[f"s3://{bucket}/raw/{name}"]
        assert row["status"] == expected, (name, row["error"])
        if expected == "ok":
            assert row["error"] is None and row["w_plus"] is not None
        else:
            # A readable reason that names the input.
            assert name in row["error"] and row["w_plus"] is None


def test_s3_w_plus_equals_direct_encode(s3_run, tiny_checkpoint, astronaut):
    """W+ of a good image == PSP.encode on the same aligned crop (FaceAligner + task transform)."""
    import torch

    from psp_core import load_psp
    from psp_core.align import FaceAligner
    from psp_core.tasks import get_task

    bucket = s3_run["bucket"]
    ids, w_plus = read_latents(s3_run["config"].output, s3_run["config"].storage_options)
    assert w_plus.shape == (N_GOOD_S3, 8, 512)
    blob = dict((n, b) for n, b, _ in s3_run["files"])["face_full.png"]
    crop = FaceAligner(output_size=256)(blob).image
    model = load_psp(tiny_checkpoint)
    with torch.inference_mode():
        direct = model.encode(get_task("ffhq_encode").transform(crop)[None])[0].numpy()
    got = w_plus[ids.index(image_id_for(f"s3://{bucket}/raw/face_full.png"))]
    np.testing.assert_allclose(got, direct, atol=1e-4)


def test_s3_output_images_and_run_summary(s3_run, s3_server):
    from PIL import Image

    table = s3_run["table"]
    ok = [r for r in table.select(["status", "output_image", "image_format", "task", "run_id"]).to_pylist()
          if r["status"] == "ok"]
    img = Image.open(io.BytesIO(ok[0]["output_image"]))
    assert (img.format, img.size, ok[0]["image_format"]) == ("PNG", (256, 256), "png")
    assert {r["task"] for r in ok} == {"ffhq_encode"}

    fs = s3_server.filesystem()
    run_id = s3_run["summary"].run_id
    doc = json.loads(fs.cat(f"{s3_run['bucket']}/out/_runs/{run_id}.json"))
    counts = {"ok": N_GOOD_S3, "decode_error": 3, "no_face": 1}
    assert doc["counts"] == counts and doc["run_id"] == ok[0]["run_id"] == run_id
    assert doc["table"] == {"version": s3_run["summary"].version, "rows": N_GOOD_S3 + 4, "counts": counts}
    for stage in ("read", "align", "invert"):
        assert doc["stages"][stage]["rows"] == N_GOOD_S3 + 4
    assert doc["checkpoint_sha256"] and doc["versions"]["ray"] and doc["versions"]["deltalake"]
    # the same summary is in the commit itself
    runs = read_runs(s3_run["config"].output, s3_server.storage_options)
    assert [(r["run_id"], r["counts"]) for r in runs] == [(run_id, counts)]


def test_align_and_invert_are_separate_operators(s3_run):
    ops = s3_run["summary"].operators
    align = [o for o in ops if "AlignFaces" in o]
    invert = [o for o in ops if "InvertFaces" in o]
    assert len(align) == 1 and len(invert) == 1 and align[0] != invert[0], ops


def test_rerun_into_same_output_adds_no_rows(s3_run, s3_server):
    summary = run_invert(s3_run["config"])
    assert (summary.processed, summary.skipped, summary.version) == (0, 20, None)  # nothing to commit
    again = read_outputs(s3_run["config"].output, s3_server.storage_options)
    assert again.num_rows == s3_run["table"].num_rows == 20


def test_local_folder_and_tar_shard(ray_cluster, tiny_checkpoint, tmp_path):
    """The same accounting from a local folder and a WebDataset-style .tar shard, in one run."""
    from jobs.demo import make_sample_inputs

    folder = tmp_path / "photos"
    make_sample_inputs(folder, n_good=2)
    shard = tmp_path / "shards" / "shard-000.tar"
    shard.parent.mkdir()
    members = make_sample_tar(shard, n_good=1)
    out = tmp_path / "out"
    summary = run_invert(
        InvertConfig(input=[str(folder), str(shard.parent)], output=str(out), checkpoint=tiny_checkpoint)
    )
    table = read_outputs(str(out))
    assert table.num_rows == summary.processed == 6 + len(members)
    rows = {r["source_uri"]: r for r in table.select(["source_uri", "status", "error"]).to_pylist()}
    for m in members:
        row = rows[f"file://{shard}#{m.name}"]
        assert row["status"] == m.expected_status, row
    assert Counter(r["status"] for r in rows.values()) == {"ok": 3, "decode_error": 6, "no_face": 2}
    # any Delta reader, no recipe: one row per input
    from deltalake import DeltaTable

    df = DeltaTable(str(out)).to_pandas(columns=["image_id", "status"])
    assert len(df) == df["image_id"].nunique() == 6 + len(members)


def test_hostile_folder_one_row_per_input_no_hang_and_a_rerun_leaves_permanent_rows(
    ray_cluster, tiny_checkpoint, tmp_path
):
    """A folder mixing good photos with every hostile category: the run finishes, every input gets
    exactly one row (or a counted skip), and a rerun has nothing left that could succeed."""
    import os
    import socket
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, PngImagePlugin

    files = dict((n, b) for n, b, _ in sample_files(6))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "_DSC0001.JPG").write_bytes(files["face_full.jpg"])  # camera name
    (folder / "IMG_0002").write_bytes(files["face_flip.jpg"])  # no extension
    (folder / "odd::name#1 %41.jpg").write_bytes(files["face_384.jpg"])  # fsspec/URI syntax in a name
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "x" * (3 << 20), zip=True)
    face = Image.open(io.BytesIO(files["face_full.png"]))
    face.save(folder / "xmp_heavy.png", pnginfo=info)
    os.mkfifo(folder / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.jpg"))
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "corrupt.tar").write_bytes(b"\x01" * 3000)
    # PostScript/EPS/PDF under image names, in a tar shard and a Parquet row: never decoded, no gs run
    from test_hostile_inputs import PROGRAM_CONTENT, _recorded_calls

    (folder / "ps_as.jpg").write_bytes(PROGRAM_CONTENT["ps_as.jpg"][0])
    (folder / "pdf_as.png").write_bytes(PROGRAM_CONTENT["pdf_as.png"][0])
    pq.write_table(pa.table({"jpg": [PROGRAM_CONTENT["dos_eps.jpg"][0]]}), folder / "eps_rows.parquet")
    with tarfile.open(folder / "good.tar", "w") as tar:
        for name, blob in [("m#1.jpg", files["bad_text.jpg"]), ("eps.png", PROGRAM_CONTENT["eps_as.png"][0])]:
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tar.addfile(ti, io.BytesIO(blob))
    pq.write_table(pa.table({"caption": ["x"]}), folder / "captions.parquet")
    (folder / "notes.txt").write_text("not an input")
    (folder / ".hidden.jpg").write_bytes(files["face_full.jpg"])
    out = folder / "out"  # the output inside the input: left out of the listing

    config = InvertConfig(input=str(folder), output=str(out), checkpoint=tiny_checkpoint, read_timeout=20)
    summary = run_invert(config)
    table = read_outputs(str(out))
    rows = {r["source_uri"]: r for r in table.select(["source_uri", "status", "error"]).to_pylist()}
    root = f"file://{folder}"
    expected = {
        "_DSC0001.JPG": "ok", "IMG_0002": "ok", "odd::name#1 %2541.jpg": "ok", "xmp_heavy.png": "ok",
        "pipe.jpg": "not_a_file", "sock.jpg": "not_a_file", "dangling.jpg": "not_a_file",
        "corrupt.tar": "container_error", "captions.parquet": "container_error",
        "good.tar#m%231.jpg": "decode_error", "ps_as.jpg": "decode_error", "pdf_as.png": "decode_error",
        "good.tar#eps.png": "decode_error", "eps_rows.parquet#row=0": "decode_error",
    }
    assert table.num_rows == len(rows) == summary.processed == len(expected)
    assert {u.removeprefix(root + "/"): r["status"] for u, r in rows.items()} == expected, rows
    # the output table inside the input (its _delta_log commits) is left out and counted as such
    assert summary.not_inputs.pop("output") >= 1
    assert summary.not_inputs == {"hidden": 1, "not_an_image": 1}
    assert "not inputs" in summary.format() and "hidden=1" in summary.format()
    for name, says in [("ps_as.jpg", "PostScript"), ("pdf_as.png", "PDF"), ("good.tar#eps.png", "PostScript/EPS"),
                       ("eps_rows.parquet#row=0", "PostScript/EPS")]:
        error = rows[f"{root}/{name}"]["error"]
        assert name in error and says in error and "ghostscript" not in error.lower(), error
    assert _recorded_calls() == ""  # the Ray workers' PATH starts with the recording gs/convert/magick

    rerun = run_invert(config)  # everything left is permanent: nothing is redone
    assert (rerun.processed, rerun.skipped) == (0, len(expected))
    assert read_outputs(str(out)).num_rows == len(expected)
    sock.close()


def test_a_user_listing_drives_a_run(s3_run, s3_server, ray_cluster, tiny_checkpoint):
    """--listing: a Parquet file with a uri column (plus size/etag) chooses the inputs; the folder
    is not walked (a file under INPUT that the listing leaves out gets no row), and the listing's
    facts are recorded on the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bucket, files, client = s3_run["bucket"], s3_run["files"], s3_server.client()
    chosen = files[:3]
    uris = [f"s3://{bucket}/raw/{name}" for name, _, _ in chosen]
    etags = [client.head_object(Bucket=bucket, Key=f"raw/{name}")["ETag"] for name, _, _ in chosen]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": uris, "size": [len(blob) for _, blob, _ in chosen], "etag": etags}), buf)
    client.put_object(Bucket=bucket, Key="listings/mine.parquet", Body=buf.getvalue().to_pybytes())
    config = InvertConfig(
        input=f"s3://{bucket}/raw/", output=f"s3://{bucket}/listed-out/", checkpoint=tiny_checkpoint,
        storage_options=s3_server.storage_options, listing=f"s3://{bucket}/listings/mine.parquet", batch_size=8,
    )
    summary = run_invert(config)
    assert (summary.listed, summary.processed) == (3, 3)
    table = read_outputs(config.output, s3_server.storage_options)
    rows = {r["source_uri"]: r for r in table.select(["source_uri", "status", "source_size", "source_etag"]).to_pylist()}
    assert sorted(rows) == sorted(uris)
    for (_, blob, expected), uri, etag in zip(chosen, uris, etags):
        assert rows[uri]["status"] == expected
        assert (rows[uri]["source_size"], rows[uri]["source_etag"]) == (len(blob), etag.strip('"'))
    # the run's listing shards are gone once it has committed
    assert not [k for k in client.list_objects_v2(Bucket=bucket, Prefix="listed-out/_listing").get("Contents", [])]


WORKER_REUSE = r"""
import os, time
import ray
from pipelines.dataflow import ensure_ray

ensure_ray()  # a private local cluster, as `psp invert` starts it
cpus = ray.cluster_resources()["CPU"]


@ray.remote
class Holder:  # what a run's actor pools do: hold all but a fraction of the node's CPUs
    def ready(self):
        return True


holder = Holder.options(num_cpus=cpus - 0.5).remote()
ray.get(holder.ready.remote())


@ray.remote(num_cpus=0.25)  # a read or write task
def pid():
    return os.getpid()


pids = []
for _ in range(4):
    pids.append(ray.get(pid.remote()))
    time.sleep(2.5)  # longer than Ray's default idle time (1 s) and its reaping interval
print(len(set(pids)))
"""


def test_a_local_cluster_keeps_its_task_workers_between_a_runs_tasks():
    """With the node's CPUs held by actors, Ray's default ends a worker 1 s after its task and the
    next fractional-CPU task pays a fresh Python process (1-2 s of CPU): a run's read and write
    tasks did that every few seconds. The local cluster keeps them (fresh process: the setting is
    the cluster's, made by `ensure_ray`; this session's own cluster is not asked)."""
    from pipelines.dataflow import RAY_WORKER_ENV

    env = {k: v for k, v in os.environ.items() if k not in RAY_WORKER_ENV and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", WORKER_REUSE], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "1"  # one worker ran all four tasks
