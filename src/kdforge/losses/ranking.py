"""RLKD: the ranking loss of METHODS.md section 2, with exact top-k unions and soft ranks.

Per position, ``U = topk(teacher, k) UNION topk(student, k)`` (the exact union, k to 2k ids),
``rho = Pearson(softrank(teacher scores on U), softrank(student scores on U))`` and
``L_rank = 1 - mean(rho)`` over valid positions. Everything is batched over positions: unions of
different sizes are padded to 2k with a validity mask, and the soft rank works per row on the
valid entries only.

The soft rank is Blondel et al.'s (2020) projection onto the permutahedron with "l2"
regularisation, the same function as ``torchsort.soft_rank(regularization="l2")``, written in
PyTorch: the isotonic regression inside it is solved in closed form by the min-max formula over
block averages (exact and vectorised over positions), and its gradient is the block averaging of
the pool-adjacent-violators solution, as in torchsort.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from kdforge.losses.reduction import (check_positions, flat_positions, masked_mean, row_count, row_selector,
                                     token_nll, valid_rows)
from kdforge.losses.sparse import (DEFAULT_TAIL, Teacher, TopKTeacher, reads_rows_in_place, teacher_rows,
                                   topk_tail_and_label_logprobs)

RankOn = Literal["logits", "probs"]


#: Columns per block of :func:`topk_indices`.
TOPK_BLOCK = 64


def topk_indices(values: Tensor, k: int) -> Tensor:
    """Each row's k largest entries, largest first: ``(..., V) -> (..., k)`` int64 ids.

    The values are those of ``values.topk(k)`` (among equal values the ids may differ). A row's k
    largest entries lie in the k blocks of :data:`TOPK_BLOCK` columns whose maxima are largest, so a
    block-max reduction over the vocabulary and a top-k over k blocks replace the top-k over the
    whole row: about 3x faster on CPU at V = 49,152, where the full top-k is most of the ranking
    term's cost. Small rows take the plain top-k.
    """
    values = values.detach()
    vocab_size = values.shape[-1]
    if vocab_size < 8 * TOPK_BLOCK * k:
        return values.topk(k, dim=-1).indices
    rows = values.reshape(-1, vocab_size)
    whole = vocab_size - vocab_size % TOPK_BLOCK
    blocks = rows[:, :whole].unfold(-1, TOPK_BLOCK, TOPK_BLOCK)  # (n, V // B, B), a view
    best_blocks = blocks.amax(-1).topk(k, dim=-1).indices
    offsets = torch.arange(TOPK_BLOCK, device=values.device)
    candidate_ids = torch.cat([(best_blocks.unsqueeze(-1) * TOPK_BLOCK + offsets).flatten(1),
                               torch.arange(whole, vocab_size, device=values.device).expand(rows.shape[0], -1)], -1)
    best = rows.gather(-1, candidate_ids).topk(k, dim=-1).indices
    return candidate_ids.gather(-1, best).reshape(*values.shape[:-1], k)


def exact_topk_union(teacher_topk: Tensor, student_topk: Tensor) -> tuple[Tensor, Tensor]:
    """The exact per-row union of two top-k id lists.

    Args:
        teacher_topk: ``(n, k)`` int64, distinct ids per row.
        student_topk: ``(n, k)`` int64, distinct ids per row.

    Returns:
        ``(ids, valid)``, both ``(n, 2k)``: the teacher's ids, then the student's; a student id
        already among the teacher's is marked invalid, so each row's valid ids are its union.
    """
    duplicate = (student_topk.unsqueeze(-1) == teacher_topk.unsqueeze(-2)).any(-1)
    ids = torch.cat([teacher_topk, student_topk], dim=-1)
    valid = torch.cat([torch.ones_like(duplicate), ~duplicate], dim=-1)
    return ids, valid


def _isotonic_min_max(values: Tensor, lengths: Tensor) -> Tensor:
    """The fit of :func:`isotonic_decreasing` by ``v_i = min_{j <= i} max_{k >= i} mean(y_j..y_k)``."""
    n, m = values.shape
    big = torch.finfo(values.dtype).max
    prefix = torch.nn.functional.pad(values.cumsum(-1), (1, 0))
    index = torch.arange(m, device=values.device)
    end, start = index.view(m, 1), index.view(1, m)
    span = (end - start + 1).clamp(min=1).to(values.dtype)
    # [row, k, j] = mean(y_j..y_k), laid out so that the running maximum over the ends k below reads
    # and writes whole contiguous (n, m) slices (3x faster than cummax on CPU) with no transposed copy
    best_end = (prefix[:, 1:, None] - prefix[:, None, :-1]).div_(span)
    best_end.masked_fill_(end < start, -big).masked_fill_((end.T >= lengths.view(n, 1)).unsqueeze(-1), -big)
    for i in range(m - 2, -1, -1):  # [row, i, j] = max_{k >= i} mean(y_j..y_k)
        torch.maximum(best_end[:, i], best_end[:, i + 1], out=best_end[:, i])
    return best_end.masked_fill_(start > end, big).amin(dim=-1)  # only starts j <= i


class _IsotonicDecreasing(torch.autograd.Function):
    """Isotonic regression with the pool-adjacent-violators Jacobian.

    The fit is piecewise constant over blocks of pooled entries, and within a block it is the mean
    of the targets, so the gradient with respect to the targets is the block mean of the incoming
    gradient: computed in O(m) per row from the runs of equal fitted values.
    """

    @staticmethod
    def forward(ctx, values: Tensor, lengths: Tensor) -> Tensor:
        fitted = _isotonic_min_max(values, lengths)
        ctx.save_for_backward(fitted)
        return fitted

    @staticmethod
    def backward(ctx, grad: Tensor):
        (fitted,) = ctx.saved_tensors
        starts_block = torch.ones_like(fitted, dtype=torch.bool)
        starts_block[:, 1:] = fitted[:, 1:] != fitted[:, :-1]
        block = starts_block.long().cumsum(-1) - 1
        sums = torch.zeros_like(grad).scatter_add_(-1, block, grad)
        sizes = torch.zeros_like(grad).scatter_add_(-1, block, torch.ones_like(grad))
        return (sums / sizes.clamp(min=1)).gather(-1, block), None


def isotonic_decreasing(values: Tensor, lengths: Tensor) -> Tensor:
    """Least-squares non-increasing fit to each row's first ``lengths`` entries.

    Solves ``min ||v - y||^2 s.t. v_1 >= v_2 >= ... >= v_len`` exactly by the min-max formula
    ``v_i = min_{j <= i} max_{k >= i} mean(y_j..y_k)``; differentiable (block-mean Jacobian).

    Args:
        values: ``(n, m)`` the targets y.
        lengths: ``(n,)`` int64, how many leading entries of each row take part (>= 1).

    Returns:
        ``(n, m)``; entries at or beyond a row's length are meaningless and must be masked.
    """
    return _IsotonicDecreasing.apply(values, lengths)


def soft_rank(values: Tensor, regularization_strength: float = 1.0, valid: Tensor | None = None) -> Tensor:
    """Ascending soft ranks, equal to ``torchsort.soft_rank(values, "l2", regularization_strength)``.

    The ranks are the Euclidean projection of ``values / strength`` onto the permutahedron of
    (1, ..., n_valid); as the strength goes to 0 they become the hard ranks (1 = smallest).

    Args:
        values: ``(n, m)`` scores.
        regularization_strength: eps > 0.
        valid: ``(n, m)`` bool; only valid entries are ranked (among themselves). None = all.

    Returns:
        ``(n, m)`` soft ranks; 0 at invalid entries.
    """
    if regularization_strength <= 0:
        raise ValueError(f"regularization_strength must be > 0, got {regularization_strength}")
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    theta = values / regularization_strength
    order = theta.masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    sorted_valid = valid.gather(-1, order)
    sorted_theta = theta.gather(-1, order).masked_fill(~sorted_valid, 0.0)
    lengths = valid.sum(-1)
    target_ranks = (lengths.unsqueeze(-1) - torch.arange(values.shape[-1], device=values.device)).to(theta.dtype)
    dual = isotonic_decreasing(sorted_theta - target_ranks, lengths)
    primal = torch.where(sorted_valid, sorted_theta - dual, torch.zeros_like(sorted_theta))
    return torch.zeros_like(primal).scatter(-1, order, primal)


def masked_pearson(first: Tensor, second: Tensor, valid: Tensor) -> Tensor:
    """Pearson correlation per row over the valid entries: ``(n, m), (n, m), (n, m) -> (n,)``.

    A row with no spread (all its valid entries tied) has correlation 0.
    """
    count = valid.sum(-1, keepdim=True).clamp(min=1).to(first.dtype)

    def centred(x: Tensor) -> Tensor:
        mean = (x * valid).sum(-1, keepdim=True) / count
        return torch.where(valid, x - mean, torch.zeros_like(x))

    a, b = centred(first), centred(second)
    tiny = torch.finfo(first.dtype).tiny
    norm = ((a * a).sum(-1) * (b * b).sum(-1)).clamp(min=tiny).sqrt()
    return (a * b).sum(-1) / norm


def teacher_topk(teacher: Teacher, k: int) -> Tensor:
    """The teacher's k most probable ids, ordered by probability: ``(..., k)`` int64."""
    if isinstance(teacher, TopKTeacher):
        if teacher.k < k:
            raise ValueError(f"the sparse teacher keeps {teacher.k} ids per position, fewer than k={k}")
        best = teacher.logprobs.topk(k, dim=-1).indices
        return teacher.indices.gather(-1, best)
    return topk_indices(teacher, k)


