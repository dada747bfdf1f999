"""The base distillation objectives of METHODS.md section 3.

Each objective is one per-position equation on log-probabilities (``*_divergence``, shapes
``(n, C), (n, C) -> (n,)``, summed over the C categories) and one public loss with the uniform
signature ``loss(student_logits, teacher_logits, mask=None, temperature=1.0, ...)`` that hands the
equation to :func:`~kdforge.losses.reduction.objective_loss` for masking, temperature (the result
is scaled by T**2 for every objective, so switching objectives keeps the gradient scale),
sparse teachers and chunking. ``p`` is the teacher's distribution, ``q`` the student's.

Keyword options shared by every public loss (see :func:`objective_loss`): ``tail`` (sparse
teacher rule), ``chunk_size`` (bounded-memory path), ``position_weights`` (per-position w_t).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from kdforge.losses.reduction import objective_loss
from kdforge.losses.sparse import Teacher


def _kl(from_logp: Tensor, to_logp: Tensor) -> Tensor:
    """KL(a || b) = sum_c a_c (log a_c - log b_c) per row: ``(n, C), (n, C) -> (n,)``."""
    return (from_logp.exp() * (from_logp - to_logp)).sum(-1)


def _mixture_logp(first_logp: Tensor, second_logp: Tensor, first_weight: float) -> Tensor:
    """log(w * a + (1 - w) * b) per category, computed stably: ``(n, C) -> (n, C)``."""
    return torch.logaddexp(first_logp + math.log(first_weight), second_logp + math.log1p(-first_weight))


def forward_kl_divergence(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(p || q) = sum p (log p - log q); mode-covering. ``(n, C), (n, C) -> (n,)``."""
    return _kl(teacher_logp, student_logp)


