"""End to end: `psp invert` against S3 (moto over HTTP, real Ray) with credentials given through
--storage-options (a literal value and an `env:NAME` reference) and through the environment, with
inputs that fail (a listed key that is gone before it is read) and img2dataset rows whose URLs
carry a user:password or a signature. Every file the run wrote, the Ray session's log files and
everything printed are searched for each secret value."""
from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as psp
from pipelines import run

pytestmark = pytest.mark.slow


def _leaks(data: bytes, secrets: dict[str, str]) -> list[str]:
    found = []
    for name, value in secrets.items():
        for form in {value, quote(value, safe="")}:
            if form.encode() in data:
                found.append(name)
    return found


def _parquet_text(data: bytes) -> bytes:
    """The decoded contents of a Parquet file (its pages may be compressed): every value that is
    not image bytes, plus the schema metadata."""
    table = pq.read_table(io.BytesIO(data))
    cols = [f.name for f in table.schema if not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)]
    return (repr(table.select(cols).to_pylist()) + repr(table.schema.metadata)).encode()


def test_no_secret_reaches_outputs_logs_or_printed_text(
    ray_cluster, s3_server, tiny_checkpoint, astronaut, capsys, caplog, monkeypatch
):
    import ray

    tag = uuid.uuid4().hex[:12]
    secrets = {
        "option secret": f"psp-e2e-option-secret-{tag}",   # literal in --storage-options
        "option key (env:)": f"PSPE2EKEYID{tag.upper()}",    # --storage-options key env:PSP_E2E_KEY_ID
        "env secret": f"psp-e2e-env-secret-{tag}",         # AWS_SECRET_ACCESS_KEY on the driver
        "env key id": f"PSPE2EENVKEY{tag.upper()}",          # AWS_ACCESS_KEY_ID on the driver
        "env session token": f"psp-e2e-session-token-{tag}",  # AWS_SESSION_TOKEN on the driver
        "url password": f"psp-e2e-url-password-{tag}",     # in an input's URL (img2dataset)
        "url signature": f"psp-e2e-url-signature-{tag}",   # a signed URL's signature
    }
    monkeypatch.setenv("PSP_E2E_KEY_ID", secrets["option key (env:)"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets["env secret"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", secrets["env key id"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", secrets["env session token"])

    bucket = s3_server.make_bucket("creds")
    client = s3_server.client()
    photo = io.BytesIO()
    astronaut.resize((128, 128)).save(photo, "JPEG")
    client.put_object(Bucket=bucket, Key="in/face.jpg", Body=photo.getvalue())
    client.put_object(Bucket=bucket, Key="in/gone.jpg", Body=photo.getvalue())
    # img2dataset-style Parquet: the row's source_uri is its URL, which may carry credentials.
    shard = io.BytesIO()
    pq.write_table(pa.table({
        "url": [f"https://psp-user:{secrets['url password']}@images.example/a.jpg",
                f"https://images.example/b.jpg?X-Amz-Signature={secrets['url signature']}&v=1"],
        "jpg": [photo.getvalue(), b"not an image"],
        "status": ["success", "success"],
    }), shard)
    client.put_object(Bucket=bucket, Key="in/shard.parquet", Body=shard.getvalue())

    # gone.jpg is listed, then deleted before it is read: the read fails with an S3 error.
    real_list_to_shards = run.list_to_shards

    def list_then_delete(*args, **kwargs):
        listing = real_list_to_shards(*args, **kwargs)
        client.delete_object(Bucket=bucket, Key="in/gone.jpg")
        return listing

    monkeypatch.setattr(run, "list_to_shards", list_then_delete)

    endpoint = {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"}
    options = {"key": "env:PSP_E2E_KEY_ID", "secret": secrets["option secret"], "client_kwargs": endpoint}
    out = f"s3://{bucket}/out"
    code = psp(["invert", f"s3://{bucket}/in/", out, "--checkpoint", tiny_checkpoint,
                "--align", "none", "--device", "cpu", "--align-actors", "1", "--batch-size", "4",
                "--no-progress", "--storage-options", json.dumps(options)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "decode_error=1" in printed.out and "ok=2" in printed.out and "read_error=1" in printed.out

    # `psp inspect` with the environment's credentials only (no key/secret in the options).
    assert psp(["inspect", out, "--rows", "5", "--storage-options", json.dumps({"client_kwargs": endpoint})]) == 0
    inspected = capsys.readouterr()
    # The failures stay readable: which input, what went wrong; the URL's password is masked.
    assert "gone.jpg" in inspected.out and "FileNotFoundError" in inspected.out
    assert "https://***:***@images.example/a.jpg" in inspected.out
    assert "b.jpg?X-Amz-Signature=***&v=1" in inspected.out

    # Everything the run wrote under OUTPUT (Parquet decoded as well as raw), printed and logged.
    fs = s3_server.filesystem()
    fs.invalidate_cache()
    written = fs.find(f"{bucket}/out")
    assert any(p.endswith(".parquet") for p in written) and any("/_delta_log/" in p for p in written)
    assert any("/_runs/" in p and p.endswith(".json") for p in written)  # the run summary
    leaks: dict[str, list[str]] = {}
    for path in written:
        data = fs.cat_file(path)
        found = _leaks(data, secrets) + (_leaks(_parquet_text(data), secrets) if path.endswith(".parquet") else [])
        if found:
            leaks[path] = found
    for what, text in (("psp invert stdout", printed.out), ("psp invert stderr", printed.err),
                       ("psp inspect stdout", inspected.out), ("psp inspect stderr", inspected.err),
                       ("driver log records", caplog.text)):
        found = _leaks(text.encode(), secrets)
        if found:
            leaks[what] = found
    # The Ray session's log files (drivers, workers, raylet, GCS) on this machine.
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    n_logs = 0
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            n_logs += 1
            found = _leaks(path.read_bytes(), secrets)
            if found:
                leaks[str(path)] = found
    assert n_logs > 0
    assert not leaks, f"secrets found: {leaks}"
