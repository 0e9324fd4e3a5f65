"""`psp submit` and `psp jobs`: run `psp invert|nightly|train` on a Ray cluster through the Ray Jobs API.

    psp submit --address http://HEAD:8265 [--submission-id ID] -- nightly s3://in s3://out --checkpoint s3://w/psp.pt
    psp jobs status|logs|stop|list ID --address http://HEAD:8265

The job's code travels as the runtime_env ``working_dir`` (this project, minus weights, virtualenvs
and VCS data); its dependencies come from the cluster image (infra/Dockerfile), so nothing is
pip-installed per job. Weights are never uploaded: checkpoints are read by the workers from a URI
every node can reach (s3://, gs://, a shared mount).

A submission id is the job's idempotency key: the job server refuses an id it has seen, so a
nightly submitted twice (a retried cron, a double click) runs once. Nightly jobs get a default id
derived from OUTPUT and the UTC date.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pipelines.options import add_arguments, option, shared
from pipelines.secrets import (
    HOW_TO_PASS_CREDENTIALS,
    WORKER_SETUP_HOOK,
    command_line_secrets,
    env_var_secrets,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNTIME_ENV = PROJECT_ROOT / "infra" / "runtime_env.yaml"
# Never shipped with the job: weights (any format), environments, VCS, caches, outputs.
WEIGHT_PATTERNS = ["*.pt", "*.pth", "*.ckpt", "*.pkl", "*.safetensors", "*.onnx", "*.bin", "*.dat"]
EXCLUDES = WEIGHT_PATTERNS + [
    ".venv/", ".git/", "__pycache__/", "*.egg-info/", ".pytest_cache/", "psp-demo-output/",
    ".notes/", "build/", "dist/",
]
SUBCOMMANDS = ("invert", "frontalize", "nightly", "train")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A submission was refused or the job server could not be reached."""


def load_runtime_env(path: Optional[str | os.PathLike]) -> dict[str, Any]:
    """The runtime_env mapping in a YAML file (`infra/runtime_env.yaml` by default); {} if absent."""
    if path is None or not Path(path).exists():
        return {}
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SubmitError(f"runtime env file {path} must hold a mapping, got {type(data).__name__}")
    return data


def build_runtime_env(
    working_dir: str | os.PathLike = PROJECT_ROOT,
    base: Optional[dict[str, Any]] = None,
    env_vars: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """The job's runtime_env: `base` plus ``working_dir`` and the weight/venv excludes.

    Any ``pip``/``conda`` key in `base` is refused: the image is the environment.
    """
    env = dict(base or {})
    for key in ("pip", "conda", "uv"):
        if key in env:
            raise SubmitError(
                f"runtime_env sets {key!r}: dependencies come from the cluster image "
                "(infra/Dockerfile); remove it, or build a new image"
            )
    env["working_dir"] = str(working_dir)
    env.setdefault("worker_process_setup_hook", WORKER_SETUP_HOOK)  # workers' log records redacted
    env["excludes"] = list(dict.fromkeys([*env.get("excludes", []), *EXCLUDES]))
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **env_vars}
    carried = env_var_secrets(env.get("env_vars"))
    if carried:
        raise SubmitError(
            f"refusing to submit: the job's environment would carry credentials ({', '.join(carried)}; "
            f"from --env or the runtime_env file). {HOW_TO_PASS_CREDENTIALS}"
        )
    return env


def _cli_parser() -> argparse.ArgumentParser:
    """The real parsers of the commands a job may run (`psp invert|frontalize|nightly|train`)."""
    from jobs import invert, nightly, train

    parser = argparse.ArgumentParser(prog="psp")
    sub = parser.add_subparsers(dest="command", required=True)
    invert.register(sub)
    nightly.register(sub)
    train.register(sub)
    return parser


def check_entrypoint(args: Sequence[str]) -> argparse.Namespace:
    """Parse `args` (e.g. ``["nightly", IN, OUT, "--checkpoint", C]``) with the real `psp` parser.

    Raises SubmitError for anything but a valid invert/frontalize/nightly/train command, so a typo fails
    here, not an hour later on the cluster.
    """
    if not args or args[0] not in SUBCOMMANDS:
        raise SubmitError(
            f"psp submit runs one of {', '.join(SUBCOMMANDS)}; got {' '.join(args) or 'nothing'}: "
            "write the command after '--', e.g. psp submit -- nightly IN OUT --checkpoint C"
        )
    parser = _cli_parser()
    try:
        return parser.parse_args(list(args))
    except SystemExit as exc:
        raise SubmitError(f"not a valid psp command: {shlex.join(args)}") from exc


