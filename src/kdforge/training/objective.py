"""The weighted loss terms of a token-level distillation step, composed from the config.

``L = ce_weight * CE + weight * L_base + rlkd.weight * L_rank`` (METHODS.md: L_task, L_logit,
L_rank; the projection-mapping term joins with the ASR recipe). Each term is returned separately
for logging; the total is their weighted sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.config import ObjectiveConfig
from kdforge.losses import OBJECTIVES, rlkd_loss
from kdforge.losses.reduction import auto_chunk_size, masked_mean, token_nll
from kdforge.losses.sparse import Teacher


def linear_warmup(step: int, warmup_steps: int) -> float:
    """A weight factor rising linearly from 0 at step 0 to 1 at ``warmup_steps``."""
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def warmed_objective(objective: ObjectiveConfig, step: int) -> ObjectiveConfig:
    """The objective at training step ``step``: the base and ranking weights scaled by their warm-ups."""
    update = {"weight": objective.weight * linear_warmup(step, objective.warmup_steps)}
    if objective.rlkd is not None:
        rlkd = objective.rlkd
        update["rlkd"] = rlkd.model_copy(update={"weight": rlkd.weight * linear_warmup(step, rlkd.warmup_steps)})
    return objective.model_copy(update=update)


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
    base = OBJECTIVES[objective.name] if objective.name != "none" and objective.weight > 0 else None
    rlkd = objective.rlkd if objective.rlkd is not None and objective.rlkd.weight > 0 else None
    if base is None and rlkd is None:  # no logit term: the labels alone, or nothing (the projection mapping alone)
        if objective.ce_weight == 0:
            return student_logits.new_zeros((), dtype=torch.float32), {}
        cross_entropy = masked_mean(token_nll(student_logits, targets), mask)
        return objective.ce_weight * cross_entropy, {"ce": cross_entropy}
    ranking = {} if rlkd is None else dict(k=rlkd.k, dynamic=rlkd.dynamic, rank_on=rlkd.rank_on,
                                              regularization_strength=rlkd.regularization_strength)
    labels = dict(labels=targets, label_weight=objective.ce_weight) if objective.ce_weight > 0 else {}
    # The chunked path is both leaner and faster than plain autograd (docs/performance.md).
    combined = rlkd_loss(student_logits, teacher, mask, objective=base, base_weight=objective.weight,
                         rank_weight=rlkd.weight if rlkd else 0.0, **ranking, **labels, temperature=objective.temperature,
                         chunk_size=auto_chunk_size(student_logits.shape[-1]), **objective.base_options())
    named = (("ce", combined.task), ("kd", combined.base), ("rank", combined.rank))
    return combined.total, {name: value for name, value in named if value is not None}


def term_gradient_norms(terms: dict[str, Tensor], parameters: list[Tensor], loss_scale: float = 1.0) -> dict[str, float]:
    """The L2 norm of each loss term's gradient over ``parameters``: how hard each term pulls before its weight.

    Args:
        terms: scalar loss terms of one forward pass (e.g. the ``terms`` of :func:`token_loss_terms`).
        parameters: the trainable tensors; the forward graph is kept, so the terms can be differentiated
            one after another. A term that reaches none of them (e.g. an LPPM layer below every LoRA
            adapter, which trains only its projection head) pulls with norm 0.
        loss_scale: each term is differentiated multiplied by it and its norm divided by it: float16
            training's loss scale, without which a float16 backward flushes small gradients to zero.
    """
    norms = {}
    for name, value in terms.items():
        gradients = [] if not value.requires_grad else \
            torch.autograd.grad(value * loss_scale, parameters, retain_graph=True, allow_unused=True)
        reached = [torch.linalg.vector_norm(g) for g in gradients if g is not None]
        norms[name] = float(torch.linalg.vector_norm(torch.stack(reached))) / loss_scale if reached else 0.0
    return norms
