"""pSp's training, without Ray: options, pretrained weights, losses, optimizers, one trainer.

    from psp_core.training import PspTrainer, TrainOptions, TrainingWeights
"""
from __future__ import annotations

from psp_core.training.options import DATASETS, DatasetConfig, TrainOptions, get_dataset_config
from psp_core.training.trainer import PspTrainer, build_training_net
from psp_core.training.weights import MissingWeightsError, TrainingWeights

__all__ = [
    "DATASETS",
    "DatasetConfig",
    "MissingWeightsError",
    "PspTrainer",
    "TrainOptions",
    "TrainingWeights",
    "build_training_net",
    "get_dataset_config",
]