def reverse_kl_divergence(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(q || p) = sum q (log q - log p); mode-seeking. ``(n, C), (n, C) -> (n,)``."""
    return _kl(student_logp, teacher_logp)


def tvd_divergence(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation 0.5 * sum |p - q|. ``(n, C), (n, C) -> (n,)``."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def jsd_divergence(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """Generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    Defined here for 0 < beta < 1 (both terms vanish at the ends); :func:`generalized_jsd` maps
    beta = 0 and beta = 1 to forward and reverse KL. ``(n, C), (n, C) -> (n,)``.
    """
    mixture = _mixture_logp(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)


def skew_forward_kl_divergence(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q). ``(n, C), (n, C) -> (n,)``."""
    return _kl(teacher_logp, _mixture_logp(teacher_logp, student_logp, alpha))


def skew_reverse_kl_divergence(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p). ``(n, C), (n, C) -> (n,)``."""
    return _kl(student_logp, _mixture_logp(student_logp, teacher_logp, alpha))


def akl_weights(student_logp: Tensor, teacher_logp: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """AKL's per-position weights of forward and reverse KL: ``(n, C), (n, C) -> (n,), (n,)``.

    The teacher's categories are sorted by probability; the *head* is the prefix whose cumulative
    probability stays within ``mu`` (the most probable category always belongs to it), the *tail*
    the rest, as in the AKL reference code. With gaps ``g_head = sum_head |p - q|`` and ``g_tail = sum_tail |p - q|``, the
    weights are ``g_head / (g_head + g_tail)`` for forward KL and ``g_tail / (...)`` for reverse KL
    (0.5 each when p = q). As in the AKL reference code the weights are constants to the gradient.
    """
    with torch.no_grad():
        teacher_p, order = teacher_logp.exp().sort(dim=-1, descending=True)
        gap = (teacher_p - student_logp.exp().gather(-1, order)).abs()
        in_head = teacher_p.cumsum(-1) <= mu
        in_head[..., 0] = True
        head_gap = (gap * in_head).sum(-1)
        tail_gap = (gap * ~in_head).sum(-1)
        total = head_gap + tail_gap
        head_weight = torch.where(total > 0, head_gap / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)
    return head_weight, 1 - head_weight


def adaptive_kl_divergence(student_logp: Tensor, teacher_logp: Tensor, mu: float) -> Tensor:
    """AKL: w_head * KL(p || q) + w_tail * KL(q || p) (weights from :func:`akl_weights`)."""
    head_weight, tail_weight = akl_weights(student_logp, teacher_logp, mu)
    return head_weight * _kl(teacher_logp, student_logp) + tail_weight * _kl(student_logp, teacher_logp)


def forward_kl(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None = None,
               temperature: float = 1.0, **options) -> Tensor:
    """Forward KL(p_T || q_S) on softmax(logits / T), times T**2, averaged over valid positions.

    Args:
        student_logits: ``(..., V)`` float32 or bf16.
        teacher_logits: ``(..., V)`` logits, or a :class:`~kdforge.losses.sparse.TopKTeacher`.
        mask: ``(...)`` bool, True where the position counts.
        temperature: T.
        **options: ``tail``, ``chunk_size``, ``position_weights`` (see ``objective_loss``).

    Returns:
        A scalar tensor (0 with a gradient path if no position is valid).
    """
    return objective_loss(forward_kl_divergence, student_logits, teacher_logits, mask, temperature, **options)


def reverse_kl(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None = None,
               temperature: float = 1.0, **options) -> Tensor:
    """Reverse KL(q_S || p_T), times T**2; arguments and result as :func:`forward_kl`."""
    return objective_loss(reverse_kl_divergence, student_logits, teacher_logits, mask, temperature, **options)


def tvd(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None = None,
        temperature: float = 1.0, **options) -> Tensor:
    """Total variation distance, times T**2; arguments and result as :func:`forward_kl`."""
    return objective_loss(tvd_divergence, student_logits, teacher_logits, mask, temperature, **options)


def generalized_jsd(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None = None,
                    beta: float = 0.5, temperature: float = 1.0, **options) -> Tensor:
    """Generalised JSD with ``beta`` in [0, 1]; beta = 0 is exactly forward KL, beta = 1 reverse KL.

    The end points follow TRL's GKD convention (the mixture terms themselves vanish there).
    Otherwise arguments and result as :func:`forward_kl`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature, **options)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature, **options)
    return objective_loss(partial(jsd_divergence, beta=beta), student_logits, teacher_logits, mask,
                          temperature, **options)


def _check_skew(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")


def skew_forward_kl(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None = None,
                    alpha: float = 0.1, temperature: float = 1.0, **options) -> Tensor:
    """DistiLLM's skew forward KL with skew ``alpha`` (0 is forward KL); otherwise as :func:`forward_kl`."""
    _check_skew(alpha)
    if alpha == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature, **options)
    return objective_loss(partial(skew_forward_kl_divergence, alpha=alpha), student_logits, teacher_logits,
                          mask, temperature, **options)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None = None,
                    alpha: float = 0.1, temperature: float = 1.0, **options) -> Tensor:
    """DistiLLM's skew reverse KL with skew ``alpha`` (0 is reverse KL); otherwise as :func:`forward_kl`."""
    _check_skew(alpha)
    if alpha == 0.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature, **options)
    return objective_loss(partial(skew_reverse_kl_divergence, alpha=alpha), student_logits, teacher_logits,
                          mask, temperature, **options)


def adaptive_kl(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None = None,
                mu: float = 0.5, temperature: float = 1.0, **options) -> Tensor:
    """Adaptive KL (AKL) with head threshold ``mu``; otherwise as :func:`forward_kl`."""
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"mu must lie in (0, 1], got {mu}")
    return objective_loss(partial(adaptive_kl_divergence, mu=mu), student_logits, teacher_logits, mask,
                          temperature, **options)


#: Objective names as configs and benchmark tables use them.
OBJECTIVES = {
    "kl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": tvd,
    "skl": skew_forward_kl,
    "srkl": skew_reverse_kl,
    "akl": adaptive_kl,
}