def command_locations(ns: argparse.Namespace) -> dict[str, list[str]]:
    """{"input": [...], "output": [...], "checkpoint": [...]} of a parsed invert/nightly/train
    command (`psp invert` takes several INPUTs then OUTPUT as one positional list; a training
    run's weights count as checkpoints, its run folder as its output)."""
    if getattr(ns, "command", None) == "train":
        weights = [ns.checkpoint, ns.stylegan_weights, ns.alexnet_weights, ns.lpips_weights, ns.ir_se50_weights,
                   ns.moco_weights]
        inputs = list(ns.data) + list(ns.target or []) + list(ns.val_data or []) + list(ns.val_target or [])
        return {"input": inputs, "output": [ns.run_dir], "checkpoint": [w for w in weights if w]}
    if getattr(ns, "command", None) in ("invert", "frontalize"):
        *inputs, output = ns.input
        return {"input": inputs, "output": [output], "checkpoint": [ns.checkpoint]}
    return {"input": [ns.input], "output": [ns.output], "checkpoint": [ns.checkpoint]}


def local_path_warnings(ns: argparse.Namespace) -> list[str]:
    """Warnings for paths a cluster cannot reach: local checkpoints/inputs/outputs."""
    out = []
    for name, values in command_locations(ns).items():
        for v in values:
            if isinstance(v, str) and "://" not in v:
                out.append(
                    f"{name} {v!r} is a local path: every cluster node must see it at that path "
                    "(a shared mount); otherwise use s3://, gs:// or another object-store URI"
                    + (" -- weights are never uploaded with the job" if name == "checkpoint" else "")
                )
    return out


def default_submission_id(args: Sequence[str], now: Optional[_dt.datetime] = None) -> Optional[str]:
    """``psp-nightly-<YYYYMMDD>-<8 hex of OUTPUT>`` for a nightly; None (server picks) otherwise."""
    if not args or args[0] != "nightly":
        return None
    ns = check_entrypoint(args)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    output = command_locations(ns)["output"][0]
    digest = hashlib.sha256(str(output).rstrip("/").encode()).hexdigest()[:8]
    return f"psp-nightly-{now:%Y%m%d}-{digest}"


def entrypoint_for(args: Sequence[str]) -> str:
    """The shell command the job runs: the `psp` CLI from the uploaded working_dir."""
    return "python -m jobs.cli " + shlex.join(list(args))


def _client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise SubmitError(
            f"cannot reach the Ray job server at {address or '$RAY_ADDRESS'}: {exc}. Pass "
            "--address http://HEAD:8265 (port-forward the head's dashboard port on KubeRay); with "
            "token auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
        ) from exc


def submit(
    args: Sequence[str],
    address: Optional[str] = None,
    submission_id: Optional[str] = None,
    working_dir: str | os.PathLike = PROJECT_ROOT,
    runtime_env_file: Optional[str | os.PathLike] = DEFAULT_RUNTIME_ENV,
    env_vars: Optional[dict[str, str]] = None,
    entrypoint_num_cpus: Optional[float] = None,
    agent_wait_s: float = 120.0,
) -> str:
    """Submit ``psp <args>`` as a Ray job; returns the submission id.

    A freshly started head answers "No available agent" until its job agent is up: the submission
    is retried for up to `agent_wait_s` seconds.

    Raises SubmitError if the command does not parse, carries credentials (storage-option
    secrets, URLs with user:password; also in `env_vars`: they would be readable in the job's
    description), the server is unreachable, or the submission id was already used on this
    cluster (a duplicate nightly is refused).
    """
    check_entrypoint(args)
    carried = command_line_secrets(args)
    if carried:
        raise SubmitError(
            f"refusing to submit: the command line carries credentials ({'; '.join(carried)}). "
            f"{HOW_TO_PASS_CREDENTIALS}"
        )
    submission_id = submission_id or default_submission_id(args)
    runtime_env = build_runtime_env(working_dir, load_runtime_env(runtime_env_file), env_vars)
    client = _client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint_for(args),
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata={"psp.command": args[0]},
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
        except RuntimeError as exc:
            # A head that just started serves HTTP before its job agent is up: wait for it.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            if "already exists" in str(exc):
                raise SubmitError(
                    f"submission id {submission_id!r} was already used on "
                    f"{address or 'this cluster'}: that job was submitted before and is not run "
                    f"twice. See it with `psp jobs status {submission_id}`; pass another "
                    "--submission-id to run again"
                ) from exc
            raise SubmitError(f"the job server refused the submission: {exc}") from exc


