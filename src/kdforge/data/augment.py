"""SpecAugment-style masking of log-mel features (Park et al. 2019), on the torch RNG so that a
resumed run masks exactly as an uninterrupted one would."""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.config import SpecAugmentConfig


def spec_augment(features: Tensor, settings: SpecAugmentConfig) -> Tensor:
    """A copy of ``features`` ``(B, mels, frames)`` with random time and frequency bands set to the utterance mean.

    Each utterance gets ``time_masks`` bands of up to ``time_width`` frames and ``freq_masks`` bands
    of up to ``freq_width`` mel bins; the fill value is the utterance's mean log-mel level (Whisper's
    features are normalised, so 0 would be a loud value, not silence).
    """
    masked = features.clone()
    batch, mels, frames = features.shape
    fill = features.mean(dim=(1, 2))
    for axis, count, width, size in ((2, settings.time_masks, settings.time_width, frames),
                                     (1, settings.freq_masks, settings.freq_width, mels)):
        for _ in range(count):
            widths = torch.randint(0, min(width, size) + 1, (batch,))
            starts = (torch.rand(batch) * (size - widths + 1)).long()
            positions = torch.arange(size)
            band = (positions >= starts[:, None]) & (positions < (starts + widths)[:, None])  # (B, size)
            band = band[:, None, :] if axis == 2 else band[:, :, None]
            masked = torch.where(band, fill[:, None, None], masked)
    return masked
