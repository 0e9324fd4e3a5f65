"""One pSp training process without Ray: the original ``training/coach.py`` minus its data loading
and logging, as a small object the Ray Train loop (or any loop) drives step by step.

    trainer = PspTrainer(opts, weights, device="cuda", seed=0)
    for x, y in batches:                      # float [B, input_nc, 256, 256], [B, 3, 256, 256]
        losses = trainer.train_step(x, y)     # {'loss_l2': ..., 'loss': ...}
    torch.save(trainer.checkpoint_dict(), "iteration_1000.pt")   # loads with psp_core.load_psp

Faithful to the original on the same weights, batch and random state: the model is built and
initialised as ``pSp.load_weights`` does, the forward pass is ``net(x, return_latents=True)`` (train
mode, random noise), the loss is ``Coach.calc_loss`` and the optimizer ``configure_optimizers``.
Deviation (numerically neutral): with ``train_decoder`` off the decoder's parameters do not
require gradients (the original computes and discards them), so DDP syncs only what is trained.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from psp_core.checkpoint import CheckpointError, read_checkpoint
from psp_core.psp import PSP
from psp_core.training.losses import PspLoss
from psp_core.training.optim import configure_optimizer
from psp_core.training.options import TrainOptions
from psp_core.training.weights import TrainingWeights

__all__ = ["PspTrainer", "build_training_net", "MEAN_LATENT_SAMPLES"]

#: Samples the original averages for latent_avg when the generator file has none.
MEAN_LATENT_SAMPLES = 100_000


def _prefixed(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The original ``get_keys``: entries under ``name.`` with the prefix removed."""
    return {k[len(name) + 1:]: v for k, v in state.items() if k[: len(name)] == name}


def _model_opts(opts: TrainOptions) -> dict[str, Any]:
    return {
        "encoder_type": opts.encoder_type, "input_nc": opts.input_nc, "output_size": opts.output_size,
        "start_from_latent_avg": opts.start_from_latent_avg, "learn_in_w": opts.learn_in_w,
        "dataset_type": opts.dataset_type, "label_nc": opts.label_nc,
    }


def build_training_net(opts: TrainOptions, weights: TrainingWeights, seed: int | None = None) -> PSP:
    """The pSp network as the original coach starts it (on the CPU).

    From ``opts.checkpoint_path``: encoder and decoder loaded strictly, ``latent_avg`` as stored.
    Otherwise: the encoder keeps PyTorch's default init except the IR-SE50 tensors it shares with
    ``weights.ir_se50`` (all but the input layer when ``label_nc != 0``), the decoder gets the
    generator's ``g_ema`` and ``latent_avg`` is the generator's average W repeated to
    ``[1, 512]`` (``learn_in_w``) or ``[n_styles, 512]``. Without a stored average, the mean W of
    100,000 random z (``decoder.mean_latent``, drawn from ``seed`` when given) as the coach does,
    but only when ``start_from_latent_avg`` uses it (the coach computes it regardless; without
    the option nothing reads or saves it, and it costs 100,000 mapping-network passes).
    """
    net = PSP(_model_opts(opts))
    latent_avg = None
    if opts.checkpoint_path is not None:
        ckpt, _ = read_checkpoint(opts.checkpoint_path, weights.storage_options)
        if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
            raise CheckpointError(f"checkpoint_path {opts.checkpoint_path!r} is not a pSp checkpoint (no 'state_dict')")
        net.encoder.load_state_dict(_prefixed(ckpt["state_dict"], "encoder"), strict=True)
        net.decoder.load_state_dict(_prefixed(ckpt["state_dict"], "decoder"), strict=True)
        if "latent_avg" in ckpt:
            latent_avg = ckpt["latent_avg"].detach().float().clone()
    else:
        encoder_state = weights.load_ir_se50()
        if opts.label_nc != 0:  # not an RGB input: the input layer keeps its init
            encoder_state = {k: v for k, v in encoder_state.items() if "input_layer" not in k}
        net.encoder.load_state_dict(encoder_state, strict=False)
        generator = weights.load_stylegan(opts)
        net.decoder.load_state_dict(generator["g_ema"], strict=False)
        if "latent_avg" in generator:
            latent_avg = generator["latent_avg"].detach().float().clone().repeat(
                1 if opts.learn_in_w else opts.n_styles, 1)
    if latent_avg is None and opts.start_from_latent_avg:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            latent_avg = net.decoder.mean_latent(MEAN_LATENT_SAMPLES, generator=gen)[0].detach()
    net.latent_avg = latent_avg
    return net


