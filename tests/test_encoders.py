"""IR-SE50 backbone and the three pSp encoders: layout, the original's quirks, output shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from psp_core.encoders import (
    BackboneEncoderUsingLastLayerIntoW,
    BackboneEncoderUsingLastLayerIntoWPlus,
    GradualStyleEncoder,
    build_encoder,
    get_blocks,
)
from psp_core.testing import randomize_


def test_ir50_blocks_and_strides():
    blocks = get_blocks(50)
    assert [len(b) for b in blocks] == [3, 4, 14, 3]
    flat = [u for stage in blocks for u in stage]
    assert [i for i, u in enumerate(flat) if u.stride == 2] == [0, 3, 7, 21]
    assert (flat[0].in_channel, flat[0].depth) == (64, 64)
    assert (flat[21].in_channel, flat[21].depth) == (256, 512)
    with pytest.raises(ValueError, match="50, 100, 152"):
        get_blocks(34)


def test_gradual_encoder_state_dict_names_and_shapes():
    with torch.device("meta"):
        enc = GradualStyleEncoder(input_nc=19, n_styles=18)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["input_layer.0.weight"] == (64, 19, 3, 3)
    assert shapes["input_layer.2.weight"] == (64,)  # PReLU
    assert shapes["body.21.shortcut_layer.0.weight"] == (512, 256, 1, 1)
    assert shapes["body.3.shortcut_layer.1.running_var"] == (128,)
    assert "body.0.shortcut_layer.0.weight" not in shapes  # MaxPool2d(1, 2) shortcut: no weights
    assert shapes["body.23.res_layer.5.fc1.weight"] == (32, 512, 1, 1)  # SE reduction 16
    assert shapes["body.23.res_layer.5.fc2.weight"] == (512, 32, 1, 1)
    assert shapes["latlayer1.weight"] == (512, 256, 1, 1) and shapes["latlayer2.weight"] == (512, 128, 1, 1)
    # map2style heads: 4 / 5 / 6 stride-2 convs (spatial 16 / 32 / 64), each with a bias.
    assert "styles.2.convs.6.weight" in shapes and "styles.2.convs.8.weight" not in shapes
    assert "styles.6.convs.8.bias" in shapes and "styles.6.convs.10.weight" not in shapes
    assert shapes["styles.17.convs.10.weight"] == (512, 512, 3, 3)
    assert shapes["styles.17.linear.weight"] == (512, 512) and shapes["styles.17.linear.bias"] == (512,)
    assert "styles.18.linear.weight" not in shapes


def test_heads_use_default_leaky_slope_and_equal_linear():
    with torch.device("meta"):
        enc = GradualStyleEncoder(n_styles=8)
    slopes = {m.negative_slope for m in enc.styles.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    assert type(enc.styles[0].linear).__name__ == "EqualLinear"


def test_fpn_upsampling_uses_align_corners_true():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    y = torch.zeros(1, 1, 3, 3)
    out = GradualStyleEncoder._upsample_add(x, y)[0, 0]
    # align_corners=True keeps the corners and puts the exact mean in the middle.
    expected = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]])
    torch.testing.assert_close(out, expected)


def test_encoders_do_not_print_at_construction(capsys):
    with torch.device("meta"):
        for name in ("GradualStyleEncoder", "BackboneEncoderUsingLastLayerIntoW", "BackboneEncoderUsingLastLayerIntoWPlus"):
            build_encoder(name, n_styles=8)
    assert capsys.readouterr().out == ""


def test_unknown_encoder_type_is_named_in_the_error():
    with pytest.raises(ValueError, match="ResNetBackboneEncoder"):
        build_encoder("ResNetBackboneEncoder")


@torch.inference_mode()
def test_gradual_encoder_feature_taps_and_output():
    enc = randomize_(GradualStyleEncoder(input_nc=3, n_styles=8), seed=1).eval()
    taps = {}
    for i in (6, 20, 23):
        enc.body[i].register_forward_hook(lambda m, inp, out, i=i: taps.__setitem__(i, tuple(out.shape)))
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    out = enc(x)
    assert taps == {6: (1, 128, 64, 64), 20: (1, 256, 32, 32), 23: (1, 512, 16, 16)}
    assert out.shape == (1, 8, 512) and torch.isfinite(out).all()
    assert out.std() > 1e-3  # random weights give distinct, non-degenerate styles
    assert (out[0, 0] - out[0, 7]).abs().max() > 1e-3


@torch.inference_mode()
@pytest.mark.parametrize(
    "cls,shape", [(BackboneEncoderUsingLastLayerIntoW, (1, 512)), (BackboneEncoderUsingLastLayerIntoWPlus, (1, 10, 512))]
)
def test_backbone_encoders_output_w_and_w_plus(cls, shape):
    enc = randomize_(cls(input_nc=1, n_styles=10), seed=2).eval()
    out = enc(torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert out.shape == shape and torch.isfinite(out).all()
