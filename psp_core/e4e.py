"""e4e (encoder4editing): pSp's network with an encoder built for editing.

The checkpoint format is pSp's (``{'state_dict': encoder.* + decoder.*, 'opts', 'latent_avg'}``),
with the generator size in ``opts['stylegan_size']`` and ``opts['encoder_type']`` one of
``Encoder4Editing`` (w0 plus per-style deltas), ``SingleStyleCodeEncoder`` (one W code for every
style) or ``GradualStyleEncoder``; the encoder always takes RGB. Every encoder gives W+, to which
``latent_avg`` (``[n_styles, 512]`` as trained, or one row) is added when
``start_from_latent_avg``. Load with ``psp_core.checkpoint.load_psp``.
"""
from __future__ import annotations

import torch

from psp_core.psp import PSP, STYLE_DIM

__all__ = ["E4E"]


class E4E(PSP):
    """The e4e network (the same ``encoder``, ``decoder``, ``face_pool`` layout as :class:`PSP`).

    ``encoder.progressive_stage`` (``Encoder4Editing`` only) is the original's inference stage,
    18: every delta is used; set it to k to use the deltas of styles 1..k only (0: w0 alone).
    """

    family = "e4e"

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, n_styles, 512]`` plus ``latent_avg`` (when ``start_from_latent_avg``)."""
        self._check_input(x)
        codes = self.encoder(x)
        if self.start_from_latent_avg:
            if self.latent_avg is None:
                raise ValueError(
                    "start_from_latent_avg is set but the model has no latent_avg: load a checkpoint "
                    "that has 'latent_avg' or set opts['start_from_latent_avg'] = False"
                )
            # The original's latent_avg.repeat(B, 1, 1), broadcast.
            codes = codes + self.latent_avg.to(codes.dtype).reshape(1, -1, STYLE_DIM)
        return codes

    def _code_is_w_plus(self) -> bool:
        return True
