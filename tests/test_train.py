"""`psp train` on real local Ray Train workers: what a user relies on when training on a cluster.

- 2 workers x batch b end with the same parameters as 1 worker x batch 2b (BatchNorm statistics
  and decoder noise do not depend on the split);
- a worker killed mid-run: the run resumes from its last checkpoint and ends where an
  uninterrupted run ends;
- the checkpoint a run writes loads in `psp invert` and inverts;
- a missing pretrained file stops the command before any work, naming its flag;
- the training data is an output table written by `psp invert --save-aligned`.

Small on purpose: output 32, the IR-SE50 backbone encoder with a W+ head (the smallest encoder
with BatchNorm), 2 steps (0 and 1, as the original counts), random weights in the official formats.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch

N_FACES = 4


def _images(folder, n):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        yy, xx = np.mgrid[0:96, 0:96]
        img = np.stack([(xx * (i + 2)) % 256, (yy * 3 + i * 40) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"face_{i}.png")
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random pretrained files in their published formats (no Ray)."""
    from psp_core.training.testing import random_training_weights

    return random_training_weights(tmp_path_factory.mktemp("weights"), output_size=32,
                                   which=("stylegan", "alexnet", "lpips", "ir_se50"))


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_checkpoint, weights, tmp_path_factory):
    """Random pretrained files, and an output table of aligned faces written by psp invert."""
    from pipelines.config import InvertConfig
    from pipelines.run import run_invert

    root = tmp_path_factory.mktemp("train")
    images = root / "images"
    _images(str(images), N_FACES)
    table = root / "faces"
    summary = run_invert(InvertConfig(input=str(images), output=str(table), checkpoint=tiny_checkpoint,
                                      align="none", save_aligned=True, images="none"))
    assert summary.counts == {"ok": N_FACES}
    yield {"root": root, "weights": weights, "images": str(images), "table": str(table)}
    shutil.rmtree(root, ignore_errors=True)  # checkpoints are hundreds of MB


def _config(setup, run_dir, **kw):
    from pipelines.train import TrainConfig

    w = setup["weights"]
    values = dict(
        data=setup["table"], run_dir=str(run_dir), output_size=32, encoder_type="BackboneEncoderUsingLastLayerIntoWPlus",
        start_from_latent_avg=True, batch_size=1, workers=2, max_steps=1, val_interval=1000, save_interval=1000,
        val_samples=2, device="cpu", data_cpus=0.25, max_failures=0, stylegan_weights=w.stylegan,
        alexnet_weights=w.alexnet, lpips_weights=w.lpips, ir_se50_weights=w.ir_se50, seed=3,
    )
    values.update(kw)
    return TrainConfig(**values)


def _state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_workers(setup):
    """2 workers x batch 1, steps 0..1, from the table: the reference run of the tests below."""
    from pipelines.train import run_train

    run_dir = setup["root"] / "two"
    result = run_train(_config(setup, run_dir))
    return {"dir": str(run_dir), "result": result}


