"""The LPPM loss and its ensemble target (METHODS.md section 1, "Ensemble target" and "Point loss").

Points arrive already projected into the shared space and resampled to the student's frames: the
student's ``(L, B, T, D)`` for ``L`` mapped layers, every teacher's ``(M, L, B, T, D)`` (or M tensors of
the student's shape, which spares a stacked copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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


def outside_autocast(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``loss`` with autocast off on its first argument's device: under mixed precision
    (``training.precision``) its contractions over ``D`` would otherwise run in half precision, which
    loses the small angles between unit vectors; it casts its inputs to float32 itself."""

    @functools.wraps(loss)
    def in_float32(points: Tensor, *args, **kwargs) -> Tensor:
        with torch.autocast(points.device.type, enabled=False):
            return loss(points, *args, **kwargs)

    return in_float32


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


class _PointCosines(torch.autograd.Function):
    """:func:`point_cosines` with its gradient in closed form.

    Autograd through an einsum and two norms builds the student's gradient from a batched product of
    inner size M, a norm's backward and their sum, each a pass over ``(..., D)`` memory, and needs the
    teachers stacked first. With ``cos_m = <s, t_m> / (|s| |t_m|)`` and incoming ``g_m``:
    ``dL/ds = sum_m g_m t_m / (|s| |t_m|) - (sum_m g_m cos_m) s / |s|^2``, one pass per teacher
    (symmetrically for a teacher that needs a gradient). A norm below :data:`NORM_EPS` is clamped to it
    as ``F.normalize`` does, and then passes no gradient of its own.
    """

    @staticmethod
    def forward(ctx, student: Tensor, *teachers: Tensor) -> Tensor:
        # clamped as F.normalize divides; a clamped norm is exactly NORM_EPS, which the backward recognises
        norms = [torch.linalg.vector_norm(points, dim=-1).clamp(min=NORM_EPS) for points in (student, *teachers)]
        cosines = torch.stack([torch.einsum("...d,...d->...", student, teacher) / (norms[0] * norm)
                               for teacher, norm in zip(teachers, norms[1:])])
        ctx.save_for_backward(student, cosines, *teachers, *norms)
        return cosines

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        student, cosines, *rest = ctx.saved_tensors
        count = len(rest) // 2
        teachers, (student_norm, *teacher_norms) = rest[:count], rest[count:]

        def along_itself(weighted_cosines: Tensor, norm: Tensor) -> Tensor:
            """``-(g cos) / |x|^2``, the factor of the point's own direction (0 where its norm is clamped)."""
            return torch.where(norm > NORM_EPS, -weighted_cosines / norm**2, 0.0).unsqueeze(-1)

        def across(grad_m: Tensor, teacher_norm: Tensor) -> Tensor:
            """``g_m / (|s| |t_m|)``, the factor of the other point."""
            return (grad_m / (student_norm * teacher_norm)).unsqueeze(-1)

        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = student * along_itself((grad * cosines).sum(0), student_norm)
            for grad_m, teacher, norm in zip(grad, teachers, teacher_norms):
                grad_student.addcmul_(teacher, across(grad_m, norm))
        grad_teachers = [teacher * along_itself(grad_m * cos_m, norm) + student * across(grad_m, norm)
                         if ctx.needs_input_grad[1 + m] else None
                         for m, (grad_m, cos_m, teacher, norm) in enumerate(zip(grad, cosines, teachers, teacher_norms))]
        return grad_student, *grad_teachers


def point_cosines(student: Tensor, teachers: Sequence[Tensor]) -> Tensor:
    """Cosine of each student point with each teacher's point at the same place.

    Args:
        student: ``(..., D)``.
        teachers: M tensors ``(..., D)`` of the student's shape.

    Returns:
        ``(M, ...)``; a point of norm 0 has cosine 0 with everything.
    """
    return _PointCosines.apply(student, *teachers)


@outside_autocast
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


@outside_autocast
def lppm_loss(
    student_points: Tensor,
    teacher_points: Tensor | Sequence[Tensor],
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
        teacher_points: ``(M, L, B, T, D)``, resampled to the student's ``T``, or M tensors
            ``(L, B, T, D)``.
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
    if torch.is_tensor(teacher_points) and teacher_points.dim() != 5:
        raise ValueError(f"teacher points {tuple(teacher_points.shape)} do not match student points "
                         f"{tuple(student_points.shape)} (expected (M, L, B, T, D))")
    teacher_points = list(teacher_points)  # a stacked tensor's views: no copy
    if any(points.shape != student_points.shape for points in teacher_points):
        raise ValueError(f"teacher points {[tuple(points.shape) for points in teacher_points]} do not match "
                         f"student points {tuple(student_points.shape)} (expected (M, L, B, T, D))")
    if mask.shape != (batch, length) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a ({batch}, {length}) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    if teacher_weights.shape != (len(teacher_points),):
        raise ValueError(f"{tuple(teacher_weights.shape)} teacher weights for {len(teacher_points)} teachers")
    if bool((teacher_weights < 0).any()) or not bool(teacher_weights.sum() > 0):
        raise ValueError(f"teacher weights must be non-negative and not all zero, got {teacher_weights.tolist()}")
    # Float32 at least: half-precision dot products of unit vectors lose the small angles measured here.
    dtype = torch.promote_types(student_points.dtype, torch.float32)
    student, teachers = student_points.to(dtype), [points.to(dtype) for points in teacher_points]
    weights = teacher_weights.to(student.device, dtype)
    weights = weights / weights.sum()
    every_layer_mask = mask.expand(layers, batch, length)
    if point_loss in ANGULAR_DISTANCES:
        return _angular_lppm(student, teachers, every_layer_mask, weights, target, ANGULAR_DISTANCES[point_loss])
    if normalize:
        student, teachers = F.normalize(student, dim=-1), [F.normalize(points, dim=-1) for points in teachers]
    loss = POINT_LOSSES[point_loss]
    if target == "centroid":
        return loss(student, spherical_centroid(torch.stack(teachers), weights), every_layer_mask)
    per_teacher = torch.stack([loss(student, teacher, every_layer_mask) for teacher in teachers])
    return (weights * per_teacher).sum()


def _angular_lppm(student: Tensor, teachers: list[Tensor], mask: Tensor, weights: Tensor, target: str,
                  distance) -> Tensor:
    """:func:`lppm_loss` for a point loss of the angle alone, every teacher at once.

    The cosines are contractions over ``D`` divided by both points' norms (:func:`point_cosines`), with
    no normalised copy of either side's points nor a ``(M, L, B, T, D)`` product; and since every
    teacher shares the mask, the weighted average of per-teacher means is the mean of the per-point
    weighted sums.

    Args:
        student: ``(L, B, T, D)``.
        teachers: M tensors ``(L, B, T, D)``.
        mask: ``(L, B, T)`` bool.
        weights: ``(M,)`` summing to 1.
        target: ``"sum"`` or ``"centroid"``.
        distance: cosine ``(...)`` -> distance ``(...)``, from :data:`ANGULAR_DISTANCES`.

    Returns:
        A scalar.
    """
    if target == "centroid":
        return masked_mean(distance(point_cosines(student, [spherical_centroid(torch.stack(teachers), weights)])[0]),
                           mask)
    cosines = point_cosines(student, teachers)
    per_point = (weights.reshape(-1, 1, 1, 1) * distance(cosines)).sum(0)
    return masked_mean(per_point, mask)
