"""Invert stage: aligned crops -> W+ -> reconstructed image, as output-schema-v1 tables.

`InvertFaces` is a plain callable class on a batch dict that loads `psp_core.load_psp(checkpoint)`
once (per Ray actor). Per batch it applies the task transform, runs `PSP.encode` / `PSP.decode`
(or `PSP.mix` with `--mix`), encodes the output image (PNG/JPEG, 256 or full size), computes metrics
when asked and returns a pyarrow table built by `schemas.columns_to_table`, so every output file has
the same schema. Rows that failed upstream keep their status; a failure here becomes
'invert_error' for the rows concerned (a failing batch is retried row by row to isolate them).

`invert_resources` is the (pure) decision of what the invert actors ask Ray for.
"""
from __future__ import annotations

import io
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_GPU_BATCH = 32
DEFAULT_CPU_BATCH = 8


def invert_resources(
    cluster_resources: Mapping[str, float],
    device: str = "auto",
    gpus: int | None = None,
    cpu_actors: int = 1,
) -> dict[str, Any]:
    """What each invert actor requests, and how many there may be.

    cluster_resources: `ray.cluster_resources()` (e.g. {"CPU": 16.0, "GPU": 2.0}).
    device: 'auto' | 'cpu' | 'cuda'. gpus: at most this many GPU actors (None: every GPU).
    Returns {"device": 'cuda'|'cpu', "num_gpus": 1 or 0, "num_cpus": float, "actors": int}.
    GPU actors (one GPU each) when the cluster has GPUs and device is not 'cpu'; otherwise CPU
    actors with a fractional CPU request (the actor sets its own torch thread count), so read and
    align tasks are not starved on small machines. `--device cuda` with `--gpus N` asks for N GPUs
    even if none are up yet (an autoscaling cluster adds them); without GPUs and without --gpus it
    is a ValueError.
    """
    n_gpus = int(cluster_resources.get("GPU", 0) or 0)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected auto, cpu or cuda")
    if gpus is not None and gpus < 0:
        raise ValueError(f"gpus={gpus}: expected >= 0")
    if device == "cpu" or gpus == 0 or (device == "auto" and n_gpus == 0):
        return {"device": "cpu", "num_gpus": 0, "num_cpus": 0.5, "actors": max(1, int(cpu_actors))}
    if n_gpus == 0 and gpus is None:
        raise ValueError(
            "--device cuda but the Ray cluster has no GPUs: use --device auto/cpu, connect to a cluster "
            "with GPU nodes, or pass --gpus N to wait for an autoscaler to add them"
        )
    actors = gpus if gpus is not None else n_gpus
    if n_gpus and gpus is not None:
        actors = min(gpus, n_gpus)
    return {"device": "cuda", "num_gpus": 1, "num_cpus": 1, "actors": max(1, actors)}