@pytest.mark.slow
@pytest.mark.tier2
def test_two_workers_equal_one_worker_with_the_doubled_batch(setup, two_workers):
    from pipelines.train import run_train

    run_dir = setup["root"] / "one"
    one = run_train(_config(setup, run_dir, workers=1, batch_size=2))
    assert one.steps == two_workers["result"].steps == 1
    a = _state(os.path.join(run_dir, "checkpoints", "iteration_1.pt"))
    b = _state(os.path.join(two_workers["dir"], "checkpoints", "iteration_1.pt"))
    start = _state(os.path.join(run_dir, "checkpoints", "iteration_0.pt"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
            moved += int(not torch.equal(a[k], start[k]))
        else:
            assert torch.equal(a[k], b[k]), k
    assert moved > 10  # the parameters did train (BN running statistics included)
    # the losses of each step are the global batch's, whichever split computed them
    la = [r for r in _records(str(run_dir)) if r["split"] == "train"]
    lb = [r for r in _records(two_workers["dir"]) if r["split"] == "train"]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [0, 1]
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)


def _train_workers():
    from ray._private.state import actors

    return [a for a in actors(actor_state_name="ALIVE").values()
            if "RayTrainWorker" in a["ActorClassName"] and a["Pid"]]


@pytest.mark.slow
@pytest.mark.tier2
def test_a_killed_worker_resumes_from_the_last_checkpoint(setup, two_workers):
    from pipelines.train import run_train

    run_dir = setup["root"] / "killed"
    killed = []

    snapshot = run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"

    def has_checkpoint() -> bool:
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"] == 0
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def killer():
        # Once Ray Train has registered the step-0 checkpoint, SIGKILL a worker (as a lost node would).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not has_checkpoint():
            time.sleep(0.05)
        workers = _train_workers()
        if workers:
            os.kill(workers[-1]["Pid"], signal.SIGKILL)
            killed.append(workers[-1]["Pid"])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_train(_config(setup, run_dir, save_interval=1, max_failures=1))
    t.join(timeout=10)
    assert killed, "no worker was killed"
    assert result.steps == 1
    resumes = [r for r in _records(str(run_dir)) if r["split"] == "resume"]
    assert [r["restored_step"] for r in resumes] == [0]
    # each step logged once, and the end is the uninterrupted run's, parameter for parameter
    assert [r["step"] for r in _records(str(run_dir)) if r["split"] == "train"] == [0, 1]
    a = _state(os.path.join(run_dir, "checkpoints", "iteration_1.pt"))
    b = _state(os.path.join(two_workers["dir"], "checkpoints", "iteration_1.pt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.tier2
def test_the_checkpoint_loads_in_psp_invert_and_inverts(setup, two_workers, tmp_path):
    import schemas
    from jobs.cli import main
    from psp_core import load_psp

    ckpt = os.path.join(two_workers["dir"], "checkpoints", "iteration_1.pt")
    assert two_workers["result"].checkpoint.endswith("iteration_1.pt")
    net = load_psp(ckpt)  # weights_only=True inside
    assert net.n_styles == 8 and net.encoder_type == "BackboneEncoderUsingLastLayerIntoWPlus"
    out = tmp_path / "inverted"
    paths = sorted(glob.glob(os.path.join(setup["images"], "*.png")))[:2]
    assert main(["invert", *paths, str(out), "--checkpoint", ckpt, "--align", "none"]) == 0
    ids, w = schemas.read_latents(str(out))
    assert len(ids) == 2 and w.shape == (2, 8, 512) and np.isfinite(w).all()


def test_a_missing_weight_file_fails_before_any_work_naming_it(weights, tmp_path, capsys):
    from jobs.cli import main

    run_dir = tmp_path / "run"
    w = weights
    started = time.monotonic()
    code = main(["train", str(tmp_path), "--run-dir", str(run_dir), "--output-size", "32",
                 "--stylegan-weights", str(tmp_path / "stylegan2-ffhq-config-f.pt"),
                 "--alexnet-weights", w.alexnet, "--lpips-weights", w.lpips, "--id-lambda", "0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--stylegan-weights" in err and "stylegan2-ffhq-config-f.pt" in err and "does not exist" in err
    assert "--ir-se50-weights" in err and "not given" in err
    assert not run_dir.exists()
    assert time.monotonic() - started < 30  # no Ray start, no model built


@pytest.mark.slow
@pytest.mark.tier2
def test_training_data_from_an_output_table_is_its_aligned_faces(setup):
    from pipelines.train import TrainSamples, list_training_items
    from psp_core.training.options import TrainOptions

    items = list_training_items(setup["table"])
    assert len(items) == N_FACES and {i["column"] for i in items} == {"aligned_image"}
    stage = TrainSamples(items, TrainOptions(output_size=32).to_opts_dict(), seed=3)
    out = stage({"sample": np.arange(N_FACES + 1)})
    assert "source" not in out  # encode: the source is the target
    assert out["target"].shape == (N_FACES + 1, 256, 256, 3) and out["target"].dtype == np.uint8
    assert out["target"].std() > 10
    x, y = stage.tensors(out, torch.device("cpu"))
    assert x.shape == y.shape == (N_FACES + 1, 3, 256, 256) and -1.0 <= float(y.min()) < float(y.max()) <= 1.0
    # one epoch visits every face once, in a seeded order
    assert sorted(out["source_uri"][:N_FACES]) == sorted({i["source_uri"] for i in items})


def test_psp_submit_takes_a_training_command_and_warns_about_local_weights(tmp_path):
    from jobs.submit import SubmitError, check_entrypoint, local_path_warnings

    ns = check_entrypoint(["train", "s3://faces/table", "--run-dir", "s3://runs/one", "--workers", "8",
                           "--device", "cuda", "--stylegan-weights", "stylegan2.pt",
                           "--ir-se50-weights", "s3://w/model_ir_se50.pth"])
    assert ns.workers == 8 and ns.run_dir == "s3://runs/one"
    warnings = local_path_warnings(ns)
    assert len(warnings) == 1 and "stylegan2.pt" in warnings[0] and "never uploaded" in warnings[0]
    with pytest.raises(SubmitError):
        check_entrypoint(["train", "s3://faces/table"])  # no --run-dir
    with pytest.raises(SubmitError):
        check_entrypoint(["train", "s3://faces/table", "--run-dir", "r", "--optim", "sgd"])


@pytest.mark.slow
@pytest.mark.tier2
def test_resume_continues_a_finished_run_to_more_steps(setup, two_workers):
    """`--resume` (a new driver on the same run folder): Ray Train's snapshot gives the last
    checkpoint, and training goes on from the next step."""
    from pipelines.options import ConfigError
    from pipelines.train import run_train

    with pytest.raises(ConfigError, match="--resume"):
        run_train(_config(setup, two_workers["dir"], max_steps=2))  # the folder holds a run
    result = run_train(_config(setup, two_workers["dir"], max_steps=2, resume=True))
    assert result.steps == 2
    records = _records(two_workers["dir"])
    assert [(r["split"], r["step"]) for r in records if r["split"] in ("train", "resume")] == [
        ("train", 0), ("train", 1), ("resume", 1), ("train", 2)]
    assert os.path.exists(os.path.join(two_workers["dir"], "checkpoints", "iteration_2.pt"))


# -- what makes the worker split invisible (pipelines/sync.py), without Ray ------------------------

def _bn_net():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Conv2d(4, 2, 3),
                         nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3), nn.BatchNorm1d(3)).double()


def _bn_inputs():
    return torch.from_numpy(np.random.default_rng(1).normal(size=(4, 3, 8, 8)))


def _bn_worker(rank, port, queue):
    import torch.distributed as dist

    from pipelines.sync import synchronize_batchnorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net = synchronize_batchnorm(_bn_net(), torch.device("cpu"))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        ddp(_bn_inputs()[2 * rank:2 * rank + 2]).square().mean().backward()
        if rank == 0:
            queue.put(([p.grad.numpy().copy() for p in net.parameters()], [b.numpy().copy() for b in net.buffers()]))
    finally:
        dist.destroy_process_group()


def test_cross_worker_batchnorm_on_gloo_equals_one_worker_with_the_whole_batch():
    """SyncBatchNorm refuses CPU tensors; CrossWorkerBatchNorm gives 2 Gloo workers x 2 samples the
    gradients and running statistics of 1 worker x 4 (float64, to rounding)."""
    import multiprocessing as mp
    import socket

    net = _bn_net()
    net(_bn_inputs()).square().mean().backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bn_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads, buffers = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    for p, g in zip(net.parameters(), grads):
        np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-9, atol=1e-12)
    for b, got in zip(net.buffers(), buffers):
        np.testing.assert_allclose(b.numpy(), got, rtol=1e-9, atol=1e-12)


def test_decoder_noise_depends_on_the_sample_not_on_its_batch():
    from pipelines.sync import PerSampleNoise
    from psp_core.stylegan2 import Generator

    torch.manual_seed(0)
    gen = Generator(16, 512, 2)
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 0.1)
    noise = PerSampleNoise(gen, seed=5)
    w = torch.randn(2, gen.n_latent, 512)

    def run(rows, ids):
        noise.set_samples(ids)
        out, _ = gen([w[rows]], input_is_latent=True)
        return out

    both = run([0, 1], [10, 11])
    alone = torch.cat([run([0], [10]), run([1], [11])])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run([0], [12]), both[:1])  # another sample, other noise
    noise.set_samples(None)
    torch.manual_seed(1)
    a, _ = gen([w[:1]], input_is_latent=True)
    torch.manual_seed(2)
    b, _ = gen([w[:1]], input_is_latent=True)
    assert not torch.allclose(a, b)  # without samples set, the generator's own random noise


