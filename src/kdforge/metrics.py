"""Agreement and quality metrics of METHODS.md section 2 (paper section 3.1), plus perplexity.

Rates are fractions in [0, 1]; benchmark tables multiply by 100 to report percent as the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdforge.losses.ranking import teacher_topk, topk_overlap
from kdforge.losses.reduction import masked_mean, token_nll
from kdforge.losses.sparse import Teacher


def topk_consistency_rate(student_logits: Tensor, teacher_logits: Teacher, k: int, mask: Tensor | None = None) -> float:
    """CR@k: the fraction of valid positions whose ordered top-k lists are identical.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)`` or a :class:`~kdforge.losses.TopKTeacher` with >= k ids.
        k: list length.
        mask: ``(...)`` bool, True where the position counts.
    """
    student_top = student_logits.detach().topk(k, dim=-1).indices
    identical = (student_top == teacher_topk(teacher_logits, k)).all(-1)
    return float(masked_mean(identical.float(), mask))


def topk_overlap_rate(student_logits: Tensor, teacher_logits: Teacher, k: int, mask: Tensor | None = None) -> float:
    """MOR@k: the mean over valid positions of ``|topk_T INTERSECT topk_S| / k``; arguments as CR@k."""
    return float(masked_mean(topk_overlap(student_logits, teacher_logits, k), mask))


def perplexity(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> float:
    """``exp(mean NLL)`` over valid positions; ``logits[..., t, :]`` must already predict ``targets[..., t]``."""
    return math.exp(float(masked_mean(token_nll(logits.detach(), targets), mask)))
