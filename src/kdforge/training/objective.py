"""The weighted loss terms of a token-level distillation step, composed from the config.

``L = ce_weight * CE + weight * L_base + rlkd.weight * L_rank`` (METHODS.md: L_task, L_logit,
L_rank; the projection-mapping term joins with the ASR recipe). Each term is returned separately
for logging; the total is their weighted sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.config import ObjectiveConfig
from kdforge.losses import OBJECTIVES, rlkd_ranking_loss, topk_overlap
from kdforge.losses.reduction import auto_chunk_size, masked_mean
from kdforge.losses.sparse import Teacher
from kdforge.metrics import token_nll


def token_loss_terms(student_logits: Tensor, teacher: Teacher | None, targets: Tensor, mask: Tensor,
                     objective: ObjectiveConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss and its unweighted terms for one batch of next-token predictions.

    Args:
        student_logits: ``(B, L, V)``; position t predicts ``targets[:, t]``.
        teacher: ``(B, L, V)`` logits / log-probs of the (ensemble) teacher, a TopKTeacher, or None.
        targets: ``(B, L)`` int64 next tokens.
        mask: ``(B, L)`` bool, the positions that count.
        objective: which terms, with which weights.

    Returns:
        ``(total, terms)`` with terms among ``ce``, ``kd``, ``rank`` (each a scalar mean over ``mask``).
    """
    terms: dict[str, Tensor] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if objective.ce_weight > 0:
        terms["ce"] = masked_mean(token_nll(student_logits, targets), mask)
        total = total + objective.ce_weight * terms["ce"]
    if objective.name != "none" and objective.weight > 0:
        options = objective.base_options()
        if objective.rlkd is not None and objective.rlkd.dynamic:
            options["position_weights"] = topk_overlap(student_logits, teacher, objective.rlkd.k)
        # The chunked path is both leaner and faster than plain autograd (docs/performance.md).
        terms["kd"] = OBJECTIVES[objective.name](student_logits, teacher, mask, temperature=objective.temperature,
                                                 chunk_size=auto_chunk_size(student_logits.shape[-1]), **options)
        total = total + objective.weight * terms["kd"]
    if objective.rlkd is not None and objective.rlkd.weight > 0:
        rlkd = objective.rlkd
        terms["rank"] = rlkd_ranking_loss(student_logits, teacher, mask, k=rlkd.k,
                                          regularization_strength=rlkd.regularization_strength, rank_on=rlkd.rank_on)
        total = total + rlkd.weight * terms["rank"]
    return total, terms
