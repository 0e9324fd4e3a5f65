"""`psp submit` / `psp jobs` against a real Ray head with its job server (`ray start --head`).

The head gets its own temp dir, so it never becomes "the current cluster" other processes on this
machine would attach to, and it is stopped by signalling its own `ray start --block` process (never
`ray stop`, which would stop every Ray instance on the machine).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.cli import main as psp
from jobs.submit import SubmitError, check_entrypoint, entrypoint_for, submit

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """(job server URL, head temp dir) of a 1-CPU Ray head started for this module."""
    temp_dir = tempfile.mkdtemp(prefix="psp-head-", dir="/tmp")  # short: unix socket paths
    port, dash = _free_port(), _free_port()
    # Every per-node port on a free one: another Ray node on this machine (the session cluster,
    # another test run) already holds the defaults, and a job agent that cannot bind means
    # "No available agent to submit job".
    agent_ports = [
        f"--{name}={_free_port()}"
        for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                     "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port",
                     "node-manager-port", "object-manager-port")
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats", *agent_ports,
         "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Ray head did not start (see `ray start` output)") from None
                time.sleep(0.5)
        yield url, temp_dir
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` tears its node down on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_status(url, sid, want, timeout=180):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(sid).value)
        if status in want:
            return status, client
        time.sleep(0.5)
    raise AssertionError(f"job {sid} still {status} after {timeout}s:\n{client.get_job_logs(sid)[-3000:]}")


def _project_copy(dst: Path) -> Path:
    """The project's code plus weights lying around in it, as a job's working_dir."""
    for pkg in ("psp_core", "pipelines", "schemas", "jobs"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "weights.pt").write_bytes(b"\0" * 4096)
    (dst / "psp_core" / "stylegan2.pth").write_bytes(b"\0" * 4096)
    return dst


def test_submit_refuses_what_is_not_a_psp_invert_or_nightly_command(capsys):
    for command in (["demo"], ["nightly", "in", "out"], ["rm", "-rf", "/"], []):
        with pytest.raises(SubmitError):
            check_entrypoint(command)
    assert psp(["submit", "--address", "http://127.0.0.1:9", "--", "nightly", "in"]) == 2
    assert "not a valid psp command" in capsys.readouterr().err
    assert entrypoint_for(["nightly", "a b", "o"]) == "python -m jobs.cli nightly 'a b' o"


@pytest.mark.slow
def test_nightly_job_runs_on_the_cluster_without_weights_and_is_never_submitted_twice(
    ray_head, tiny_checkpoint, tmp_path, capsys
):
    url, temp_dir = ray_head
    from test_nightly import write_images

    write_images(tmp_path / "in", range(3))
    wd = _project_copy(tmp_path / "wd")
    command = ["nightly", str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint",
               tiny_checkpoint, "--dry-run"]

    assert psp(["submit", "--address", url, "--working-dir", str(wd), "--", *command]) == 0
    captured = capsys.readouterr()
    sid = captured.out.strip().splitlines()[-1]
    assert sid.startswith("psp-nightly-")  # the default id: date + OUTPUT
    assert "checkpoint" in captured.err and "local path" in captured.err  # warned, not refused

    # The same nightly again (a retried cron): refused by the job server, with a clear message.
    assert psp(["submit", "--address", url, "--working-dir", str(wd), "--", *command]) == 2
    err = capsys.readouterr().err
    assert f"submission id {sid!r} was already used" in err and "psp jobs status" in err

    status, client = _wait_status(url, sid, {"SUCCEEDED", "FAILED", "STOPPED"})
    assert status == "SUCCEEDED", client.get_job_logs(sid)[-3000:]
    assert [j.submission_id for j in client.list_jobs()].count(sid) == 1

    assert psp(["jobs", "logs", sid, "--address", url]) == 0
    logs = capsys.readouterr().out
    assert '"to_process": 3' in logs and '"committed": false' in logs
    assert psp(["jobs", "status", sid, "--address", url]) == 0
    assert '"status": "SUCCEEDED"' in capsys.readouterr().out

    # What the cluster received: the code, and not one weight file.
    shipped = [p for p in glob.glob(f"{temp_dir}/session_*/runtime_resources/working_dir_files/*/")
               if os.path.exists(os.path.join(p, "jobs", "nightly.py"))]
    assert shipped, "the job's working_dir was not found on the head"
    for pkg in shipped:
        files = [os.path.relpath(f, pkg) for f in glob.glob(f"{pkg}/**", recursive=True)]
        assert "jobs/cli.py" in files
        assert not [f for f in files if f.endswith((".pt", ".pth"))]


@pytest.mark.slow
def test_jobs_stop_stops_a_running_job(ray_head, tiny_checkpoint, tmp_path, capsys):
    url, _ = ray_head
    from test_nightly import write_images

    write_images(tmp_path / "in", range(4))
    sid = submit(
        ["nightly", str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
         "--align", "none", "--device", "cpu"],
        address=url, submission_id="psp-stop-test", working_dir=ROOT,
    )
    assert sid == "psp-stop-test"
    _wait_status(url, sid, {"RUNNING", "SUCCEEDED", "FAILED"})
    assert psp(["jobs", "stop", sid, "--address", url]) == 0
    assert "stopping" in capsys.readouterr().out
    status, _ = _wait_status(url, sid, {"STOPPED", "SUCCEEDED", "FAILED"})
    assert status == "STOPPED"
    from schemas.table import read_runs, table_exists

    out = str(tmp_path / "out")
    assert not table_exists(out) or read_runs(out) == []  # nothing committed
    assert psp(["jobs", "status", "no-such-job", "--address", url]) == 2


@pytest.mark.slow
def test_submit_refuses_credentials_and_sends_env_references_instead(ray_head, tmp_path, capsys, monkeypatch):
    """A command line, --env or runtime_env file carrying a credential creates no job; `env:NAME`
    options travel as names and are resolved (or fail fast, naming the variable) on the cluster."""
    import json
    import uuid

    from ray.job_submission import JobSubmissionClient

    url, _ = ray_head
    client = JobSubmissionClient(url)
    before = {j.submission_id for j in client.list_jobs()}
    secret = f"psp-submit-secret-{uuid.uuid4().hex[:12]}"
    base = ["invert", "s3://faces/in/", "s3://faces/out/", "--checkpoint", "s3://models/psp.pt"]
    refused = [
        ["--", *base, "--storage-options", json.dumps({"key": "AKIAEXAMPLE", "secret": secret})],
        ["--", *base, "--storage-options=" + json.dumps(
            {"client_kwargs": {"endpoint_url": f"https://psp:{secret}@minio.local:9000"}})],
        ["--", "invert", f"https://psp:{secret}@images.local/in/", *base[2:]],
        ["--env", f"AWS_SECRET_ACCESS_KEY={secret}", "--", *base],
    ]
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(f"env_vars:\n  AZURE_STORAGE_KEY: {secret}\n")
    refused.append(["--runtime-env", str(runtime_env), "--", *base])
    for argv in refused:
        assert psp(["submit", "--address", url, *argv]) == 2
        err = capsys.readouterr().err
        assert "refusing to submit" in err and "Kubernetes Secret" in err, err
        assert 'env:AWS_SECRET_ACCESS_KEY' in err and secret not in err
    jobs = client.list_jobs()
    assert {j.submission_id for j in jobs} == before
    assert secret not in repr([(j.entrypoint, j.runtime_env, j.metadata) for j in jobs])

    # The reference is sent, never the value (set here, not on the cluster).
    monkeypatch.setenv("PSP_SUBMIT_SECRET", secret)
    wd = _project_copy(tmp_path / "wd")
    options = json.dumps({"key": "env:PSP_SUBMIT_KEY_ID", "secret": "env:PSP_SUBMIT_SECRET"})
    assert psp(["submit", "--address", url, "--submission-id", "psp-env-ref", "--working-dir", str(wd),
                "--", *base, "--storage-options", options]) == 0
    capsys.readouterr()
    status, client = _wait_status(url, "psp-env-ref", {"SUCCEEDED", "FAILED", "STOPPED"})
    info = client.get_job_info("psp-env-ref")
    assert "env:PSP_SUBMIT_SECRET" in info.entrypoint and secret not in repr(info)
    # The cluster has no PSP_SUBMIT_KEY_ID: the job stops before any work, naming it.
    logs = client.get_job_logs("psp-env-ref")
    assert status == "FAILED" and "PSP_SUBMIT_KEY_ID" in logs and "is not set" in logs, logs[-2000:]
    assert secret not in logs

    # A job that carried credentials before this check existed (submitted with the bare SDK):
    # `psp jobs` shows its entrypoint, status and logs with them masked.
    leaky = f"""echo 'https://psp:{secret}@minio.local/x' '{{"secret": "{secret}"}}'"""
    client.submit_job(entrypoint=leaky, submission_id="psp-old-leaky")
    _wait_status(url, "psp-old-leaky", {"SUCCEEDED", "FAILED", "STOPPED"})
    for action in (["list"], ["status", "psp-old-leaky"], ["logs", "psp-old-leaky"]):
        assert psp(["jobs", *action, "--address", url]) == 0
        out = capsys.readouterr().out
        assert "psp-old-leaky" in out or "https://***:***@minio.local/x" in out
        assert secret not in out, (action, out)