def topk_overlap(student_logits: Tensor, teacher: Teacher, k: int) -> Tensor:
    """OR@k per position: ``|topk_T INTERSECT topk_S| / k``, shape ``(...)`` (no gradient)."""
    student_top = topk_indices(student_logits, k)
    shared = (student_top.unsqueeze(-1) == teacher_topk(teacher, k).unsqueeze(-2)).any(-1)
    return shared.sum(-1).to(torch.float32) / k


def _teacher_scores(teacher: Teacher, ids: Tensor, vocab_size: int, rank_on: RankOn) -> Tensor:
    """Teacher scores at ``ids`` ``(n, m)``: logits (or log-probs, rank-equivalent) or probabilities.

    A sparse teacher knows only its stored ids (distinct in each row, as a top-k or an ensemble of
    top-k's stores them); every other id gets the tail's mean log-probability ``log(tail / (V - K))``,
    below every stored one, all such ids tied.
    """
    if isinstance(teacher, TopKTeacher):
        unseen = vocab_size - teacher.k
        tail = (teacher.tail_logprob - math.log(max(unseen, 1))).unsqueeze(-1)
        dtype = torch.promote_types(teacher.logprobs.dtype, tail.dtype)
        # Whichever lookup is smaller: a score for every vocabulary id, or a match for every pair of an
        # id and a stored id (a top-256 cache at V = 2,048 makes the pairs 3.75x as many as the ids).
        if vocab_size <= ids.shape[-1] * teacher.k:
            table = tail.to(dtype).expand(-1, vocab_size).clone()
            scores = table.scatter_(-1, teacher.indices, teacher.logprobs.to(dtype)).gather(-1, ids)
        else:
            match = ids.unsqueeze(-1) == teacher.indices.unsqueeze(-2)
            stored = (match * teacher.logprobs.unsqueeze(-2)).sum(-1)
            scores = torch.where(match.any(-1), stored, tail)
        return scores.exp() if rank_on == "probs" else scores
    if rank_on == "probs":
        return torch.softmax(teacher.float(), dim=-1).gather(-1, ids)
    return teacher.gather(-1, ids)


