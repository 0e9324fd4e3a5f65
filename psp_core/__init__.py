"""psp_core: a faithful pure-PyTorch pSp (pixel2style2pixel) with FFHQ alignment and image metrics.

No Ray here. Names are resolved lazily so that `import psp_core` stays cheap (dlib, scipy and the
model code load only when used).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PSP": "psp_core.psp",
    "load_psp": "psp_core.psp",
    "load_stylegan2": "psp_core.psp",
    "CheckpointError": "psp_core.psp",
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
