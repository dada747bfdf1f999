"""Combining several teachers that share the student's vocabulary into one distribution (dense or cached)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.losses import TopKTeacher
from kdforge.losses.sparse import LOG_FLOOR


def ensemble_logprobs(teacher_logits: list[Tensor], weights: list[float] | None = None) -> Tensor:
    """Log of the weighted mean of the teachers' probabilities.

    Args:
        teacher_logits: M tensors ``(..., V)`` over the same vocabulary.
        weights: M positive weights (normalised here); None = uniform.

    Returns:
        ``(..., V)`` float32 log-probabilities, usable wherever teacher logits are expected.
    """
    weights = torch.tensor(weights or [1.0] * len(teacher_logits), dtype=torch.float32, device=teacher_logits[0].device)
    log_weights = torch.log(weights / weights.sum())
    stacked = torch.stack([torch.log_softmax(t.float(), -1) + w for t, w in zip(teacher_logits, log_weights)])
    return torch.logsumexp(stacked, dim=0)


def weights_by_wer(wers: list[float], temperature: float) -> list[float]:
    """Teacher weights ``softmax(-WER_m / temperature)`` (METHODS.md section 1, "by validation WER").

    Args:
        wers: M word error rates (>= 0; above 1 when a teacher inserts words).
        temperature: tau > 0; small tau puts nearly all weight on the best teacher.

    Returns:
        M weights summing to 1.
    """
    if temperature <= 0:
        raise ValueError(f"the WER temperature must be > 0, got {temperature}")
    return torch.softmax(-torch.tensor(wers, dtype=torch.float64) / temperature, dim=0).tolist()


def ensemble_top_k(teachers: list[TopKTeacher], weights: list[float] | None = None) -> TopKTeacher:
    """The weighted mean of several cached (top-k) teachers' probabilities, kept sparse.

    ``p(v) = sum_m w_m p_m(v)`` over the union of the teachers' ids, where a teacher adds nothing for
    an id outside its own top-k (its mass there is unknown: it lies in its tail) and ``w_m`` times its
    tail mass to the mean's tail, so the result still sums to 1. An id several teachers keep is one
    category; the slots this frees hold distinct unused ids with probability 0.

    Args:
        teachers: M sparse teachers over one vocabulary, each ``(..., k_m)``, same positions.
        weights: M positive weights (normalised here); None = uniform.

    Returns:
        A :class:`TopKTeacher` of shape ``(..., K)``, K the most distinct ids at any position
        (at most ``sum_m k_m``).
    """
    weights = torch.tensor(weights or [1.0] * len(teachers), dtype=torch.float64)
    weights = weights / weights.sum()
    ids = torch.cat([t.indices for t in teachers], dim=-1)
    probs = torch.cat([w * t.logprobs.double().exp() for t, w in zip(teachers, weights)], dim=-1)
    tail = sum(w * t.tail_logprob.double().exp() for t, w in zip(teachers, weights))
    ids, order = ids.sort(dim=-1)
    probs = probs.gather(-1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    slot = first.long().cumsum(-1) - 1  # each id's category: equal ids share one
    used = first.sum(-1, keepdim=True)  # (..., 1) distinct ids
    width = int(used.max())
    merged = torch.zeros_like(probs).scatter_add_(-1, slot, probs)[..., :width]
    kept = torch.zeros_like(ids).scatter_(-1, slot, ids)[..., :width]
    # fill with the smallest ids outside the union: ids 0..width-1 hold at least width - used of them,
    # and width <= V keeps every id inside the vocabulary
    candidates = torch.arange(width, device=ids.device).expand(*ids.shape[:-1], width)
    taken = (candidates[..., :, None] == ids[..., None, :]).any(-1)
    free = (taken.long() * width + candidates).sort(-1).values  # the free ids first, in order
    positions = torch.arange(width, device=ids.device).expand_as(kept)
    indices = torch.where(positions < used, kept, free.gather(-1, (positions - used).clamp(min=0)))
    logprobs = torch.where(positions < used, merged.clamp(min=1e-300).log(), LOG_FLOOR).clamp(min=LOG_FLOOR)
    return TopKTeacher(indices, logprobs.float(), tail.clamp(min=1e-300).log().clamp(min=LOG_FLOOR).float())