class _ScoresWithSparseGradient(torch.autograd.Function):
    """``flat[rows[:, None], ids]`` whose gradient is a sparse ``(n_rows, V)`` tensor of ``n * m`` entries.

    Indexing's own backward scatters them into a dense zero tensor the size of ``flat``; added to
    another dense gradient of ``flat`` that costs two full passes over the logits for a few entries.
    A sparse one is added into the other gradient in place by autograd.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, rows: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(rows, ids)
        ctx.shape = flat.shape
        return flat[rows.unsqueeze(-1), ids]

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, ids = ctx.saved_tensors
        where = torch.stack([rows.unsqueeze(-1).expand_as(ids).reshape(-1), ids.reshape(-1)])
        return torch.sparse_coo_tensor(where, grad.reshape(-1), ctx.shape, check_invariants=False), None, None


class _DenseGradient(torch.autograd.Function):
    """The identity, whose backward densifies a gradient that arrives sparse: whatever was differentiated
    (both RLKD terms, or the ranking term alone), what flows on is what a view's backward can take."""

    @staticmethod
    def forward(ctx, values: Tensor) -> Tensor:
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.to_dense() if grad.layout != torch.strided else grad


def rlkd_ranking_loss(
    student_logits: Tensor,
    teacher_logits: Teacher,
    mask: Tensor | None = None,
    k: int = 5,
    regularization_strength: float = 1.0,
    rank_on: RankOn = "logits",
) -> Tensor:
    """RLKD's ranking loss ``1 - mean Spearman`` over each position's exact top-k union.

    Args:
        student_logits: ``(..., V)`` float32 or bf16 (the union's scores are ranked in float64).
        teacher_logits: ``(..., V)`` dense, or a :class:`~kdforge.losses.sparse.TopKTeacher` of
            at least k ids per position.
        mask: ``(...)`` bool, True where the position counts.
        k: top-k size per model (>= 2); the union has k to 2k ids.
        regularization_strength: the soft rank's eps (torchsort's default 1.0, as the official code).
        rank_on: rank raw ``"logits"`` (official code) or softmax ``"probs"`` (the paper's text).

    Returns:
        A scalar in [0, 2]; 0 with a gradient path when no position is valid.
    """
    return _ranking_loss(student_logits, teacher_logits, mask, k, regularization_strength, rank_on)


