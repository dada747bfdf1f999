"""The point-wise half of the projection mapping: pairing points across models of different frame rates.

A student point is matched to the teacher point at the same relative time (METHODS.md section 1,
"Point-wise alignment"), so each utterance's teacher sequence is resampled to that utterance's
student length. Frame ``i`` of ``n`` is centred at relative time ``(i + 1/2) / n``. A batch's
points travel packed: the valid points of every utterance, one after another, ``(N, d)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F


def resample_points(points: Tensor, count: int, mode: Literal["linear", "pool"] = "linear") -> Tensor:
    """One utterance's valid frames resampled to ``count`` frames, frame centres at equal relative time.

    ``"linear"`` interpolates between the two nearest input centres (``align_corners=False``, so
    centres map to centres; output centres before the first or after the last input centre take
    that edge frame's value). ``"pool"`` averages the input frames each output frame covers
    (``adaptive_avg_pool1d``). Frames whose count already agrees are returned as they are.

    Args:
        points: ``(n, d)``, the utterance's valid frames only (``n >= 1``, or 0 with ``count`` 0).
        count: output frames.
        mode: ``"linear"`` or ``"pool"``.

    Returns:
        ``(count, d)``, at least float32 when resampled.
    """
    if mode not in ("linear", "pool"):
        raise ValueError(f"resampling mode must be linear or pool, got {mode!r}")
    if count < 0 or (points.shape[0] == 0 < count):
        raise ValueError(f"cannot resample {points.shape[0]} frames to {count}")
    if points.shape[0] == count:
        return points
    # interpolate and pool run over the last axis, with a batch axis in front.
    along_time = points.to(torch.promote_types(points.dtype, torch.float32)).transpose(0, 1).unsqueeze(0)
    if mode == "linear":
        resampled = F.interpolate(along_time, size=count, mode="linear", align_corners=False)
    else:
        resampled = F.adaptive_avg_pool1d(along_time, count)
    return resampled.squeeze(0).transpose(0, 1)


def pack_points(sequences: list[Tensor], counts: list[int], mode: Literal["linear", "pool"] = "linear") -> Tensor:
    """A batch's points in one float32 tensor: each utterance's frames resampled to its count, in order.

    The order is that in which ``states[mask]`` lists the student's points for a ``(B, T)`` mask with
    ``counts[b]`` True entries in row ``b``, so the two pair up point by point, and no padding is
    ever made, read or masked.

    Args:
        sequences: per utterance ``(n_b, d)``, its valid frames only (any float dtype).
        counts: per utterance, its points on the student's side.
        mode: as for :func:`resample_points`.

    Returns:
        ``(sum(counts), d)`` float32.
    """
    if len(sequences) != len(counts):
        raise ValueError(f"{len(sequences)} sequences for {len(counts)} counts")
    packed = torch.empty(sum(counts), sequences[0].shape[-1], dtype=torch.float32, device=sequences[0].device)
    start = 0
    for points, count in zip(sequences, counts):
        packed[start : start + count] = resample_points(points, count, mode)  # one copy, cast on the way
        start += count
    return packed


def pool_points(points: Tensor, counts: list[int]) -> Tensor:
    """Mean of each utterance's points, the "no point-wise alignment" ablation.

    Args:
        points: ``(..., N, d)`` packed as :func:`pack_points` packs them.
        counts: per utterance its points; they sum to ``N``.

    Returns:
        ``(..., B, d)``; 0 for an utterance with no point.
    """
    if sum(counts) != points.shape[-2]:
        raise ValueError(f"counts sum to {sum(counts)}, but there are {points.shape[-2]} points")
    return torch.stack([part.sum(dim=-2) / max(count, 1) for part, count in zip(points.split(counts, dim=-2), counts)],
                       dim=-2)