def test_fine_tuning_a_checkpoint_needs_its_model_flags(weights, tiny_checkpoint, tmp_path):
    from pipelines.options import ConfigError
    from pipelines.train import TrainConfig, check_train_config

    base = dict(data=str(tmp_path), run_dir=str(tmp_path / "run"), checkpoint=tiny_checkpoint,
                alexnet_weights=weights.alexnet, lpips_weights=weights.lpips)
    with pytest.raises(ConfigError, match="--output-size 32"):
        check_train_config(TrainConfig(**base))  # the tiny checkpoint is a 32x32 model
    opts = check_train_config(TrainConfig(**base, output_size=32, start_from_latent_avg=True))
    assert opts.checkpoint_path == tiny_checkpoint and opts.output_size == 32


@pytest.mark.slow
@pytest.mark.tier2
def test_the_run_folder_on_object_storage(s3_server):
    """RUN_DIR on S3: metrics rewritten whole (no appends on object stores), cut back to the
    restored step after a restart, checkpoints in the official format."""
    import io

    from pipelines.train import RunFolder, TrainConfig, _storage

    bucket = s3_server.make_bucket("runs")
    uri = f"s3://{bucket}/ffhq-1"
    run = RunFolder(uri, s3_server.storage_options)
    for step in range(3):
        run.log({"step": step, "split": "train", "loss": 1.0 / (step + 1)})
    url = run.save_checkpoint("checkpoints/iteration_2.pt", {"state_dict": {"w": torch.ones(2)}, "opts": {"a": 1}})
    assert url == f"s3://{bucket}/ffhq-1/checkpoints/iteration_2.pt"
    fs = s3_server.filesystem()
    ckpt = torch.load(io.BytesIO(fs.cat_file(url)), weights_only=True)
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    again = RunFolder(uri, s3_server.storage_options)
    again.read_records(upto_step=1)  # a restart from the step-1 checkpoint
    again.log({"step": 2, "split": "train", "loss": 0.25})
    lines = fs.cat_file(f"{bucket}/ffhq-1/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [1.0, 0.5, 0.25]
    assert fs.cat_file(f"{bucket}/ffhq-1/metrics.csv").decode().splitlines()[0] == "step,split,loss"
    path, filesystem = _storage(TrainConfig(data="x", run_dir=uri, storage_options=s3_server.storage_options))
    assert path == f"{bucket}/ffhq-1/ray" and filesystem is not None
    assert all(".tmp-" not in p for p in fs.find(f"{bucket}/ffhq-1"))  # no temporary files left
