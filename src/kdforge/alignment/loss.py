"""The LPPM loss and its ensemble target (METHODS.md section 1, "Ensemble target" and "Point loss").

Points arrive already projected into the shared space and resampled to the student's frames: the
student's ``(L, B, T, D)`` for ``L`` mapped layers, every teacher's ``(M, L, B, T, D)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from kdforge.losses.features import (cosine_distance, cosine_loss, geodesic_distance, geodesic_loss,
                                     mse_loss)
from kdforge.losses.reduction import masked_mean

POINT_LOSSES = {"geodesic": geodesic_loss, "cosine": cosine_loss, "mse": mse_loss}
#: Point losses of the angle alone, as functions of the cosine: :func:`lppm_loss` computes every
#: teacher's cosines in one pass for them instead of one point loss per teacher.
ANGULAR_DISTANCES = {"geodesic": geodesic_distance, "cosine": cosine_distance}
#: ``F.normalize``'s floor on a norm: a zero point has cosine 0 with everything, not NaN.
NORM_EPS = 1e-12


def spherical_centroid(points: Tensor, weights: Tensor) -> Tensor:
    """Normalised weighted mean of the unit vectors ``points[m] / ||points[m]||``.

    Args:
        points: ``(M, ..., D)``, one set of points per teacher.
        weights: ``(M,)`` non-negative; their scale does not matter.

    Returns:
        ``(..., D)`` unit vectors (zero where the weighted directions cancel exactly).
    """
    directions = F.normalize(points, dim=-1)
    weights = weights.to(directions.device, directions.dtype).reshape(-1, *[1] * (points.dim() - 1))
    return F.normalize((weights * directions).sum(dim=0), dim=-1)


def infonce_loss(student_points: Tensor, teacher_points: Tensor, temperature: float = 0.1) -> Tensor:
    """InfoNCE from student to teacher points: the anti-collapse term of a learned teacher map.

    Student point ``i``'s positive is teacher point ``i``, its negatives the other ``N - 1`` teacher
    points; the logits are cosine similarities over ``temperature``. A teacher map that sends every
    point to one place makes all logits equal and costs ``log N``.

    Args:
        student_points: ``(N, D)``, the valid points of a batch.
        teacher_points: ``(N, D)``, paired by index.
        temperature: divides the cosine similarities.

    Returns:
        A scalar, the mean cross-entropy over the ``N`` student points.
    """
    if student_points.shape != teacher_points.shape or student_points.dim() != 2:
        raise ValueError(f"InfoNCE needs two (N, D) tensors of one shape, got {tuple(student_points.shape)} "
                         f"and {tuple(teacher_points.shape)}")
    dtype = torch.promote_types(student_points.dtype, torch.float32)
    student = F.normalize(student_points.to(dtype), dim=-1)
    teacher = F.normalize(teacher_points.to(dtype), dim=-1)
    logits = student @ teacher.T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def lppm_loss(
    student_points: Tensor,
    teacher_points: Tensor,
    mask: Tensor,
    teacher_weights: Tensor,
    target: Literal["sum", "centroid"] = "sum",
    point_loss: Literal["geodesic", "cosine", "mse"] = "geodesic",
    normalize: bool = True,
) -> Tensor:
    """The LPPM loss: a point loss between the student and the teachers, averaged over valid points.

    ``"sum"``: ``sum_m w_m * mean_{l, valid b t} loss(s_{l,b,t}, t_{m,l,b,t})`` with the weights
    rescaled to sum to 1, i.e. a weighted average of the per-teacher losses. ``"centroid"``:
    ``mean_{l, valid b t} loss(s_{l,b,t}, c_{l,b,t})``, ``c`` the :func:`spherical_centroid` of the
    teachers' points (a unit vector whatever ``normalize`` says).

    Gradients reach whatever the caller left attached: the student's projections always, a learned
    teacher map too (the ablation); fixed maps and cached states have nothing to receive them.

    Args:
        student_points: ``(L, B, T, D)``, ``L`` mapped layers.
        teacher_points: ``(M, L, B, T, D)``, resampled to the student's ``T``.
        mask: ``(B, T)`` bool, True where the student point counts; the same for every layer.
        teacher_weights: ``(M,)`` non-negative, not all zero.
        target: ``"sum"`` or ``"centroid"``.
        point_loss: ``"geodesic"`` (``arccos`` of the clamped cosine), ``"cosine"`` (``1 - cos``) or
            ``"mse"``, from :mod:`kdforge.losses.features`.
        normalize: L2-normalise every point onto the unit sphere first (it matters for MSE alone:
            geodesic and cosine depend on the angle only, so it changes nothing for them).

    Returns:
        A scalar: 0 with a gradient path when no point is valid.
    """
    if target not in ("sum", "centroid"):
        raise ValueError(f"LPPM target must be sum or centroid, got {target!r}")
    if point_loss not in POINT_LOSSES:
        raise ValueError(f"point loss must be one of {sorted(POINT_LOSSES)}, got {point_loss!r}")
    layers, batch, length, _ = student_points.shape
    if teacher_points.dim() != 5 or teacher_points.shape[1:] != student_points.shape:
        raise ValueError(f"teacher points {tuple(teacher_points.shape)} do not match student points "
                         f"{tuple(student_points.shape)} (expected (M, L, B, T, D))")
    if mask.shape != (batch, length) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a ({batch}, {length}) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    if teacher_weights.shape != teacher_points.shape[:1]:
        raise ValueError(f"{tuple(teacher_weights.shape)} teacher weights for {teacher_points.shape[0]} teachers")
    if bool((teacher_weights < 0).any()) or not bool(teacher_weights.sum() > 0):
        raise ValueError(f"teacher weights must be non-negative and not all zero, got {teacher_weights.tolist()}")
    # Float32 at least: half-precision dot products of unit vectors lose the small angles measured here.
    dtype = torch.promote_types(student_points.dtype, torch.float32)
    student, teachers = student_points.to(dtype), teacher_points.to(dtype)
    weights = teacher_weights.to(student.device, dtype)
    weights = weights / weights.sum()
    every_layer_mask = mask.expand(layers, batch, length)
    if point_loss in ANGULAR_DISTANCES:
        return _angular_lppm(student, teachers, every_layer_mask, weights, target, ANGULAR_DISTANCES[point_loss])
    if normalize:
        student, teachers = F.normalize(student, dim=-1), F.normalize(teachers, dim=-1)
    loss = POINT_LOSSES[point_loss]
    if target == "centroid":
        return loss(student, spherical_centroid(teachers, weights), every_layer_mask)
    per_teacher = torch.stack([loss(student, teacher, every_layer_mask) for teacher in teachers])
    return (weights * per_teacher).sum()


def _angular_lppm(student: Tensor, teachers: Tensor, mask: Tensor, weights: Tensor, target: str,
                  distance) -> Tensor:
    """:func:`lppm_loss` for a point loss of the angle alone, every teacher at once.

    The cosines are one contraction over ``D`` divided by both points' norms, with no normalised
    copy of either side's points (normalising the student costs more, forward and backward, than the
    contraction) nor a ``(M, L, B, T, D)`` product; and since every teacher shares the mask, the
    weighted average of per-teacher means is the mean of the per-point weighted sums.

    Args:
        student: ``(L, B, T, D)``.
        teachers: ``(M, L, B, T, D)``.
        mask: ``(L, B, T)`` bool.
        weights: ``(M,)`` summing to 1.
        target: ``"sum"`` or ``"centroid"``.
        distance: cosine ``(...)`` -> distance ``(...)``, from :data:`ANGULAR_DISTANCES`.

    Returns:
        A scalar.
    """
    student_norms = torch.linalg.vector_norm(student, dim=-1).clamp(min=NORM_EPS)  # as F.normalize divides
    if target == "centroid":
        return masked_mean(distance((student * spherical_centroid(teachers, weights)).sum(-1) / student_norms), mask)
    teacher_norms = torch.linalg.vector_norm(teachers, dim=-1).clamp(min=NORM_EPS)
    cosines = torch.einsum("lbtd,mlbtd->mlbt", student, teachers) / (teacher_norms * student_norms)
    per_point = (weights.reshape(-1, 1, 1, 1) * distance(cosines)).sum(0)
    return masked_mean(per_point, mask)
