"""The point-wise half of the projection mapping: pairing points across models of different frame rates.

A student point is matched to the teacher point at the same relative time (METHODS.md section 1,
"Point-wise alignment"), so each utterance's teacher sequence is resampled to that utterance's
student length. Frame ``i`` of ``n`` is centred at relative time ``(i + 1/2) / n``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F


def resample_time(points: Tensor, lengths_in: Tensor, lengths_out: Tensor, length_out: int,
                  mode: Literal["linear", "pool"] = "linear") -> Tensor:
    """Resample each utterance's valid frames to its output length, frame centres at equal relative time.

    ``"linear"`` interpolates between the two nearest input centres (``align_corners=False``, so
    centres map to centres; output centres before the first or after the last input centre take
    that edge frame's value). ``"pool"`` averages the input frames each output frame covers
    (``adaptive_avg_pool1d``). Only frames ``[0, lengths_in[b])`` are read, so padding never leaks
    in; an utterance whose lengths agree is copied exactly.

    Args:
        points: ``(B, T_in, d)``.
        lengths_in: ``(B,)`` valid input frames per utterance, each in ``[1, T_in]`` (or 0 together
            with a 0 output length).
        lengths_out: ``(B,)`` output frames per utterance, each in ``[0, length_out]``.
        length_out: padded output length.
        mode: ``"linear"`` or ``"pool"``.

    Returns:
        ``(B, length_out, d)``, zero beyond ``lengths_out[b]``.
    """
    if mode not in ("linear", "pool"):
        raise ValueError(f"resampling mode must be linear or pool, got {mode!r}")
    batch, length_in, _ = points.shape
    if lengths_in.shape != (batch,) or lengths_out.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths_in.shape)} "
                         f"and {tuple(lengths_out.shape)}")
    utterances = []
    for frames, count_in, count_out in zip(points, lengths_in.tolist(), lengths_out.tolist()):
        if not (0 <= count_in <= length_in and 0 <= count_out <= length_out) or (count_in == 0 < count_out):
            raise ValueError(f"cannot resample {count_in} of {length_in} frames to {count_out} of {length_out}")
        utterances.append(F.pad(_resample_utterance(frames[:count_in], count_out, mode),
                                (0, 0, 0, length_out - count_out)))
    return torch.stack(utterances)


def _resample_utterance(frames: Tensor, count_out: int, mode: Literal["linear", "pool"]) -> Tensor:
    """``(n_in, d) -> (count_out, d)`` for one utterance's valid frames."""
    if frames.shape[0] == count_out:
        return frames
    # interpolate and pool run over the last axis, with a batch axis in front.
    along_time = frames.transpose(0, 1).unsqueeze(0)
    if mode == "linear":
        resampled = F.interpolate(along_time, size=count_out, mode="linear", align_corners=False)
    else:
        resampled = F.adaptive_avg_pool1d(along_time, count_out)
    return resampled.squeeze(0).transpose(0, 1)


def pool_utterance(points: Tensor, mask: Tensor) -> Tensor:
    """Mean of each utterance's valid points, the "no point-wise alignment" ablation.

    Args:
        points: ``(B, T, d)``.
        mask: ``(B, T)`` bool, True where the point counts.

    Returns:
        ``(B, 1, d)``; 0 for an utterance with no valid point.
    """
    valid = mask.unsqueeze(-1)
    # where, not a multiplication by the mask: padding holding inf or NaN must not reach the mean.
    total = torch.where(valid, points, 0).sum(dim=1, keepdim=True)
    return total / valid.sum(dim=1, keepdim=True).clamp_min(1).to(points.dtype)
