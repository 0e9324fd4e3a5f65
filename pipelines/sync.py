"""What makes N data-parallel workers train exactly like one worker with an N times larger batch.

Two things in pSp's training step depend on the whole batch, not on each sample alone:

- the encoder's BatchNorm layers (train mode: batch statistics). `torch.nn.SyncBatchNorm` only
  runs on GPU/XPU inputs, so on CPU (Gloo) `CrossWorkerBatchNorm` all-reduces the per-channel sum
  and count, then the sum of squared deviations (two passes, as `F.batch_norm` computes them), with
  an autograd-aware all-reduce: each worker's backward then sees the gradient of every worker's
  loss through the shared statistics, as one worker with the whole batch would;
- the StyleGAN2 decoder's random noise, drawn from the process's generator as `[B, 1, H, W]`:
  with another batch split, each sample would get other noise. `PerSampleNoise` draws each
  sample's noise map from its own generator, seeded by (run seed, the sample's global number, the
  layer), so a sample gets the same noise whichever worker trains it and after a restart.

Nothing here imports Ray: the worker group is a `torch.distributed` process group.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from psp_core.stylegan2 import NoiseInjection

__all__ = ["CrossWorkerBatchNorm", "PerSampleNoise", "synchronize_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; backward sums the gradients (each worker's loss depends on every
    worker's input through the sum), as SyncBatchNorm's backward does."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(t, group)


class CrossWorkerBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode statistics cover the batch of every worker in `group`.

    Same parameters, buffers and state-dict keys as the BatchNorm it replaces (`from_batchnorm`
    shares them), so checkpoints are unchanged. In eval mode, or without a process group of more
    than one worker, it is `F.batch_norm`.
    """

    group = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, group=None) -> "CrossWorkerBatchNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(new, name, getattr(bn, name))
        new.weight, new.bias = bn.weight, bn.bias  # the same Parameter objects: optimizers keep working
        new.register_buffer("running_mean", bn.running_mean)
        new.register_buffer("running_var", bn.running_var)
        new.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        new.training = bn.training
        new.group = group
        return new

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._world() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_n = x.numel() // x.shape[1]
        # pass 1: global mean
        stats = torch.cat([x.sum(dim=dims), x.new_tensor([float(local_n)])])
        stats = _all_reduce(stats, self.group)
        n = stats[-1].detach()
        mean = stats[:-1] / n
        # pass 2: global biased variance (sum of squared deviations)
        centered = x - mean.view(shape)
        var = _all_reduce(centered.square().sum(dim=dims), self.group) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                count = float(n)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (count / max(count - 1.0, 1.0)), alpha=m)
        return y


def synchronize_batchnorm(module: nn.Module, device: torch.device, group=None) -> nn.Module:
    """Make every BatchNorm in `module` (in place) compute train-mode statistics over all workers:
    `torch.nn.SyncBatchNorm` on CUDA, `CrossWorkerBatchNorm` elsewhere. Parameters and buffers are
    shared with the replaced layers (optimizers built before keep their parameters)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CrossWorkerBatchNorm):
            setattr(module, name, CrossWorkerBatchNorm.from_batchnorm(child, group))
        else:
            synchronize_batchnorm(child, device, group)
    return module


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PerSampleNoise:
    """Per-sample decoder noise for `module`'s `NoiseInjection` layers (StyleGAN2's noise inputs).

    `set_samples(ids)` before a forward names the global sample numbers of the batch's rows; each
    layer then gets noise `[B, 1, H, W]` whose row i is standard normal from a generator seeded by
    (seed, ids[i], layer). Layers given explicit noise (`randomize_noise=False`) are left alone,
    and so is every forward while no samples are set (validation, image grids).
    """

    def __init__(self, module: nn.Module, seed: int):
        self.seed = int(seed)
        self.samples: list[int] | None = None
        self.handles = []
        layers = [m for m in module.modules() if isinstance(m, NoiseInjection)]
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))

    def set_samples(self, ids: Sequence[int] | None) -> None:
        self.samples = None if ids is None else [int(i) for i in ids]

    def _hook(self, layer: int):
        def hook(_module, args, kwargs):
            if self.samples is None or kwargs.get("noise") is not None or (len(args) > 1 and args[1] is not None):
                return None
            image = args[0] if args else kwargs["image"]
            batch, _, height, width = image.shape
            if batch != len(self.samples):
                raise RuntimeError(f"noise for {len(self.samples)} samples set, the batch has {batch}")
            device = image.device  # drawn where the model runs (CPU and GPU draws differ; each is seeded)
            maps = [
                torch.randn(1, 1, height, width, device=device,
                            generator=torch.Generator(device=device).manual_seed(_seed(self.seed, s, layer)))
                for s in self.samples
            ]
            kwargs = dict(kwargs)
            kwargs["noise"] = torch.cat(maps).to(dtype=image.dtype)
            return (args[:1], kwargs)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