def encode_image(rgb: np.ndarray, fmt: str) -> bytes | None:
    """uint8 HxWx3 -> PNG/JPEG bytes (None for 'none')."""
    if fmt == "none":
        return None
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class InvertFaces:
    """Batch dict stage: the align stage's columns -> a v1 output table (one row per input row).

    checkpoint: path or fsspec URI of the pSp checkpoint (loaded once, here).
    task: dataset_type (transform). device: 'auto' (cuda if this process sees one), 'cpu', 'cuda'.
    images: 'png' | 'jpeg' | 'none'. image_size: '256' | 'full'. metrics: mse/psnr/ssim (and
    identity distance when `psp_core.identity` is available) between the aligned crop and the
    256x256 reconstruction, for photo tasks. mix/latent_mask/mix_alpha/seed: style mixing, seeds
    per row from (seed, image_id). resize_factor: super-resolution factor. save_aligned: store the
    aligned crop (PNG). cpu_threads: torch threads on CPU (None: all cores of the node).
    """

    def __init__(
        self,
        checkpoint: str,
        task: str,
        run_id: str,
        device: str = "auto",
        storage_options: Mapping[str, Any] | None = None,
        images: str = "png",
        image_size: str = "256",
        metrics: bool = False,
        mix: int = 0,
        latent_mask: Sequence[int] | None = None,
        mix_alpha: float | None = None,
        seed: int = 0,
        resize_factor: int | None = None,
        save_aligned: bool = False,
        cpu_threads: int | None = None,
        code_version: str | None = None,
        stage_clock: Any = None,
    ):
        import torch

        from pipelines.config import code_version as _code_version
        from psp_core import load_psp
        from psp_core.tasks import get_task

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; the model is the bottleneck here.
            torch.set_num_threads(cpu_threads or max(1, os.cpu_count() or 1))
        if device == "cuda":
            # Fidelity: fp32 convolutions and matmuls in full precision (TF32 would move outputs by
            # ~1e-3, past the 1e-4 promise of matching the original).
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.device = device
        self.model = load_psp(checkpoint, device=device, storage_options=storage_options)
        self.task = get_task(task)
        self.run_id = run_id
        self.images = images
        self.full_size = str(image_size) == "full"
        self.metrics = metrics
        self.mix = int(mix or 0)
        self.latent_mask = list(latent_mask) if latent_mask is not None else None
        self.mix_alpha = mix_alpha
        self.seed = int(seed)
        self.resize_factor = resize_factor
        self.save_aligned = save_aligned
        self.code_version = code_version or _code_version()
        self.stage_clock = stage_clock
        self._identity = None
        self._identity_error: str | None = None

    # -- per-row helpers ------------------------------------------------------------------------
    def _transform(self, crop: np.ndarray):
        from PIL import Image

        return self.task.transform(Image.fromarray(crop, "RGB"), factor=self.resize_factor)

    def _run_model(self, x, seeds: list[int]) -> dict[str, Any]:
        """x [B,C,256,256] -> numpy results: w_plus [B,n,512], images [B,3,H,W], images256,
        mix_w_plus [B,N,n,512], mix_images [B,N,3,H,W]."""
        import torch

        model = self.model
        with torch.inference_mode():
            x = x.to(model.device)
            w_plus = model.encode(x)
            images = model.decode(w_plus, resize=not self.full_size)
            out = {"w_plus": w_plus.float().cpu().numpy(), "images": images.float().cpu().numpy()}
            if self.metrics and self.task.label_nc == 0:
                small = model.face_pool(images) if self.full_size else images
                out["images256"] = small.float().cpu().numpy()
            if self.mix:
                mix_images, mix_w = model.mix(
                    None, self.mix, self.latent_mask, mix_alpha=self.mix_alpha, seed=seeds,
                    resize=not self.full_size, w_plus=w_plus,
                )
                out["mix_images"] = mix_images.float().cpu().numpy()
                out["mix_w_plus"] = mix_w.float().cpu().numpy()
        return out

    def _identity_distance(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """dlib face-descriptor distance between two uint8 crops (None if unavailable)."""
        if self._identity_error is not None:
            return None
        try:
            from psp_core.identity import identity_distance

            if self._identity is None:
                from psp_core.identity import FaceDescriptor

                self._identity = FaceDescriptor()
            value = identity_distance(a, b, self._identity, aligned=True)  # both are aligned crops
        except Exception as e:  # identity is optional: record why once, keep going
            self._identity_error = f"{type(e).__name__}: {e}"
            return None
        return _nan_to_none(value)

    # -- the stage --------------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, np.ndarray]):
        import torch

        from psp_core.tasks import tensor2im
        from schemas import columns_to_table, image_id_for

        start = time.perf_counter()
        uris = [str(u) for u in batch["source_uri"]]
        n = len(uris)
        ids = [image_id_for(u) for u in uris]
        status = [str(s) for s in batch["status"]]
        error = [str(e) if e else None for e in batch["error"]]
        aligned = np.asarray(batch["aligned"])
        cols: dict[str, list] = {
            name: [None] * n
            for name in ("w_plus", "output_image", "image_format", "aligned_image", "mix_w_plus",
                         "mix_images", "mse", "psnr", "ssim", "identity_distance")
        }

        # Transform per row (a bad crop fails only its row).
        todo, tensors = [], []
        for i in range(n):
            if status[i] != "ok":
                continue
            try:
                tensors.append(self._transform(aligned[i]))
                todo.append(i)
            except Exception as e:
                status[i], error[i] = "invert_error", f"{uris[i]}: input transform failed ({type(e).__name__}: {e})"

        from pipelines.config import row_seed

        results: dict[int, dict[str, Any]] = {}
        if todo:
            seeds = [row_seed(self.seed, ids[i]) for i in todo]
            try:
                out = self._run_model(torch.stack(tensors), seeds)
                for k, i in enumerate(todo):
                    results[i] = {name: v[k] for name, v in out.items()}
            except Exception:
                for k, i in enumerate(todo):  # isolate the failing row(s)
                    try:
                        out = self._run_model(tensors[k][None], [seeds[k]])
                        results[i] = {name: v[0] for name, v in out.items()}
                    except Exception as e:
                        status[i] = "invert_error"
                        error[i] = f"{uris[i]}: inversion failed ({type(e).__name__}: {e})"

        fmt = self.images
        for i, r in results.items():
            try:
                cols["w_plus"][i] = r["w_plus"]
                if fmt != "none":
                    cols["output_image"][i] = encode_image(tensor2im(r["images"]), fmt)
                cols["image_format"][i] = fmt
                if self.save_aligned:
                    cols["aligned_image"][i] = encode_image(aligned[i], "png")
                if self.mix:
                    cols["mix_w_plus"][i] = r["mix_w_plus"]
                    cols["mix_images"][i] = (
                        None if fmt == "none" else [encode_image(tensor2im(m), fmt) for m in r["mix_images"]]
                    )
                if "images256" in r:
                    from psp_core import metrics

                    recon = tensor2im(r["images256"])
                    cols["mse"][i] = _nan_to_none(metrics.mse(aligned[i], recon))
                    cols["psnr"][i] = _nan_to_none(metrics.psnr(aligned[i], recon))
                    cols["ssim"][i] = _nan_to_none(metrics.ssim(aligned[i], recon))
                    cols["identity_distance"][i] = self._identity_distance(aligned[i], recon)
            except Exception as e:
                status[i] = "invert_error"
                error[i] = f"{uris[i]}: output encoding failed ({type(e).__name__}: {e})"
                for name in cols:
                    cols[name][i] = None

        ok = [s == "ok" for s in status]
        has_face = [not np.isnan(np.asarray(batch["quad"][i])).any() for i in range(n)]
        columns = {
            "image_id": ids,
            "source_uri": uris,
            "source_sha256": [str(v) if v else None for v in batch["source_sha256"]],
            "source_width": _ints(batch["source_width"]),
            "source_height": _ints(batch["source_height"]),
            "status": status,
            "error": [None if ok[i] else error[i] or status[i] for i in range(n)],
            "face_score": [_nan_to_none(float(batch["face_score"][i])) for i in range(n)],
            "landmarks": [np.asarray(batch["landmarks"][i]) if has_face[i] else None for i in range(n)],
            "quad": [np.asarray(batch["quad"][i]) if has_face[i] else None for i in range(n)],
            "task": [self.task.name] * n,
            **cols,
            "checkpoint_sha256": [self.model.checkpoint_sha256] * n,
            "code_version": [self.code_version] * n,
            "run_id": [self.run_id] * n,
        }
        table = columns_to_table(columns, self.model.n_styles)
        if self.stage_clock is not None:
            self.stage_clock.record(
                "invert", n, time.perf_counter() - start, statuses=Counter(status),
                meta={"checkpoint_sha256": self.model.checkpoint_sha256},
            )
        return table


def _ints(values) -> list[int | None]:
    """-1 / None / NaN -> None (the stages use -1 for 'unknown')."""
    out = []
    for v in values:
        try:
            v = int(v)
        except (TypeError, ValueError):
            v = -1
        out.append(v if v >= 0 else None)
    return out
