"""kdforge's loss library: pure functions of tensors.

Logit objectives take ``student_logits (..., V)``, a teacher (dense ``(..., V)`` logits or a
:class:`TopKTeacher`), an optional bool ``mask (...)`` and return a scalar averaged over valid
positions. See ``docs/architecture.md`` for which equation of METHODS.md lives where.
"""

from kdforge.losses.divergences import (
    OBJECTIVES,
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from kdforge.losses.features import cosine_loss, geodesic_loss, mse_loss
from kdforge.losses.ranking import exact_topk_union, rlkd_loss, rlkd_ranking_loss, soft_rank, topk_overlap
from kdforge.losses.reduction import masked_mean
from kdforge.losses.sparse import TopKTeacher

__all__ = [
    "OBJECTIVES",
    "TopKTeacher",
    "adaptive_kl",
    "cosine_loss",
    "exact_topk_union",
    "forward_kl",
    "generalized_jsd",
    "geodesic_loss",
    "masked_mean",
    "mse_loss",
    "reverse_kl",
    "rlkd_loss",
    "rlkd_ranking_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_rank",
    "topk_overlap",
    "tvd",
]
