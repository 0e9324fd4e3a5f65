"""pSp's training options, with the original defaults, and the per-task data settings.

``TrainOptions`` declares every option of the original ``options/train_options.py`` once, under its
original name and with its original default; ``to_opts_dict()`` is the ``opts`` dict a checkpoint
stores (``vars(opts)`` of the original coach, plus the ``n_styles`` and ``device`` the original adds),
so ``psp_core.checkpoint.load_psp`` and the original code load what we write.

``DATASETS`` is the original ``configs/data_configs.py`` + ``transforms_config.py`` reduced to what
varies per task: which transforms apply (``psp_core.training.data``) and the encoder's channels.
Toonify is not a dataset type of its own in the original: it is ``ffhq_encode`` trained with a
toonified generator as ``stylegan_weights`` (so the checkpoint loads in the original's inference).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainOptions", "DatasetConfig", "DATASETS", "DEFAULT_RESIZE_FACTORS", "get_dataset_config"]

#: The super-resolution factors the original uses when ``resize_factors`` is None.
DEFAULT_RESIZE_FACTORS = "1,2,4,8,16,32"
# The coach always runs on this device and stores it in opts; the original inference code moves
# latent_avg to opts['device'], so a file the original must load says 'cuda:0' as the released do.
_STORED_DEVICE = "cuda:0"
# Keys the original adds to vars(opts) beyond its arguments.
_DERIVED_KEYS = ("n_styles", "device")


@dataclass
class TrainOptions:
    """The original ``TrainOptions`` arguments (names and defaults unchanged).

    ``start_from_latent_avg`` / ``learn_in_w`` / ``use_wandb`` are store_true flags (False unless
    given); ``train_decoder`` is argparse ``type=bool`` in the original (any non-empty string is True).
    """

    exp_dir: str | None = None
    dataset_type: str = "ffhq_encode"
    encoder_type: str = "GradualStyleEncoder"
    input_nc: int = 3
    label_nc: int = 0
    output_size: int = 1024

    batch_size: int = 4
    test_batch_size: int = 2
    workers: int = 4
    test_workers: int = 2

    learning_rate: float = 0.0001
    optim_name: str = "ranger"
    train_decoder: bool = False
    start_from_latent_avg: bool = False
    learn_in_w: bool = False

    lpips_lambda: float = 0.8
    id_lambda: float = 0
    l2_lambda: float = 1.0
    w_norm_lambda: float = 0
    lpips_lambda_crop: float = 0
    l2_lambda_crop: float = 0
    moco_lambda: float = 0

    stylegan_weights: str = "pretrained_models/stylegan2-ffhq-config-f.pt"
    checkpoint_path: str | None = None

    max_steps: int = 500000
    image_interval: int = 100
    board_interval: int = 50
    val_interval: int = 1000
    save_interval: int | None = None

    use_wandb: bool = False
    resize_factors: str | None = None

    # -- derived --------------------------------------------------------------------------------
    @property
    def n_styles(self) -> int:
        """W+ styles of the generator: ``2 * log2(output_size) - 2`` (the original's formula)."""
        return int(math.log(self.output_size, 2)) * 2 - 2

    @property
    def factors(self) -> tuple[int, ...]:
        """Super-resolution factors: ``resize_factors`` parsed (default ``1,2,4,8,16,32``)."""
        return tuple(int(f) for f in (self.resize_factors or DEFAULT_RESIZE_FACTORS).split(","))

    def check(self) -> None:
        """ValueError for option combinations the original rejects or cannot train."""
        if self.id_lambda > 0 and self.moco_lambda > 0:
            # The original coach's own check and message.
            raise ValueError("Both ID and MoCo loss have lambdas > 0! Please select only one to have non-zero lambda!")
        if self.optim_name not in ("ranger", "adam"):
            # The original silently uses Ranger for any other name.
            raise ValueError(f"optim_name={self.optim_name!r}: expected 'ranger' or 'adam'")
        size = int(self.output_size)
        if size < 8 or 2 ** int(math.log2(size)) != size:
            raise ValueError(f"output_size={size}: expected a power of two such as 256 or 1024")
        if self.dataset_type not in DATASETS:
            raise ValueError(f"dataset_type={self.dataset_type!r}: expected one of {', '.join(DATASETS)}")
        self.factors  # noqa: B018 - raises ValueError on a malformed list

    # -- dict forms -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, opts: Mapping[str, Any], strict: bool = True) -> "TrainOptions":
        """Options from a dict in the original's key names (e.g. a checkpoint's ``opts``).

        ``n_styles`` and ``device`` (derived by the original) are ignored. Other unknown keys
        raise ValueError naming them when ``strict``, else are ignored (e.g. a ReStyle file's).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in opts if k not in names and k not in _DERIVED_KEYS)
        if unknown and strict:
            raise ValueError(f"unknown training options {unknown}: known are {sorted(names)}")
        return cls(**{k: v for k, v in opts.items() if k in names})

    def to_opts_dict(self) -> dict[str, Any]:
        """``vars(opts)`` as the original coach saves it in a checkpoint: every option, then
        ``n_styles``; ``save_interval`` None becomes ``max_steps`` (the coach does this);
        ``device`` 'cuda:0' (what the coach stores; loaders here ignore it)."""
        d = dataclasses.asdict(self)
        if d["save_interval"] is None:
            d["save_interval"] = d["max_steps"]
        if get_dataset_config(self.dataset_type).transforms == "super_res" and d["resize_factors"] is None:
            d["resize_factors"] = DEFAULT_RESIZE_FACTORS  # SuperResTransforms writes it back into opts
        d["device"] = _STORED_DEVICE
        d["n_styles"] = self.n_styles
        return d


@dataclass(frozen=True)
class DatasetConfig:
    """What a ``dataset_type`` means for training data (the original data + transforms configs).

    transforms: 'encode' (target: resize, random flip; source = the target tensor itself),
        'frontalize' (source and target each resize + their own random flip), 'sketch' (source
        grayscale [0,1]), 'seg' (source one-hot of ``label_nc`` classes), 'super_res' (source
        degraded by a random factor from ``resize_factors`` per sample).
    paired: the source is another image than the target (sketch, seg, frontalize pairs).
    source_mode: PIL mode the source is read in ('RGB' when ``label_nc == 0``, else 'L').
    """

    name: str
    transforms: str
    paired: bool
    input_nc: int = 3
    label_nc: int = 0
    description: str = ""


DATASETS: dict[str, DatasetConfig] = {
    c.name: c
    for c in (
        DatasetConfig("ffhq_encode", "encode", False, description="face photo -> itself"),
        DatasetConfig("ffhq_frontalize", "frontalize", False,
                      description="face photo -> itself, source and target flipped independently"),
        DatasetConfig("celebs_sketch_to_face", "sketch", True, input_nc=1, label_nc=1,
                      description="grayscale sketch -> face"),
        DatasetConfig("celebs_seg_to_face", "seg", True, input_nc=19, label_nc=19,
                      description="19-class label map -> face"),
        DatasetConfig("celebs_super_resolution", "super_res", False,
                      description="face degraded by a random factor -> face"),
    )
}


def get_dataset_config(dataset_type: str) -> DatasetConfig:
    """The ``DatasetConfig`` of ``dataset_type``; ValueError naming the known ones."""
    try:
        return DATASETS[dataset_type]
    except KeyError:
        raise ValueError(f"dataset_type={dataset_type!r}: expected one of {', '.join(DATASETS)}") from None