def _ranking_loss(student_logits: Tensor, teacher_logits: Teacher, mask: Tensor | None, k: int,
                  regularization_strength: float, rank_on: RankOn, sparse_gradient: bool = False) -> Tensor:
    """:func:`rlkd_ranking_loss`; with ``sparse_gradient`` the ``(n, V)`` student logits get a sparse
    gradient of ``n * 2k`` entries, for :func:`rlkd_loss` to add into the base objective's in place
    (a sparse gradient must be densified before any view's backward: :class:`_DenseGradient`)."""
    if k < 2:
        raise ValueError(f"k must be >= 2 for a rank correlation, got {k}")
    if rank_on not in ("logits", "probs"):
        raise ValueError(f"rank_on must be 'logits' or 'probs', got {rank_on!r}")
    check_positions(student_logits, teacher_logits, mask)
    leading, vocab_size = student_logits.shape[:-1], student_logits.shape[-1]
    rows = valid_rows(leading, mask, student_logits.device)
    flat = flat_positions(student_logits)
    positions = torch.arange(flat.shape[0], device=flat.device) if rows is None else rows
    teacher = teacher_rows(teacher_logits, row_selector(rows))
    # Full-vocabulary rows are read in place, not copied (ranking probabilities needs their log-partition):
    # only (n, 2k) scores leave them, so the backward writes n * 2k gradients, not whole rows.
    student_top = topk_indices(flat, k)[positions]
    ids, in_union = exact_topk_union(teacher_topk(teacher, k), student_top)
    # Only (n, 2k) scores are ranked: float64 costs nothing here and keeps values / eps exact
    # when eps is small (float32 would lose the ranks' fractions at values / eps ~ 1e5).
    student_scores = (_ScoresWithSparseGradient.apply(flat, positions, ids) if sparse_gradient
                      else flat[positions.unsqueeze(-1), ids]).double()
    if rank_on == "probs":  # softmax at the union's ids: exp(logit - logsumexp of the row)
        rows_used = flat.index_select(0, positions)
        log_partition = rows_used.to(torch.promote_types(flat.dtype, torch.float32)).logsumexp(-1)
        student_scores = (student_scores - log_partition.double().unsqueeze(-1)).exp()
    teacher_scores = _teacher_scores(teacher, ids, vocab_size, rank_on).double()
    # both sides' rows ranked in one call: half the soft rank's many small operations
    student_ranks, teacher_ranks = soft_rank(torch.cat([student_scores, teacher_scores]), regularization_strength,
                                             in_union.repeat(2, 1)).chunk(2)
    rho = masked_pearson(student_ranks, teacher_ranks, in_union)
    return ((1.0 - rho).sum() / max(row_count(leading, rows), 1)).to(torch.promote_types(student_logits.dtype, torch.float32))


class RankedLoss(NamedTuple):
    """The combined loss and its parts (None where a part is switched off)."""

    total: Tensor
    base: Tensor | None
    rank: Tensor | None
    task: Tensor | None = None


