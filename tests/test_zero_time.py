"""The benchmarks' zero-time model stand-in: a checkpoint file that says what it is loads as a model
with the real one's output shapes, and no real checkpoint can turn into it."""
from __future__ import annotations

import torch

from psp_core import load_psp
from psp_core.zero_time import ZeroTimeModel, write_zero_time_checkpoint


def test_zero_time_checkpoint_loads_as_a_stand_in_with_the_model_shapes(tmp_path):
    model = load_psp(write_zero_time_checkpoint(tmp_path / "zt.pt", output_size=1024))
    assert isinstance(model, ZeroTimeModel)
    x = torch.rand(3, 3, 256, 256) * 2 - 1
    w = model.encode(x)
    assert w.shape == (3, 18, 512)
    assert model.decode(w).shape == (3, 3, 256, 256)
    assert model.decode(w, resize=False).shape == (3, 3, 1024, 1024)
    assert torch.equal(model.decode(w), x)  # images are the inputs' own crops (face-like pixels)
    assert len(model.checkpoint_sha256) == 64


def test_a_real_checkpoint_never_loads_as_the_stand_in(tiny_checkpoint):
    assert not isinstance(load_psp(tiny_checkpoint), ZeroTimeModel)
