"""psp_core: faithful pure-PyTorch pSp, e4e and ReStyle encoders with FFHQ alignment and image metrics.

No Ray here. Names are resolved lazily so that `import psp_core` stays cheap (dlib, scipy and the
model code load only when used).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PSP": "psp_core.psp",
    "E4E": "psp_core.e4e",
    "ReStyle": "psp_core.restyle",
    "load_psp": "psp_core.checkpoint",
    "load_stylegan2": "psp_core.checkpoint",
    "CheckpointError": "psp_core.checkpoint",
    "ModelSpec": "psp_core.checkpoint",
    "model_spec": "psp_core.checkpoint",
    "Generator": "psp_core.stylegan2",
    "tensor2im": "psp_core.tasks",
    "get_task": "psp_core.tasks",
    "FaceAligner": "psp_core.align",
    "AlignResult": "psp_core.align",
    "ImageDecodeError": "psp_core.images",
    "load_image": "psp_core.images",
    "normalize_image": "psp_core.images",
    "sniff_format": "psp_core.images",
    "FaceDescriptor": "psp_core.metrics",
    "edit": "psp_core.editing",
    "load_direction": "psp_core.editing",
    "fit_direction": "psp_core.editing",
    "load_decoder": "psp_core.editing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psp_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
