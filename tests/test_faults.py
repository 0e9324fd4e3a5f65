"""Exactly-once under faults: a nightly run that loses an actor, a node, its driver, or meets S3
throttling still ends with every input's row exactly once, as readers see it.

Each test breaks a real part -- a Ray actor process, a Ray node of the session cluster, the driver
process, the HTTP path to the S3 server -- at a point where some rows are already written.
"""
from __future__ import annotations

import glob
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_nightly import (
    committed_rows,
    file_uri,
    nightly_config,
    png_bytes,
    write_images,
)

from schemas.table import read_runs, table_exists

# The long end-to-end tier (about 4 minutes of 2 cores: five pipeline runs plus reruns, a driver in
# a fresh process): CI runs it after the suite (`pytest -m tier2`).
pytestmark = [pytest.mark.slow, pytest.mark.tier2]

ROOT = Path(__file__).resolve().parent.parent
# Small runs: on CPU the tiny model still costs ~1-4 s per image on 2 shared cores.
N = 8
# 24 inputs reach the writer as 2 blocks (16 + 8): the driver test kills after the first is written.
N_DRIVER = 24


def _wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _run_files(out, run_id):
    """Data files a run has written (under OUTPUT/runs/<run_id>/, committed or not)."""
    return glob.glob(os.path.join(str(out), "runs", run_id, "*.parquet"))


def _finished_run_files(out, run_id):
    """Data files a run has finished writing (their Parquet footer reads): a file that merely
    exists may still be half-written, and a half-written file has no rows to adopt."""
    import pyarrow.parquet as pq

    done = []
    for f in _run_files(out, run_id):
        try:
            pq.read_metadata(f)
        except Exception:  # noqa: BLE001 - still being written
            continue
        done.append(f)
    return done


def _check_exactly_once(out, paths, storage_options=None):
    seen = committed_rows(str(out), storage_options)  # asserts no image twice
    want = [p if "://" in p else file_uri(p) for p in paths]
    assert sorted(seen) == sorted(want), "rows lost or extra"
    import schemas

    statuses = {uri: status for uri, (_, _, status) in seen.items()}
    assert set(statuses.values()) == {"ok"}, f"rows that failed: {statuses}"
    ids, w = schemas.read_latents(str(out), storage_options)
    assert len(ids) == len(set(ids)) == len(paths) and w.shape[0] == len(paths)


def table_files(out) -> set[str]:
    """Local paths of the data files of the table's current version."""
    from pipelines.table import OutputTable

    table = OutputTable(str(out))
    return {os.path.join(str(out), p) for p in table.files(table.load())}


def _invert_actors() -> list[dict]:
    """Alive invert actors (Ray Data names the class `MapWorker(MapBatches(InvertFaces))`), from
    the GCS actor table: {"ActorID", "Pid", "NodeID"}. No dashboard needed."""
    from ray._private.state import actors

    return [
        {"ActorID": a["ActorID"], "Pid": a["Pid"], "NodeID": a["Address"]["NodeID"]}
        for a in actors(actor_state_name="ALIVE").values()
        if "InvertFaces" in a["ActorClassName"] and a["Pid"]
    ]


# -- (a) an invert actor dies mid-run -----------------------------------------------------------

def test_a_killed_invert_actor_loses_and_duplicates_nothing(ray_cluster, tiny_checkpoint, tmp_path):
    from pipelines.run import run_nightly

    inp, out = tmp_path / "in", tmp_path / "out"
    paths = write_images(inp, range(N))
    run_id = "fault-a"
    killed = []

    def killer():
        # Once an invert actor has its rows and is inverting them, kill its process (SIGKILL: no
        # clean shutdown, as when a machine or the OOM killer takes it).
        actor = _wait_for(_invert_actors, what="an alive invert actor")[0]
        time.sleep(2.0)
        os.kill(actor["Pid"], signal.SIGKILL)
        killed.append(time.monotonic())

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_nightly(nightly_config(inp, out, tiny_checkpoint, run_id=run_id))
    finished = time.monotonic()
    t.join(timeout=5)
    assert killed and killed[0] < finished, "the run finished before an invert actor was killed"
    assert result.committed and result.lost == 0 and result.processed == N
    _check_exactly_once(out, paths)


