"""The original's optimizers: Ranger (RAdam + Lookahead + gradient centralisation, version 20.4.11
as in ``training/ranger.py``) and Adam, over the encoder's (and with ``train_decoder`` the
decoder's) parameters, as ``Coach.configure_optimizers``.

Ranger's settings (the original's defaults, which the coach keeps): betas (0.95, 0.999), eps 1e-5,
no weight decay, RAdam threshold N_sma > 5 (the first 5 steps are momentum SGD with bias
correction), Lookahead every k = 6 steps with alpha 0.5, gradient centralisation of every
parameter with more than one dimension. Its whole state (``exp_avg``, ``exp_avg_sq``, ``step``,
the Lookahead ``slow_buffer``) is in ``state_dict()``, so a resumed run continues exactly.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["Ranger", "configure_optimizer", "trainable_parameters"]


class Ranger(Optimizer):
    """RAdam + Lookahead + gradient centralisation, numerically as the original's ``Ranger``."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, alpha: float = 0.5, k: int = 6,
                 N_sma_threshhold: float = 5, betas: tuple[float, float] = (0.95, 0.999), eps: float = 1e-5,
                 weight_decay: float = 0, use_gc: bool = True, gc_conv_only: bool = False):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid slow update rate: {alpha}")
        if not 1 <= k:
            raise ValueError(f"Invalid lookahead steps: {k}")
        if not lr > 0:
            raise ValueError(f"Invalid Learning Rate: {lr}")
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps}")
        defaults = dict(lr=lr, alpha=alpha, k=k, step_counter=0, betas=betas, N_sma_threshhold=N_sma_threshhold,
                        eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.N_sma_threshhold = N_sma_threshhold
        self.alpha = alpha
        self.k = k
        self.use_gc = use_gc
        self.gc_gradient_threshold = 3 if gc_conv_only else 1

    def _radam_step(self, step: int, beta1: float, beta2: float) -> tuple[float, float]:
        """``(N_sma, step_size)`` for ``step`` (the original caches these per step; pure function)."""
        beta2_t = beta2**step
        n_sma_max = 2 / (1 - beta2) - 1
        n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
        if n_sma > self.N_sma_threshhold:
            step_size = math.sqrt(
                (1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max / (n_sma_max - 2)
            ) / (1 - beta1**step)
        else:
            step_size = 1.0 / (1 - beta1**step)
        return n_sma, step_size

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Ranger optimizer does not support sparse gradients")
                grad = p.grad.float()
                p_fp32 = p.float()  # p itself for float32 parameters, as in the original
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p_fp32)
                    state["exp_avg_sq"] = torch.zeros_like(p_fp32)
                    state["slow_buffer"] = p.detach().clone()
                else:
                    state["exp_avg"] = state["exp_avg"].type_as(p_fp32)
                    state["exp_avg_sq"] = state["exp_avg_sq"].type_as(p_fp32)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                if self.use_gc and grad.dim() > self.gc_gradient_threshold:
                    grad = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
                state["step"] += 1
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                n_sma, step_size = self._radam_step(state["step"], beta1, beta2)
                if group["weight_decay"] != 0:
                    p_fp32.add_(p_fp32, alpha=-group["weight_decay"] * group["lr"])
                if n_sma > self.N_sma_threshhold:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])
                    p_fp32.addcdiv_(exp_avg, denom, value=-step_size * group["lr"])
                else:
                    p_fp32.add_(exp_avg, alpha=-step_size * group["lr"])
                p.copy_(p_fp32)
                if state["step"] % group["k"] == 0:
                    slow_p = state["slow_buffer"]
                    slow_p.add_(p - slow_p, alpha=self.alpha)
                    p.copy_(slow_p)
        return loss


def trainable_parameters(net: nn.Module, train_decoder: bool) -> list[nn.Parameter]:
    """The encoder's parameters, then (with ``train_decoder``) the decoder's, in module order."""
    params = list(net.encoder.parameters())
    if train_decoder:
        params += list(net.decoder.parameters())
    return params


def configure_optimizer(net: nn.Module, optim_name: str, learning_rate: float, train_decoder: bool) -> Optimizer:
    """``Coach.configure_optimizers``: Adam for 'adam', Ranger otherwise, at ``learning_rate``."""
    params = trainable_parameters(net, train_decoder)
    if optim_name == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    return Ranger(params, lr=learning_rate)
