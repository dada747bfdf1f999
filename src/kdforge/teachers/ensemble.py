"""Combining several teachers that share the student's vocabulary into one distribution."""

from __future__ import annotations

import torch
from torch import Tensor


def ensemble_logprobs(teacher_logits: list[Tensor], weights: list[float] | None = None) -> Tensor:
    """Log of the weighted mean of the teachers' probabilities.

    Args:
        teacher_logits: M tensors ``(..., V)`` over the same vocabulary.
        weights: M positive weights (normalised here); None = uniform.

    Returns:
        ``(..., V)`` float32 log-probabilities, usable wherever teacher logits are expected.
    """
    weights = torch.tensor(weights or [1.0] * len(teacher_logits), dtype=torch.float32)
    log_weights = torch.log(weights / weights.sum())
    stacked = torch.stack([torch.log_softmax(t.float(), -1) + w for t, w in zip(teacher_logits, log_weights)])
    return torch.logsumexp(stacked, dim=0)
