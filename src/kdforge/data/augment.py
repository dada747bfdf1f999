"""SpecAugment-style masking of log-mel features (Park et al. 2019), on the torch RNG so that a
resumed run masks exactly as an uninterrupted one would."""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.config import SpecAugmentConfig


def spec_augment(features: Tensor, settings: SpecAugmentConfig, frames: Tensor | None = None) -> Tensor:
    """A copy of ``features`` ``(B, mels, F)`` with random time and frequency bands set to the utterance mean.

    Each utterance gets ``time_masks`` bands of up to ``time_width`` frames, drawn inside its first
    ``frames[b]`` frames (its speech, not the padding after it), and ``freq_masks`` bands of up to
    ``freq_width`` mel bins; the fill is the mean log-mel level of its real frames (Whisper's
    features are normalised, so 0 would be a loud value, not silence).

    Args:
        features: ``(B, mels, F)`` log-mel features.
        settings: how many bands, how wide.
        frames: ``(B,)`` real frames per utterance; None = all F.
    """
    batch, mels, total = features.shape
    # the bands are drawn on the CPU whatever the features' device: its generator is the one checkpoints keep
    frames = torch.full((batch,), total) if frames is None else frames.cpu().clamp(1, total)
    real = (torch.arange(total) < frames[:, None]).to(features.device)  # (B, F)
    fill = (features * real[:, None, :]).sum(dim=(1, 2)) / (frames.to(features.device) * mels)
    masked = features.clone()
    for count, width, size, axis in ((settings.time_masks, settings.time_width, frames, 2),
                                     (settings.freq_masks, settings.freq_width, torch.full((batch,), mels), 1)):
        extent = total if axis == 2 else mels
        for _ in range(count):
            widths = torch.minimum(torch.randint(0, width + 1, (batch,)), size)
            starts = (torch.rand(batch) * (size - widths + 1)).long()
            positions = torch.arange(extent)
            band = (positions >= starts[:, None]) & (positions < (starts + widths)[:, None])  # (B, extent)
            band = (band[:, None, :] if axis == 2 else band[:, :, None]).to(features.device)
            masked = torch.where(band, fill[:, None, None], masked)
    return masked