def rlkd_loss(
    student_logits: Tensor,
    teacher_logits: Teacher,
    mask: Tensor | None = None,
    *,
    objective: Callable[..., Tensor] | None,
    base_weight: float = 1.0,
    rank_weight: float = 2.0,
    k: int = 5,
    dynamic: bool = False,
    regularization_strength: float = 1.0,
    rank_on: RankOn = "logits",
    labels: Tensor | None = None,
    label_weight: float = 1.0,
    **objective_options,
) -> RankedLoss:
    """``base_weight * L_base + rank_weight * L_rank``: any base objective plus the RLKD ranking term,
    plus ``label_weight * L_task`` (the cross-entropy of ``labels``) when labels are given.

    The paper's "+R" results use ``rank_weight = 2`` and ``base_weight = 1``. With ``dynamic=True``
    (paper Eq. 2) each position's base divergence is weighted by its OR@k,
    ``|topk_T INTERSECT topk_S| / k``. ``objective=None`` is the ranking term alone, and
    ``rank_weight=0`` the base objective alone. The labels' term is here, not beside this function,
    so that its gradient meets the others' in one buffer; under a sparse teacher with the bucket rule
    it also shares the base objective's softmax (:func:`~kdforge.losses.sparse.topk_tail_and_label_logprobs`),
    which the objective then receives as ``student_categories``: every objective of
    :data:`~kdforge.losses.OBJECTIVES` hands its options to :func:`~kdforge.losses.reduction.objective_loss`,
    and an objective of one's own must accept it too.

    Args:
        student_logits, teacher_logits, mask: as for every loss in :mod:`kdforge.losses`.
        objective: a base loss such as :func:`~kdforge.losses.forward_kl`, or None.
        base_weight, rank_weight: the two terms' weights.
        k, dynamic, regularization_strength, rank_on: the ranking term's settings.
        labels: ``(...)`` int64 reference tokens, or None for no task term.
        label_weight: the task term's weight.
        **objective_options: passed to the base objective (``temperature``, ``beta``, ``tail``...).

    Returns:
        ``RankedLoss(total, base, rank, task)``, scalars.
    """
    if objective is None and rank_weight == 0:
        raise ValueError("rlkd_loss needs a base objective or a positive rank_weight")
    weights = objective_options.get("position_weights")
    check_positions(student_logits, teacher_logits, mask, weights)
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(student_logits.shape[:-1])}")
    # Both terms read one flat (n, V) tensor (a single copy when the logits are a strided slice), so
    # their gradients meet there and the ranking term's sparse one is added into the base's in place.
    flat = _DenseGradient.apply(student_logits.reshape(-1, student_logits.shape[-1]))
    teacher_flat, mask_flat = teacher_rows(teacher_logits, slice(None)), None if mask is None else mask.reshape(-1)
    if weights is not None:
        objective_options["position_weights"] = weights.reshape(-1)
    base = rank = task = None
    total = flat.new_zeros((), dtype=torch.promote_types(flat.dtype, torch.float32))
    if labels is not None:
        tail = objective_options.get("tail", DEFAULT_TAIL)
        shares_softmax = objective is not None and reads_rows_in_place(teacher_flat, tail)
        task, categories = _task_loss(flat, teacher_flat, labels.reshape(-1), mask_flat, shares_softmax)
        if categories is not None:
            objective_options["student_categories"] = categories
        total = total + label_weight * task
    if objective is not None:
        if dynamic:
            objective_options["position_weights"] = topk_overlap(flat, teacher_flat, k)
        base = objective(flat, teacher_flat, mask_flat, **objective_options)
        total = total + base_weight * base
    if rank_weight != 0:
        rank = _ranking_loss(flat, teacher_flat, mask_flat, k, regularization_strength, rank_on,
                             sparse_gradient=objective is not None or labels is not None)
        total = total + rank_weight * rank
    return RankedLoss(total, base, rank, task)


def _task_loss(flat: Tensor, teacher: Teacher, labels: Tensor, mask: Tensor | None,
               shares_softmax: bool) -> tuple[Tensor, Tensor | None]:
    """The labels' mean cross-entropy over the valid rows of ``flat`` ``(n, V)``, and, when it shares the
    base objective's softmax (``shares_softmax``: a sparse teacher read under the bucket rule), the student's
    categories that objective then reads instead of computing them (:func:`~kdforge.losses.sparse.category_logprobs`)."""
    if not shares_softmax:
        return masked_mean(token_nll(flat, labels), mask), None
    rows = valid_rows(flat.shape[:1], mask, flat.device)
    selector = row_selector(rows)
    categories, label_logprobs = topk_tail_and_label_logprobs(
        flat.to(torch.promote_types(flat.dtype, torch.float32)), teacher.indices[selector], labels[selector], rows)
    return -label_logprobs.sum() / max(row_count(flat.shape[:1], rows), 1), categories
