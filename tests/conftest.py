"""Shared test fixtures: one Ray cluster, one S3 (moto) server, a tiny checkpoint, the astronaut.

Ray and S3 are real: a `ray.cluster_utils.Cluster` (head with 4 logical CPUs, so fault tests can
add/remove worker nodes) and moto's S3 server in its own process (`python -m moto.server`), spoken
to over HTTP by s3fs in every Ray worker and by delta-rs on the driver (in-process, the driver's
Delta commit dead-locks against the server's thread). Both are session-scoped because starting them costs seconds on this 2-core machine.
"""
from __future__ import annotations

import os
import socket
import tempfile
import uuid
from dataclasses import dataclass, field

import pytest

# Must be in the environment BEFORE Ray starts: workers inherit it (s3fs/botocore read these).
_TEST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Quiet, small Ray: no dashboard log spam, no usage stats prompt.
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _k, _v in _TEST_ENV.items():
    os.environ.setdefault(_k, _v)

# Recording stand-ins for the external programs an image decoder could start (Ghostscript for
# EPS/PDF, ImageMagick), first on PATH for this process and every Ray worker: any call is appended
# to SUBPROCESS_RECORDER, which tests/test_hostile_inputs.py requires to stay empty.
SUBPROCESS_RECORDER = os.path.join(tempfile.mkdtemp(prefix="psp-recorder-"), "calls.log")
for _prog in ("gs", "gsc", "gswin64c", "convert", "magick"):
    _script = os.path.join(os.path.dirname(SUBPROCESS_RECORDER), _prog)
    with open(_script, "w") as _f:
        _f.write(f'#!/bin/sh\necho "{_prog} $*" >> "{SUBPROCESS_RECORDER}"\nexit 1\n')
    os.chmod(_script, 0o755)
os.environ["PATH"] = os.path.dirname(SUBPROCESS_RECORDER) + os.pathsep + os.environ.get("PATH", "")
os.environ["PSP_TEST_SUBPROCESS_RECORDER"] = SUBPROCESS_RECORDER

# 2 shared cores: keep intra-op threads low in the test process (workers set their own).
try:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (head: 4 logical CPUs), connected with `ray.init`; yields the Cluster.

    Fault tests may `ray_cluster.add_node(num_cpus=...)` / `ray_cluster.remove_node(node)`; they must
    remove what they add.
    """
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.dataflow import keep_idle_workers

    keep_idle_workers()  # as a run's own local cluster: workers kept, not respawned
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "include_dashboard": False},
    )
    ray.init(address=cluster.address, log_to_driver=False)
    # Keep a failed write from silently losing rows (DESIGN.md).
    ray.data.DataContext.get_current().max_errored_blocks = 0
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@dataclass
class S3Server:
    """A moto S3 server over HTTP. `storage_options` is what s3fs/fsspec take (pickled to workers)."""

    endpoint_url: str
    storage_options: dict = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def make_bucket(self, prefix: str = "psp") -> str:
        """Create a fresh, uniquely named bucket (boto3: s3fs mkdir with a region fails on moto)."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:<free port>, a separate process, for the whole session."""
    import subprocess
    import sys
    import time

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto server did not start on port {port}") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    try:
        yield S3Server(endpoint_url=endpoint, storage_options=options)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A seeded random-weight pSp checkpoint in the official format, output_size 32 (n_styles 8)."""
    from psp_core.testing import random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "psp_tiny.pt"
    return str(random_checkpoint(str(path), output_size=32, seed=0))


@pytest.fixture(scope="session")
def astronaut():
    """skimage's astronaut photo (512x512 RGB) as a PIL image: a real face dlib detects."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())
