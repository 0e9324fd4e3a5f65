"""pSp's training-data transforms (the original ``configs/transforms_config.py`` train/test
pipelines and ``datasets/images_dataset.py``), without torchvision and with seeded randomness.

Per task (``TrainOptions.dataset_type`` -> ``DatasetConfig.transforms``):

==========  ===========================================  ============================================
transforms  source x                                     target y
==========  ===========================================  ============================================
encode      the target tensor itself                     Resize 256, flip (train), ToTensor, Normalize
frontalize  Resize 256, its own flip, ToTensor, Norm.     Resize 256, flip (train), ToTensor, Normalize
sketch      'L', Resize 256, ToTensor ([0, 1], 1 ch.)    Resize 256, ToTensor, Normalize
seg         'L', Resize 256, one-hot of ``label_nc``     Resize 256, ToTensor, Normalize
super_res   Resize 256, bicubic down by a random factor  Resize 256, ToTensor, Normalize
            of ``resize_factors``, clamp, truncate to
            uint8, Resize 256, ToTensor, Normalize
==========  ===========================================  ============================================

As in the original, the source transforms (frontalize's flip, super-res's random factor) also
apply to validation data; only the target's flip is train-only. The random choices of one
sample (``SampleDraw``) come from a numpy PCG64 generator (``sample_rng(seed, index)``: the same
sample gets the same draw on any worker, in any order), in the original's order: the target's
flip, then the source's flip or factor. Given a draw, the tensors equal what the original's
torchvision transforms give (the PIL resize, ``ToTensor`` and ``Normalize`` are those of
``psp_core.tasks``, pinned against the original there).

Split for a pipeline: ``prepare`` (PIL work, uint8 out, on CPU workers) and ``to_tensors``
(batched, on the training device).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from psp_core.tasks import get_task
from psp_core.training.options import TrainOptions, get_dataset_config

__all__ = ["SampleDraw", "TrainTransforms", "sample_rng"]

ImageLike = Image.Image | np.ndarray


def sample_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """The PCG64 generator of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    return np.random.Generator(np.random.PCG64([int(seed), int(epoch), int(index)]))


@dataclass(frozen=True)
class SampleDraw:
    """The random choices of one sample: flips (target, source) and the super-res factor."""

    flip_target: bool = False
    flip_source: bool = False
    factor: int | None = None


class TrainTransforms:
    """The source/target transforms of ``opts.dataset_type``.

    Args:
        opts: ``dataset_type``, ``label_nc`` and ``resize_factors`` are used.
        train: the training pipeline (target flips for encode/frontalize) or the test one.
    """

    def __init__(self, opts: TrainOptions, train: bool = True):
        self.config = get_dataset_config(opts.dataset_type)
        self.kind = self.config.transforms
        self.train = train
        self.label_nc = int(opts.label_nc)
        self.factors = opts.factors
        self._photo = get_task("ffhq_encode")
        self._sketch = get_task("celebs_sketch_to_face")
        self._super_res = get_task("celebs_super_resolution")

    @property
    def source_is_target(self) -> bool:
        """Encode tasks: the source tensor is the target tensor (no source image is read)."""
        return self.kind == "encode"

    def draw(self, rng: np.random.Generator) -> SampleDraw:
        """The sample's random choices, drawn in the original's order."""
        flip_target = bool(rng.random() < 0.5) if self.train and self.kind in ("encode", "frontalize") else False
        flip_source = bool(rng.random() < 0.5) if self.kind == "frontalize" else False
        factor = int(self.factors[int(rng.integers(len(self.factors)))]) if self.kind == "super_res" else None
        return SampleDraw(flip_target, flip_source, factor)

    # -- CPU part: PIL -> uint8 ------------------------------------------------------------------
    def prepare_target(self, target: ImageLike, draw: SampleDraw) -> np.ndarray:
        """``convert('RGB')``, Resize((256, 256)), the flip: uint8 ``[256, 256, 3]``."""
        arr = self._photo.prepare(target)
        return np.ascontiguousarray(arr[:, ::-1]) if draw.flip_target else arr

    def prepare_source(self, source: ImageLike | None, draw: SampleDraw) -> np.ndarray | None:
        """The source's PIL part: uint8 ``[256, 256, 3]`` (photos) or ``[256, 256]`` (sketch
        gray levels, seg labels); None for encode tasks (the target is the source)."""
        if self.kind == "encode":
            return None
        if source is None:
            raise ValueError(f"dataset_type {self.config.name!r} needs a source image for each target")
        if self.kind == "frontalize":
            arr = self._photo.prepare(source)
            return np.ascontiguousarray(arr[:, ::-1]) if draw.flip_source else arr
        if self.kind == "super_res":
            return self._super_res.prepare(source, draw.factor)
        # sketch / seg: convert('L') and the bilinear resize (seg labels blend at borders, as the original)
        arr = self._sketch.prepare(source)
        if self.kind == "seg":
            top = int(arr.max()) if arr.size else 0
            if top >= self.label_nc:
                raise ValueError(
                    f"segmentation map has label values up to {top} but label_nc={self.label_nc}: "
                    "pixel values must be class indices 0..label_nc-1"
                )
        return arr

    # -- device part: uint8 -> float ---------------------------------------------------------------
    def target_tensor(self, target_u8: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 256, 256, 3]`` -> float32 ``[B, 3, 256, 256]`` in [-1, 1] (ToTensor + Normalize)."""
        return self._photo.to_model_input(target_u8)

    def source_tensor(self, source_u8: torch.Tensor) -> torch.Tensor:
        """``prepare_source`` outputs (stacked) -> float32 ``[B, input_nc, 256, 256]``."""
        if self.kind in ("frontalize", "super_res"):
            return self._photo.to_model_input(source_u8)
        if self.kind == "sketch":
            return self._sketch.to_model_input(source_u8)
        classes = torch.arange(self.label_nc, device=source_u8.device, dtype=torch.long)
        return (source_u8.long().unsqueeze(1) == classes.view(1, -1, 1, 1)).float()

    def to_tensors(self, source_u8: torch.Tensor | None, target_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of prepared arrays -> ``(x, y)`` as the model and loss take them."""
        y = self.target_tensor(target_u8)
        x = y if source_u8 is None else self.source_tensor(source_u8)
        return x, y

    def __call__(self, source: ImageLike | None, target: ImageLike, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: ``(x [input_nc, 256, 256], y [3, 256, 256])`` float32."""
        draw = self.draw(rng)
        tgt = self.prepare_target(target, draw)
        src = self.prepare_source(source, draw)
        x, y = self.to_tensors(None if src is None else torch.from_numpy(src)[None], torch.from_numpy(tgt)[None])
        return x[0], y[0]
