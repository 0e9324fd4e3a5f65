"""The pretrained files pSp's training needs, supplied by the user (never downloaded).

=================  =====================================================  ==========================
file               format (as published)                                  needed when
=================  =====================================================  ==========================
StyleGAN2          rosinality ``{'g_ema': ..., 'latent_avg': [512]}``     no ``checkpoint_path``
AlexNet            torchvision ``alexnet`` state dict (``features.0.weight``  ``lpips_lambda`` or
                   ..., ``classifier.*`` unused)                          ``lpips_lambda_crop`` > 0
LPIPS heads        richzhang's v0.1 ``alex.pth`` (``lin0.model.1.weight``  as AlexNet
                   ... ``lin4.model.1.weight``, ``[1, C, 1, 1]``)
IR-SE50            the original's ``model_ir_se50.pth`` (TreB1eN          ``id_lambda`` > 0, or no
                   ``Backbone``: ``input_layer.*``, ``body.*``,            ``checkpoint_path`` (the
                   ``output_layer.*``)                                    encoder starts from it)
MoCo v2            ``moco_v2_800ep_pretrain.pt``: ``{'state_dict':        ``moco_lambda`` > 0
                   {'module.encoder_q.conv1.weight', ...}}`` (ResNet-50)
=================  =====================================================  ==========================

Every file is a local path or an fsspec URI, read with ``torch.load(weights_only=True)``
(``psp_core.checkpoint.read_checkpoint``). ``TrainingWeights.check(opts)`` raises one error naming
every missing file before any work starts.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from psp_core.checkpoint import CheckpointError, read_checkpoint
from psp_core.training.options import TrainOptions
from psp_core.uris import filesystem_for, is_local, local_path

__all__ = ["TrainingWeights", "MissingWeightsError"]


class MissingWeightsError(FileNotFoundError):
    """One or more pretrained files the chosen losses need are not given or do not exist."""


def _exists(uri: str, storage_options: Mapping[str, Any]) -> bool:
    if is_local(uri):
        return os.path.isfile(local_path(uri))
    fs, path = filesystem_for(uri, storage_options)
    try:
        return fs.isfile(path)
    except Exception:  # a store that cannot answer counts as missing; the error names the URI
        return False


@dataclass
class TrainingWeights:
    """Where the pretrained files are (local paths or fsspec URIs; None = not supplied).

    stylegan: the generator the decoder starts from; None falls back to ``opts.stylegan_weights``
    (the original's option). storage_options: passed to fsspec for remote URIs.
    """

    stylegan: str | None = None
    alexnet: str | None = None
    lpips: str | None = None
    ir_se50: str | None = None
    moco: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    # -- which files the options need -----------------------------------------------------------
    def required(self, opts: TrainOptions) -> dict[str, str | None]:
        """``{what: path or None}`` for every file ``opts`` needs, in the order they are used."""
        need: dict[str, str | None] = {}
        if opts.checkpoint_path is not None:
            need["checkpoint_path (pSp checkpoint to start from)"] = opts.checkpoint_path
        else:
            need["stylegan (StyleGAN2 generator, rosinality 'g_ema' format)"] = self.stylegan_path(opts)
            need["ir_se50 (IR-SE50 model_ir_se50.pth: the encoder starts from it)"] = self.ir_se50
        if opts.lpips_lambda > 0 or opts.lpips_lambda_crop > 0:
            need["alexnet (torchvision AlexNet state dict, for LPIPS)"] = self.alexnet
            need["lpips (LPIPS v0.1 alex.pth linear heads)"] = self.lpips
        if opts.id_lambda > 0:
            need["ir_se50 (IR-SE50 model_ir_se50.pth, for the ID loss)"] = self.ir_se50
        if opts.moco_lambda > 0:
            need["moco (MoCo v2 moco_v2_800ep_pretrain.pt, for the MoCo loss)"] = self.moco
        return need

    def stylegan_path(self, opts: TrainOptions) -> str | None:
        return self.stylegan if self.stylegan is not None else opts.stylegan_weights

    def check(self, opts: TrainOptions) -> None:
        """Raise ``MissingWeightsError`` naming every file ``opts`` needs that is not given or does
        not exist (all at once, before anything is loaded)."""
        problems = []
        seen: set[tuple[str, str | None]] = set()
        for what, path in self.required(opts).items():
            key = (what.split(" ")[0], path)
            if key in seen:
                continue
            seen.add(key)
            if path is None:
                problems.append(f"{what}: not given")
            elif not _exists(str(path), self.storage_options):
                problems.append(f"{what}: {path!r} does not exist")
        if problems:
            raise MissingWeightsError(
                "pSp training needs pretrained files that are missing (nothing is downloaded; supply "
                "each one as a path or URI):\n  - " + "\n  - ".join(problems)
            )

    # -- loaders (torch.load weights_only=True, each file in its published format) --------------
    def _read(self, path: str | None, what: str) -> Any:
        if path is None:
            raise MissingWeightsError(f"{what}: not given")
        obj, _ = read_checkpoint(path, self.storage_options)
        return obj

    def load_stylegan(self, opts: TrainOptions) -> dict[str, Any]:
        """The generator file: ``{'g_ema': state dict, 'latent_avg': [512] (optional)}``."""
        path = self.stylegan_path(opts)
        ckpt = self._read(path, "stylegan")
        if not isinstance(ckpt, Mapping) or "g_ema" not in ckpt:
            raise CheckpointError(f"stylegan weights {path!r} have no 'g_ema' generator state dict")
        return dict(ckpt)

    def load_alexnet(self) -> dict[str, torch.Tensor]:
        """torchvision AlexNet's ``features.*`` as ``{'0.weight': ..., '10.bias': ...}``."""
        state = self._read(self.alexnet, "alexnet")
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            raise CheckpointError(
                f"alexnet weights {self.alexnet!r} have no 'features.*' keys: expected torchvision's alexnet state dict"
            )
        return feats

    def load_lpips(self) -> dict[str, torch.Tensor]:
        """The v0.1 heads renamed as the original does: ``lin0.model.1.weight`` -> ``0.1.weight``."""
        state = self._read(self.lpips, "lpips")
        return {k.replace("lin", "").replace("model.", ""): v for k, v in state.items()}

    def load_ir_se50(self) -> dict[str, torch.Tensor]:
        """The IR-SE50 ``Backbone`` state dict (``input_layer.*``, ``body.*``, ``output_layer.*``)."""
        state = self._read(self.ir_se50, "ir_se50")
        if not isinstance(state, Mapping) or not any(k.startswith("body.") for k in state):
            raise CheckpointError(f"ir_se50 weights {self.ir_se50!r}: expected the IR-SE50 Backbone state dict (body.*)")
        return dict(state)

    def load_moco(self) -> dict[str, torch.Tensor]:
        """ResNet-50 weights from MoCo's ``encoder_q`` (prefix stripped, ``fc.*`` dropped), as the original."""
        ckpt = self._read(self.moco, "moco")
        state = ckpt["state_dict"] if isinstance(ckpt, Mapping) and "state_dict" in ckpt else ckpt
        prefix = "module.encoder_q."
        out = {k[len(prefix):]: v for k, v in state.items()
               if k.startswith(prefix) and not k.startswith(prefix + "fc")}
        if not out:
            raise CheckpointError(f"moco weights {self.moco!r} have no '{prefix}*' keys (expected moco_v2_800ep_pretrain.pt)")
        return out
