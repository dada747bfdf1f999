"""From per-position divergences to one scalar loss: masking, averaging and chunking.

Every logit objective in kdforge is ``mean over valid positions of T**2 * w_t * D(q_t, p_t)``,
where ``D`` is a per-position divergence (one small function each, in ``divergences.py``),
``w_t`` an optional per-position weight (RLKD's dynamic weighting) and ``T`` the temperature.
:func:`objective_loss` is the one place that does the masking, the averaging and the optional
chunking over positions, so the divergences themselves stay one equation each.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from kdforge.losses.sparse import (DEFAULT_TAIL, TailRule, Teacher, category_logprobs, check_student_categories,
                                   reads_rows_in_place, teacher_leading_shape, teacher_rows)


#: Elements per chunk on the bounded-memory path: 16 MiB per float32 temporary, so a chunk's ~10
#: temporaries stay well below half of any logits tensor worth chunking.
CHUNK_ELEMENTS = 2**22


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary of ``vocab_size``."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


class Divergence(Protocol):
    def __call__(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        """``(n, C), (n, C) -> (n,)``: the divergence at each of n positions."""


def check_positions(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
                    position_weights: Tensor | None = None) -> None:
    """Refuse a teacher, mask or per-position weights whose positions ``(...)`` are not the student's
    ``(..., V)`` ones, and a dense teacher of another vocabulary size."""
    leading = student_logits.shape[:-1]
    if teacher_leading_shape(teacher) != leading:
        raise ValueError(f"teacher positions {tuple(teacher_leading_shape(teacher))} do not match "
                         f"student positions {tuple(leading)}")
    if torch.is_tensor(teacher) and teacher.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student_logits.shape)} "
                         "differ: a vocabulary mismatch must be resolved before distillation")
    for name, value in (("mask", mask), ("position_weights", position_weights)):
        if value is not None and value.shape != leading:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(leading)}")


def valid_rows(leading_shape: torch.Size, mask: Tensor | None, device: torch.device) -> Tensor | None:
    """Flat indices ``(n_valid,)`` of the positions that count, or None when every position does.

    None lets callers take views instead of copying full-vocabulary rows.
    """
    if mask is None:
        return None
    if mask.shape != leading_shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(leading_shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if bool(mask.all()):
        return None
    return mask.reshape(-1).nonzero().squeeze(-1).to(device)


def flat_positions(logits: Tensor) -> Tensor:
    """``(..., V) -> (n, V)``; logits that are already ``(n, V)`` are returned as they are.

    Even a same-shape reshape adds a view's backward, after which the gradient no longer owns its
    memory: RLKD's sparse gradient is then added out of place instead of into the base objective's.
    """
    return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])


def row_selector(rows: Tensor | None, part: slice = slice(None)) -> Tensor | slice:
    """Index of ``part`` of the valid rows: a slice (a view, no copy) when every row is valid."""
    return part if rows is None else rows[part]


def row_count(leading_shape: torch.Size, rows: Tensor | None) -> int:
    return leading_shape.numel() if rows is None else rows.numel()


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` ``(...)`` over the True entries of ``mask`` ``(...)``.

    Returns 0 (with a gradient path to ``values``) when no entry is valid, never NaN.
    """
    rows = valid_rows(values.shape, mask, values.device)
    selected = values.reshape(-1)[row_selector(rows)]
    return selected.sum() / max(row_count(values.shape, rows), 1)


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood of each target (the task term's cross-entropy per position):
    ``(..., V), (...) int64 -> (...)`` in float32+."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _weighted_divergence_sum(
    divergence: Divergence,
    student_logits: Tensor,
    teacher: Teacher,
    weights: Tensor | None,
    temperature: float,
    tail: TailRule,
    rows: Tensor | None = None,
    student_categories: Tensor | None = None,
) -> Tensor:
    """``sum_t T**2 * w_t * D_t`` over the ``rows`` of ``(N, V)`` student logits (all when None; a scalar)."""
    student_logp, teacher_logp = category_logprobs(student_logits, teacher, temperature, tail, rows,
                                                   student_categories)
    per_position = divergence(student_logp, teacher_logp)
    if weights is not None:
        per_position = per_position * weights.to(per_position.dtype)
    return per_position.sum() * temperature**2


