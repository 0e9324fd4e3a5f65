"""The deployment manifests under infra/: they parse, pin the project's Ray, ask for the right
hardware, and run real `psp` commands (checked with the CLI's own argparse parser)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.submit import EXCLUDES, build_runtime_env, check_entrypoint, command_locations, load_runtime_env

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


def _pins() -> dict[str, str]:
    """Exact versions from constraints.txt (pyproject.toml holds compatible ranges)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


RAY = _pins()["ray"]
TORCH = _pins()["torch"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay(kind: str) -> dict:
    found = [d for p in sorted((INFRA / "kuberay").glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} manifest under infra/kuberay, found {len(found)}"
    return found[0]


def _cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("RayCluster", _kuberay("RayCluster")["spec"]),
        ("RayJob", _kuberay("RayJob")["spec"]["rayClusterSpec"]),
        ("RayCronJob", _kuberay("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"]),
    ]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_every_manifest_parses():
    paths = sorted(INFRA.rglob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        assert _docs(path), f"{path} is empty"


def test_dockerfile_has_cpu_and_cuda_images_on_the_pinned_ray_and_torch():
    text = (INFRA / "Dockerfile").read_text()
    froms = dict(
        (m.group(2), m.group(1)) for m in re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M)
    )
    froms.pop("src", None)  # the sources stage (FROM scratch) both images copy from
    assert "-c constraints.txt" in text  # the images install the same exact pins as CI
    assert froms == {
        "cpu": f"rayproject/ray:{RAY}-py311-cpu",
        "cuda": f"rayproject/ray:{RAY}-py311-gpu",
    }
    torch_installs = re.findall(r"pip install[^\n]*torch==(\S+)", text)
    assert torch_installs and set(torch_installs) == {TORCH}
    cpu_stage = text.split("AS cuda")[0]
    assert "download.pytorch.org/whl/cpu" in cpu_stage  # no CUDA wheel in the CPU image
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert "*.pt" in ignore and ".venv" in ignore  # weights and venvs never enter the context


def test_both_images_keep_idle_ray_workers_as_a_local_run_does():
    from pipelines.dataflow import RAY_WORKER_ENV

    text = (INFRA / "Dockerfile").read_text()
    cpu, cuda = text.split("AS cpu")[1].split("AS cuda")
    for stage in (cpu, cuda):
        for name, value in RAY_WORKER_ENV.items():
            assert re.search(rf"^\s*(ENV\s+)?{name}={value}\b", stage, re.M), f"{name}={value} not set in {stage[:40]}"


@pytest.mark.parametrize("kind,spec", _cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_clusters_pin_ray_enable_token_auth_and_split_cpu_align_from_gpu_model_workers(kind, spec):
    assert spec["rayVersion"] == RAY
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # drivers only: no pipeline work on the head
    images = [c["image"] for c in _containers(head)]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"align-cpu", "model-gpu"}
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in _containers(group):
            images.append(c["image"])
            gpus = {k: str(v) for k, v in c["resources"].get("limits", {}).items()}.get("nvidia.com/gpu")
            if name == "model-gpu":
                assert gpus == "1" and c["image"].endswith("-cuda")
                assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
            else:
                assert gpus is None and c["image"].endswith("-cpu")
    for image in images:
        assert f"ray{RAY}" in image.rsplit(":", 1)[1], f"{kind} image {image} is not tagged for Ray {RAY}"


def _entrypoint_args(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "psp", f"entrypoint {entrypoint!r} must run the installed psp CLI"
    return argv[1:]


def test_rayjob_entrypoint_is_a_real_psp_invert_command():
    spec = _kuberay("RayJob")["spec"]
    ns = check_entrypoint(_entrypoint_args(spec["entrypoint"]))
    assert ns.command == "invert"
    locations = command_locations(ns)
    assert all(v.startswith("s3://") for vs in locations.values() for v in vs)
    assert spec["shutdownAfterJobFinishes"] is True


def test_raycronjob_runs_psp_nightly_every_night_with_token_auth():
    cron = _kuberay("RayCronJob")["spec"]
    fields = cron["schedule"].split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"]  # once a day
    job = cron["jobTemplate"]
    argv = _entrypoint_args(job["entrypoint"])
    assert argv[0] == "nightly"
    ns = check_entrypoint(argv)
    assert ns.command == "nightly"
    assert all(v.startswith("s3://") for vs in command_locations(ns).values() for v in vs)
    assert job["shutdownAfterJobFinishes"] is True
    assert job["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_cluster_launcher_uses_spot_gpu_workers_and_pinned_images():
    cfg = _docs(INFRA / "cluster-launcher" / "aws-spot-gpu.yaml")[0]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is on-demand
    gpu = [t for t in types.values() if t.get("docker", {}).get("worker_image", "").endswith("-cuda")]
    assert gpu, "no node type runs the CUDA image"
    for t in gpu:
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert t["node_config"]["InstanceType"].startswith(("g", "p"))  # an AWS GPU family
    images = [cfg["docker"]["head_image"], cfg["docker"]["worker_image"]] + [
        t["docker"]["worker_image"] for t in types.values() if "docker" in t
    ]
    assert all(f"ray{RAY}" in i for i in images)
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])


def test_runtime_env_never_uploads_weights_and_installs_nothing():
    base = load_runtime_env(INFRA / "runtime_env.yaml")
    env = build_runtime_env(ROOT, base)
    assert env["working_dir"] == str(ROOT)
    for pattern in ("*.pt", "*.pth", "*.ckpt", ".venv/", ".git/"):
        assert pattern in env["excludes"]
    assert set(EXCLUDES) <= set(env["excludes"])
    assert not {"pip", "conda", "uv"} & set(env)