# -- (b) a worker node disappears mid-run ----------------------------------------------------------

def test_b_removed_worker_node_loses_and_duplicates_nothing(ray_cluster, tiny_checkpoint, tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.run import run_nightly

    inp, out = tmp_path / "in", tmp_path / "out"
    paths = write_images(inp, range(N))
    run_id = "fault-b"

    # Fill the head so the pipeline's actors and tasks go to the new node, as on a real cluster
    # whose head runs no work; free it once the node is gone, as a replacement node would.
    head_id = ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=ray.cluster_resources()["CPU"])  # the whole head
    class Placeholder:
        def ping(self):
            return True

    blocker = Placeholder.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)
    ).remote()
    ray.get(blocker.ping.remote())
    node = ray_cluster.add_node(num_cpus=3)
    removed = []

    def remover():
        try:
            on_node = _wait_for(
                lambda: [a for a in _invert_actors() if a["NodeID"] == node.node_id],
                what="an invert actor on the worker node",
            )
            time.sleep(2.0)  # mid-batch
            ray_cluster.remove_node(node)
            removed.append(on_node[0]["ActorID"])
        finally:
            ray.kill(blocker)

    t = threading.Thread(target=remover, daemon=True)
    t.start()
    try:
        result = run_nightly(nightly_config(inp, out, tiny_checkpoint, run_id=run_id))
    finally:
        t.join(timeout=30)
        if not removed and node in ray_cluster.worker_nodes:
            ray_cluster.remove_node(node)
    assert removed, "the run finished before the worker node could be removed"
    assert result.committed and result.lost == 0 and result.processed == N
    _check_exactly_once(out, paths)


# -- (c) the driver is killed mid-run -----------------------------------------------------------

def test_c_killed_driver_commits_nothing_and_the_rerun_completes_exactly_once(
    ray_cluster, tiny_checkpoint, tmp_path
):
    from pipelines.run import run_nightly

    inp, out = tmp_path / "in", tmp_path / "out"
    paths = write_images(inp, range(N_DRIVER))
    run_id = "fault-c"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable, "-m", "jobs.cli", "nightly", str(inp), str(out), "--checkpoint",
        tiny_checkpoint, "--run-id", run_id, "--align", "none", "--device", "cpu",
        "--batch-size", "2", "--align-actors", "1", "--images", "none",
    ]
    driver = subprocess.Popen(argv, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _finished_run_files(out, run_id) or driver.poll() is not None, timeout=180,
                  what="the driver's first finished output file")
        assert driver.poll() is None, "driver exited early:\n" + driver.stdout.read().decode()[-3000:]
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()

    # The crashed run is invisible: nothing committed, readers see no rows from it.
    assert read_runs(str(out)) == [] and committed_rows(out) == {}

    rerun = run_nightly(nightly_config(inp, out, tiny_checkpoint))
    assert rerun.committed and rerun.lost == 0
    assert rerun.plan.counts()["new"] == N_DRIVER
    # Rows the dead run had written are adopted, not redone.
    assert rerun.adopted > 0 and rerun.adopted + rerun.processed == N_DRIVER
    _check_exactly_once(out, paths)

    # `psp vacuum` deletes the dead run's files the rerun did not adopt whole; the table is intact.
    from pipelines.table import vacuum

    left = set(_run_files(out, run_id))
    result = vacuum(str(out), retention_hours=0, compact=False)
    kept = table_files(out)
    assert set(_run_files(out, run_id)) == left & kept
    assert {os.path.join(str(out), p) for p in result.deleted_files} == left - kept
    _check_exactly_once(out, paths)


# -- (d) S3 throttling and 5xx between the pipeline and the server ------------------------------

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class EveryNth:
    """A fault rule: every `k`-th request fails."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, method, path, n) -> bool:
        return n % self.k == 0


def data_writes(method, path, n):
    """A fault rule: S3 keeps refusing the pipeline's data-file writes (under runs/)."""
    return method in ("PUT", "POST") and "/runs/" in path and "probe" not in path