class _ChunkedSum(torch.autograd.Function):
    """``_weighted_divergence_sum`` over row chunks, with the student's gradient built chunk by chunk.

    Autograd would keep every chunk's softmax alive until backward, so chunking the forward alone
    saves nothing. Instead each chunk's gradient is computed at once and written into one buffer the
    size of the student logits; peak memory is that buffer plus one chunk's temporaries. The teacher
    is treated as a constant.
    """

    @staticmethod
    def forward(ctx, student_flat, rows, chunk_size, compute_chunk: Callable[[Tensor, slice], Tensor]):
        needs_grad = student_flat.requires_grad
        gradient = torch.zeros_like(student_flat) if needs_grad else None
        total = torch.zeros((), dtype=torch.promote_types(student_flat.dtype, torch.float32), device=student_flat.device)
        for start in range(0, row_count(student_flat.shape[:1], rows), chunk_size):
            part = slice(start, start + chunk_size)
            selector = row_selector(rows, part)
            chunk = student_flat[selector].detach().requires_grad_(needs_grad)
            with torch.enable_grad():
                chunk_sum = compute_chunk(chunk, part)
            if needs_grad:
                (chunk_grad,) = torch.autograd.grad(chunk_sum, chunk)
                gradient[selector] = chunk_grad
            total += chunk_sum.detach()
        # Held as a plain attribute, not saved_tensors: backward hands over the only reference, so
        # autograd can adopt the buffer as the leaf's .grad instead of copying it.
        ctx.gradient = gradient
        return total

    @staticmethod
    def backward(ctx, grad_output):
        gradient, ctx.gradient = ctx.gradient, None
        if gradient is None:
            raise RuntimeError("the chunked loss path supports a single backward pass")
        # In place: a second full-size tensor here would double the peak this path exists to bound.
        return gradient.mul_(grad_output), None, None, None


def objective_loss(
    divergence: Divergence,
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    *,
    tail: TailRule = DEFAULT_TAIL,
    chunk_size: int | None = None,
    position_weights: Tensor | None = None,
    student_categories: Tensor | None = None,
) -> Tensor:
    """Average ``T**2 * w_t * divergence`` over the valid positions.

    Args:
        divergence: per-position divergence ``(n, C), (n, C) -> (n,)`` on log-probabilities.
        student_logits: ``(..., V)``, float32 or bf16 (computed in float32 or wider).
        teacher: ``(..., V)`` dense logits, or a :class:`~kdforge.losses.sparse.TopKTeacher`
            with leading shape ``(...)``.
        mask: ``(...)`` bool, True where the position counts; None means all count.
        temperature: softmax temperature T; the result is multiplied by T**2.
        tail: missing-mass rule for a sparse teacher (see :mod:`kdforge.losses.sparse`).
        chunk_size: if set, positions are processed this many at a time with the student's
            gradient built per chunk (peak memory near one float32 logits tensor); the teacher
            then receives no gradient. A sparse teacher under the ``"bucket"`` rule needs no
            chunks: its student side is computed in row blocks with that peak anyway
            (:func:`~kdforge.losses.sparse.topk_and_tail_logprobs`), so chunk_size is only checked.
        position_weights: ``(...)`` optional per-position weights ``w_t``.
        student_categories: ``(n_valid, k + 1)``, the student's side over a sparse teacher's
            categories at the valid positions, already computed
            (:func:`~kdforge.losses.sparse.topk_tail_and_label_logprobs`); bucket rule only.

    Returns:
        A scalar: 0 with a gradient path when no position is valid, never NaN.
    """
    check_positions(student_logits, teacher, mask, position_weights)
    in_place = reads_rows_in_place(teacher, tail)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    leading = student_logits.shape[:-1]
    rows = valid_rows(leading, mask, student_logits.device)
    if student_categories is not None:
        check_student_categories(student_categories, teacher_rows(teacher, row_selector(rows)), tail)
    weights = None if position_weights is None else position_weights.reshape(-1)[row_selector(rows)]
    student_flat = flat_positions(student_logits)

    def compute_chunk(student_rows: Tensor, part: slice) -> Tensor:
        chunk_weights = None if weights is None else weights[part]
        chunk_teacher = teacher_rows(teacher, row_selector(rows, part))
        return _weighted_divergence_sum(divergence, student_rows, chunk_teacher, chunk_weights, temperature, tail)

    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if in_place:
        # the valid rows read in place: selecting them would cost a backward as slow as the term itself
        total = _weighted_divergence_sum(divergence, student_flat, teacher_rows(teacher, row_selector(rows)),
                                         weights, temperature, tail, rows, student_categories)
    elif chunk_size is None:
        # Every row valid: the rows themselves, since a full slice's backward would copy the gradient.
        total = compute_chunk(student_flat if rows is None else student_flat[rows], slice(None))
    else:
        total = _ChunkedSum.apply(student_flat, rows, chunk_size, compute_chunk)
    return total / max(row_count(leading, rows), 1)