class PspTrainer:
    """pSp training state on one device: ``net``, the loss, the optimizer and the step count.

    Args:
        opts: the original's training options (``opts.check()`` is applied).
        weights: the pretrained files; ``weights.check(opts)`` runs first, so a missing file is
            reported before anything is built.
        device: where the model and losses run.
        seed: seeds torch's global RNG (the random noise of the generator, as the original draws
            it) and the ``mean_latent`` fallback; None leaves the RNG alone.

    Attributes:
        net: the ``PSP`` model (train mode). forward_module: what ``train_step`` calls,
        ``net`` by default; a distributed wrapper (DDP around ``net``) may replace it.
        loss_fn: ``PspLoss``. optimizer: Ranger or Adam. step: optimizer steps taken.
        last_y_hat: the detached output of the last ``train_step`` (for image grids).
    """

    def __init__(self, opts: TrainOptions, weights: TrainingWeights, device: str | torch.device = "cpu",
                 seed: int | None = None):
        opts.check()
        weights.check(opts)
        self.opts = opts
        self.weights = weights
        self.device = torch.device(device)
        if seed is not None:
            torch.manual_seed(seed)
        self.net: PSP = build_training_net(opts, weights, seed).to(self.device)
        if not opts.train_decoder:
            self.net.decoder.requires_grad_(False)
        self.net.train()
        self.forward_module: nn.Module = self.net
        self.loss_fn = PspLoss(opts, weights).to(self.device)
        self.optimizer = configure_optimizer(self.net, opts.optim_name, opts.learning_rate, opts.train_decoder)
        self.step = 0
        self.last_y_hat: torch.Tensor | None = None
        self.last_id_logs: list[dict[str, float]] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, weights: TrainingWeights, opts: TrainOptions | None = None,
                        device: str | torch.device = "cpu", seed: int | None = None, **overrides: Any) -> "PspTrainer":
        """Fine-tune an existing pSp checkpoint (the original's ``--checkpoint_path``).

        ``opts`` None takes the checkpoint's stored options (unknown keys ignored); ``overrides``
        then replace single options (e.g. ``learning_rate=1e-5, max_steps=1000``).
        """
        path = os.fspath(path)
        if opts is None:
            ckpt, _ = read_checkpoint(path, weights.storage_options)
            stored = ckpt.get("opts") if isinstance(ckpt, Mapping) else None
            if not isinstance(stored, Mapping):
                raise CheckpointError(f"checkpoint {path!r} has no 'opts': pass opts= to from_checkpoint")
            opts = TrainOptions.from_dict(stored, strict=False)
        values = {**{f: getattr(opts, f) for f in opts.__dataclass_fields__}, **overrides, "checkpoint_path": path}
        return cls(TrainOptions(**values), weights, device=device, seed=seed)

    # -- training ---------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a batch, as one iteration of ``Coach.train``.

        Args:
            x: source ``[B, input_nc, 256, 256]``; y: target ``[B, 3, 256, 256]`` (moved to the
                device and made float32, as the original).

        Returns:
            the loss dict of ``Coach.calc_loss`` (floats; ``loss`` is the total).
        """
        self.net.train()
        x, y = x.to(self.device).float(), y.to(self.device).float()
        self.optimizer.zero_grad()
        y_hat, latent = self.forward_module(x, return_latents=True)
        loss, loss_dict, id_logs = self.loss_fn(x, y, y_hat, latent, self.net.latent_avg)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.last_y_hat = y_hat.detach()
        self.last_id_logs = id_logs
        return loss_dict

    @torch.no_grad()
    def validate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Mean of each loss over ``batches`` in eval mode, as ``Coach.validate`` (without its
        step-0 shortcut that stops after five batches and reports nothing). ``{}`` for no batches."""
        self.net.eval()
        try:
            dicts = []
            for x, y in batches:
                x, y = x.to(self.device).float(), y.to(self.device).float()
                y_hat, latent = self.forward_module(x, return_latents=True)
                _, loss_dict, _ = self.loss_fn(x, y, y_hat, latent, self.net.latent_avg)
                dicts.append(loss_dict)
        finally:
            self.net.train()
        return aggregate_loss_dict(dicts)

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_dict(self) -> dict[str, Any]:
        """The official checkpoint (the coach's ``__get_save_dict``): ``state_dict`` (encoder.* +
        decoder.*), ``opts`` (``TrainOptions.to_opts_dict``) and, with ``start_from_latent_avg``,
        ``latent_avg``. Tensors on the CPU; ``torch.save`` it and ``load_psp`` reads it."""
        save = {
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "opts": self.opts.to_opts_dict(),
        }
        if self.opts.start_from_latent_avg:
            save["latent_avg"] = self.net.latent_avg.detach().cpu()
        return save

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (loadable with ``weights_only=True``): the model, its
        ``latent_avg``, the optimizer (Ranger's moments, step counts and Lookahead slow weights),
        the step count and torch's RNG state (the generator noise)."""
        state: dict[str, Any] = {
            "net": self.net.state_dict(),
            "latent_avg": self.net.latent_avg,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "opts": self.opts.to_opts_dict(),
            "cpu_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved (same options and device type)."""
        self.net.load_state_dict(state["net"])
        avg = state["latent_avg"]
        self.net.latent_avg = None if avg is None else avg.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def aggregate_loss_dict(dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The original ``train_utils.aggregate_loss_dict``: the mean of each key over the dicts."""
    values: dict[str, list[float]] = {}
    for d in dicts:
        for k, v in d.items():
            values.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in values.items()}