def wait(client: Any, submission_id: str, timeout_s: float = 3600.0, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED/FAILED/STOPPED; returns the final status name."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


# -- CLI --------------------------------------------------------------------------------------

def _check_env(kv: str) -> None:
    if "=" not in kv:
        raise ValueError("expected KEY=VALUE")


@dataclass
class SubmitOptions:
    """`psp submit`'s and `psp jobs`' options (`--address` is both's)."""

    address: str | None = shared("address", scope=("submit", "jobs"))
    submission_id: str | None = option(
        None, "idempotency key; a used id is refused (nightly default: date + OUTPUT)", scope="submit")
    working_dir: str = option(str(PROJECT_ROOT), "code shipped with the job", scope="submit")
    runtime_env: str = option(str(DEFAULT_RUNTIME_ENV),
                              "YAML runtime_env merged under working_dir (no pip/conda: use the image)",
                              scope="submit")
    env: list[str] | None = option(None, "extra environment variable for the job (repeatable)", kind="append",
                                   check=_check_env, metavar="KEY=VALUE", scope="submit")
    entrypoint_num_cpus: float | None = option(None, "CPUs reserved for the job's driver", parse=float,
                                               minimum=0, scope="submit")
    wait: bool = option(False, "wait for the job to finish, print its logs", kind="flag", scope="submit")
    follow: bool = option(False, "logs: follow until the job ends", kind="flag", scope="jobs")


def register(subparsers: Any) -> None:
    """Add ``psp submit`` and ``psp jobs`` to the `psp` CLI's subparsers."""
    s = subparsers.add_parser(
        "submit",
        help="submit `psp invert|nightly|train ...` to a Ray cluster (Ray Jobs API)",
        description="Submit a psp command as a Ray job. Put the command after '--'.",
    )
    add_arguments(s, SubmitOptions, scopes=("submit",))
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- invert|nightly|train ARGS...")
    s.set_defaults(func=_main_submit)

    j = subparsers.add_parser("jobs", help="status, logs, stop or list Ray jobs")
    j.add_argument("action", choices=["status", "logs", "stop", "list"])
    j.add_argument("submission_id", nargs="?", default=None)
    add_arguments(j, SubmitOptions, scopes=("jobs",))
    j.set_defaults(func=_main_jobs)


def _main_submit(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    env_vars = dict(kv.split("=", 1) for kv in args.env or ())
    try:
        ns = check_entrypoint(command)
        for warning in local_path_warnings(ns):
            print(f"psp submit: warning: {warning}", file=sys.stderr)
        sid = submit(
            command,
            address=args.address,
            submission_id=args.submission_id,
            working_dir=args.working_dir,
            runtime_env_file=args.runtime_env,
            env_vars=env_vars or None,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
        )
    except SubmitError as exc:
        print(f"psp submit: error: {exc}", file=sys.stderr)
        return 2
    print(sid)
    if args.wait:
        client = _client(args.address)
        status = wait(client, sid)
        print(client.get_job_logs(sid), end="")
        print(f"job {sid}: {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _main_jobs(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.submission_id:
        print(f"psp jobs {args.action}: error: give the submission id", file=sys.stderr)
        return 2
    try:
        client = _client(args.address)
        if args.action == "list":
            for info in client.list_jobs():
                print(f"{info.submission_id}\t{info.status}\t{info.entrypoint}")
        elif args.action == "status":
            info = client.get_job_info(args.submission_id)
            print(json.dumps({"submission_id": info.submission_id, "status": str(info.status.value),
                              "message": info.message, "entrypoint": info.entrypoint}))
        elif args.action == "logs":
            if args.follow:
                import asyncio

                async def _tail() -> None:
                    async for chunk in client.tail_job_logs(args.submission_id):
                        print(chunk, end="", flush=True)

                asyncio.run(_tail())
            else:
                print(client.get_job_logs(args.submission_id), end="")
        else:
            stopped = client.stop_job(args.submission_id)
            print("stopping" if stopped else "not running (already finished)")
    except SubmitError as exc:
        print(f"psp jobs: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the SDK's "job does not exist" and HTTP errors
        print(f"psp jobs {args.action} {args.submission_id}: error: {exc}", file=sys.stderr)
        return 2
    return 0