def _serve_proxy(upstream: str, rule, count, failed, port) -> None:
    """The proxy's process: relay to `upstream`, answer 503 SlowDown where `rule` says."""
    import threading

    host, up_port = upstream.split("://", 1)[1].split(":")
    should_fail = rule
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self):
            body = self._body()
            with lock:
                count.value += 1
                fail = should_fail(self.command, self.path, count.value)
                failed.value += bool(fail)
            if fail:
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOW_DOWN)
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("transfer-encoding", "connection")}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(host, int(up_port), timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # HEAD: the object's size, as the server said; otherwise the body we relay.
            length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(length or 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.value = server.server_address[1]
    server.serve_forever()


class FaultyS3Proxy:
    """An HTTP proxy in front of the S3 server that answers some requests with 503 SlowDown.

    It runs in its own process: delta-rs holds the GIL while it waits on the network, so a proxy
    thread in the test process would never answer the driver's Delta commit. `rule` is a
    picklable fault rule (`data_writes`, or `EveryNth(4)`): `rule(method, path,
    n)` with `n` counting requests from 1.
    """

    def __init__(self, upstream: str, rule):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._count, self._failed, self._port = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
        self._proc = ctx.Process(target=_serve_proxy, daemon=True,
                                 args=(upstream, rule, self._count, self._failed, self._port))

    @property
    def count(self) -> int:
        return self._count.value

    @property
    def failed(self) -> int:
        return self._failed.value

    def __enter__(self):
        self._proc.start()
        _wait_for(lambda: self._port.value, timeout=60, what="the S3 proxy process")
        self.endpoint_url = f"http://127.0.0.1:{self._port.value}"
        return self

    def __exit__(self, *exc):
        self._proc.terminate()
        self._proc.join(timeout=10)


def _storage_options(endpoint_url, **extra):
    return {
        "key": "testing", "secret": "testing", "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"}, **extra,
    }


def _s3_inputs(s3_server, n):
    bucket = s3_server.make_bucket("faults")
    client = s3_server.client()
    uris = []
    for i in range(n):
        client.put_object(Bucket=bucket, Key=f"in/img_{i:04d}.png", Body=png_bytes(i))
        uris.append(f"s3://{bucket}/in/img_{i:04d}.png")
    return bucket, uris


def test_d_s3_throttling_is_retried_and_nothing_is_lost(ray_cluster, s3_server, tiny_checkpoint):
    from pipelines.run import run_nightly

    bucket, uris = _s3_inputs(s3_server, 8)
    out = f"s3://{bucket}/out"
    # every 4th request to S3 answers 503 SlowDown
    with FaultyS3Proxy(s3_server.endpoint_url, EveryNth(4)) as proxy:
        so = _storage_options(proxy.endpoint_url)
        result = run_nightly(nightly_config(f"s3://{bucket}/in", out, tiny_checkpoint,
                                            storage_options=so))
        assert proxy.failed > 10  # the faults really were on the path
    assert result.committed and result.lost == 0 and result.processed == len(uris)
    _check_exactly_once(out, uris, s3_server.storage_options)


def test_d_s3_errors_past_the_retries_fail_clearly_and_commit_nothing(
    ray_cluster, s3_server, tiny_checkpoint
):
    from pipelines.run import NightlyError, run_nightly

    bucket, uris = _s3_inputs(s3_server, 4)
    out = f"s3://{bucket}/out"

    # Few botocore retries so the test spends seconds, not minutes, exhausting them.
    with FaultyS3Proxy(s3_server.endpoint_url, data_writes) as proxy:
        so = _storage_options(proxy.endpoint_url,
                              config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}})
        with pytest.raises(NightlyError) as err:
            run_nightly(nightly_config(f"s3://{bucket}/in", out, tiny_checkpoint,
                                       storage_options=so, run_id="fault-d"))
        assert proxy.failed >= 2
    message = str(err.value)
    assert "fault-d" in message and "Nothing was committed" in message and "rerun" in message
    assert "reduce your request rate" in message or "SlowDown" in message or "503" in message
    assert not table_exists(out, s3_server.storage_options) or read_runs(out, s3_server.storage_options) == []

    # Once S3 behaves, the same command completes: every row once.
    result = run_nightly(nightly_config(f"s3://{bucket}/in", out, tiny_checkpoint,
                                        storage_options=s3_server.storage_options))
    assert result.committed and result.lost == 0
    _check_exactly_once(out, uris, s3_server.storage_options)
