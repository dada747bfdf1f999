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

    ``"linear"`` interpolates between the two nearest input centres (:func:`linear_sources`: centres
    map to centres, as ``F.interpolate(..., align_corners=False)``; output centres before the first
    or after the last input centre take that edge frame's value). ``"pool"`` averages the input
    frames each output frame covers (``adaptive_avg_pool1d``). Frames whose count already agrees are
    returned as they are.

    Args:
        points: ``(n, d)``, the utterance's valid frames only (``n >= 1``, or 0 with ``count`` 0).
        count: output frames.
        mode: ``"linear"`` or ``"pool"``.

    Returns:
        ``(count, d)``, float32 when resampled.
    """
    _check_mode(mode)
    return points if points.shape[0] == count else pack_points([points], [count], mode)


def linear_sources(lengths: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where each output frame of a packed batch reads its linear interpolation.

    Output frame ``i`` of ``count`` in a sequence of ``n`` frames sits at input position
    ``x = max((i + 1/2) * n / count - 1/2, 0)``; it is ``(1 - w) * frame[floor(x)] + w * frame[floor(x) + 1]``
    with ``w = x - floor(x)``, the second frame held at the last one past the end.

    Args:
        lengths: ``(P,)`` int64 on the CPU, input frames of each sequence, packed one after another.
        counts: ``(P,)`` int64 on the CPU, output frames of each.

    Returns:
        ``(first, second, weight)``, each ``(counts.sum(),)`` on the CPU: indices into the packed
        input frames (int64) and the weight of ``second`` (float64).
    """
    sequence = torch.repeat_interleave(torch.arange(len(counts)), counts)
    output_start = torch.cumsum(counts, 0) - counts
    index = torch.arange(int(counts.sum()), dtype=torch.float64) - output_start[sequence]
    length = lengths[sequence]
    position = ((index + 0.5) * (length.double() / counts[sequence]) - 0.5).clamp(min=0)
    floor = position.floor()
    first = floor.long()
    second = torch.minimum(first + 1, length - 1)
    input_start = (torch.cumsum(lengths, 0) - lengths)[sequence]
    return input_start + first, input_start + second, position - floor


def pack_points(sequences: list[Tensor], counts: list[int], mode: Literal["linear", "pool"] = "linear") -> Tensor:
    """A batch's points in one float32 tensor: each utterance's frames resampled to its count, in order.

    The order is that in which ``states[mask]`` lists the student's points for a ``(B, T)`` mask with
    ``counts[b]`` True entries in row ``b``, so the two pair up point by point, and no padding is
    ever made, read or masked. A sequence may appear several times (one per layer, say): the
    result is then those sequences' points one after another.

    Linear resampling is two row gathers and one interpolation for the whole batch
    (:func:`linear_sources`): ``F.interpolate`` per sequence cost ~0.3 ms a call, most of a
    distillation step's batch time with a 33 Hz teacher's 4 layers x 8 utterances.

    Args:
        sequences: per utterance ``(n_b, d)``, its valid frames only (any float dtype).
        counts: per utterance, its points on the student's side.
        mode: as for :func:`resample_points`.

    Returns:
        ``(sum(counts), d)`` float32.
    """
    _check_mode(mode)
    lengths = [points.shape[0] for points in sequences]
    _check_counts(lengths, counts)
    if lengths == counts:
        return torch.cat(sequences).float()
    if mode == "pool":
        return torch.cat([points.float() if len(points) == count else
                          F.adaptive_avg_pool1d(points.float().T.unsqueeze(0), count).squeeze(0).T
                          for points, count in zip(sequences, counts)])
    frames = torch.cat(sequences)
    first, second, weight = linear_sources(torch.tensor(lengths), torch.tensor(counts))
    # one gather of both neighbours and one cast: fewer large temporaries than two of each
    neighbours = frames.index_select(0, torch.cat([first, second]).to(frames.device)).float()
    lower, upper = neighbours[: len(first)], neighbours[len(first) :]
    return torch.lerp(lower, upper, weight.to(frames.device, torch.float32).unsqueeze(-1))


def _check_mode(mode: str) -> None:
    """Refuse a resampling mode other than linear or pool."""
    if mode not in ("linear", "pool"):
        raise ValueError(f"resampling mode must be linear or pool, got {mode!r}")


def _check_counts(lengths: list[int], counts: list[int]) -> None:
    """Refuse counts that do not pair with the sequences, are negative, or ask frames of an empty sequence."""
    if len(lengths) != len(counts):
        raise ValueError(f"{len(lengths)} sequences for {len(counts)} counts")
    for length, count in zip(lengths, counts):
        if count < 0 or (length == 0 < count):
            raise ValueError(f"cannot resample {length} frames to {count}")


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
