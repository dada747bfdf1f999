"""Point losses for the projection mapping (METHODS.md section 1, "Point loss").

Each takes student and teacher points ``(..., D)`` in the shared space and an optional bool mask
``(...)``, and returns the mean per-point loss over valid points (0 with a gradient path when none
is valid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.losses.reduction import masked_mean


def _cosine(student_points: Tensor, teacher_points: Tensor) -> Tensor:
    """Cosine similarity per point in float32 or wider: ``(..., D), (..., D) -> (...)``."""
    dtype = torch.promote_types(student_points.dtype, torch.float32)
    return torch.nn.functional.cosine_similarity(student_points.to(dtype), teacher_points.to(dtype), dim=-1)


def geodesic_distance(cosine: Tensor, eps: float = 1e-6) -> Tensor:
    """Great-circle distance from a cosine, ``arccos(clamp(cos, -1 + eps, 1 - eps))``: ``(...) -> (...)``.

    The clamp keeps arccos's gradient finite where the points coincide (or are opposite).
    """
    return torch.arccos(cosine.clamp(-1 + eps, 1 - eps))


def cosine_distance(cosine: Tensor) -> Tensor:
    """``1 - cos`` from a cosine: ``(...) -> (...)``."""
    return 1 - cosine


def geodesic_loss(student_points: Tensor, teacher_points: Tensor, mask: Tensor | None = None,
                  eps: float = 1e-6) -> Tensor:
    """Great-circle distance on the unit sphere, ``arccos(clamp(<s, t>, -1 + eps, 1 - eps))``.

    Points are L2-normalised first, so unnormalised inputs are projected onto the sphere; see
    :func:`geodesic_distance` for the clamp.

    Args:
        student_points: ``(..., D)``.
        teacher_points: ``(..., D)``.
        mask: ``(...)`` bool, True where the point counts.
        eps: distance from +-1 at which the cosine is clamped.

    Returns:
        A scalar in [0, pi].
    """
    return masked_mean(geodesic_distance(_cosine(student_points, teacher_points), eps), mask)


def cosine_loss(student_points: Tensor, teacher_points: Tensor, mask: Tensor | None = None) -> Tensor:
    """``1 - cos(s, t)`` per point, averaged over valid points; shapes as :func:`geodesic_loss`."""
    return masked_mean(cosine_distance(_cosine(student_points, teacher_points)), mask)


def mse_loss(student_points: Tensor, teacher_points: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per point (mean over D) on the raw points; shapes as :func:`geodesic_loss`."""
    dtype = torch.promote_types(student_points.dtype, torch.float32)
    squared = (student_points.to(dtype) - teacher_points.to(dtype)).pow(2).mean(-1)
    return masked_mean(squared, mask)
