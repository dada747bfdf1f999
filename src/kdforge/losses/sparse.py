"""Teacher distributions over the categories a divergence compares.

A dense teacher is its full logits tensor. A *sparse* teacher is what an offline cache stores: the
top-k token ids per position, their log-probabilities and the log of the probability mass left
outside them (the tail). :func:`category_logprobs` turns either into a pair of log-probability
tensors over one common set of categories, so every divergence in :mod:`kdforge.losses.divergences`
is written once and serves both.

Tail rules for a sparse teacher (argument ``tail``):

* ``"bucket"``: the categories are the k teacher tokens plus one bucket holding every other token.
  The student's bucket is its exact probability outside the k tokens; the teacher's is its stored
  tail mass. At a temperature T != 1 both are tempered over these same k + 1 categories from their
  T = 1 probabilities, the bucket as one category (the tail's token-by-token tempered mass is not
  recoverable from a cache), so a student equal to its teacher has zero loss at every T.
* ``"renormalize"``: the categories are the k teacher tokens only; both distributions are
  renormalised over them (exact at every temperature for the top-k part, blind to the tail).

With k = V both rules give exactly the dense result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

TailRule = Literal["bucket", "renormalize"]
#: The tail rule of every objective unless a caller picks another.
DEFAULT_TAIL: TailRule = "bucket"

#: Log-probabilities are floored here: e**-1e4 is exactly 0 in float32 and float64, and a finite
#: floor keeps 0 * log 0 = 0 free of NaN in both values and gradients.
LOG_FLOOR = -1.0e4

#: Elements per row block of :func:`topk_and_tail_logprobs`' forward (4 MiB in float32): each block is
#: read and rewritten while it is still in cache.
ROW_BLOCK_ELEMENTS = 2**20


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher distribution stored sparsely, as an offline teacher cache keeps it.

    Args:
        indices: ``(..., k)`` int64, the teacher's k most probable token ids per position.
        logprobs: ``(..., k)`` float, their log-probabilities at temperature 1 (log-softmax over
            the full vocabulary, not renormalised).
        tail_logprob: ``(...)`` float, log of the probability mass outside ``indices``
            (:data:`LOG_FLOOR` when nothing is left, e.g. k = V).
    """

    indices: Tensor
    logprobs: Tensor
    tail_logprob: Tensor

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> "TopKTeacher":
        """Keep the top-k of dense ``logits`` of shape ``(..., V)``; the tail mass is exact."""
        logprobs = torch.log_softmax(logits.detach().float(), dim=-1)
        top = logprobs.topk(k, dim=-1)
        outside = logprobs.scatter(-1, top.indices, float("-inf"))
        tail = torch.logsumexp(outside, dim=-1).clamp(min=LOG_FLOOR)
        return cls(top.indices, top.values, tail)

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def rows(self, selector: Tensor | slice) -> "TopKTeacher":
        """The same teacher restricted to flattened positions ``selector`` (leading dims flattened)."""
        k = self.k
        return TopKTeacher(
            self.indices.reshape(-1, k)[selector],
            self.logprobs.reshape(-1, k)[selector],
            self.tail_logprob.reshape(-1)[selector],
        )

    def to(self, device: torch.device | str) -> "TopKTeacher":
        """The same teacher with its three tensors on ``device``."""
        return TopKTeacher(self.indices.to(device), self.logprobs.to(device), self.tail_logprob.to(device))


Teacher = Tensor | TopKTeacher


def teacher_leading_shape(teacher: Teacher) -> torch.Size:
    """The position dimensions ``(...)`` of a dense or sparse teacher."""
    return teacher.indices.shape[:-1] if isinstance(teacher, TopKTeacher) else teacher.shape[:-1]


def teacher_rows(teacher: Teacher, selector: Tensor | slice) -> Teacher:
    """Flatten the teacher's positions and keep ``selector`` of them: ``(n, V)`` or sparse rows."""
    if isinstance(teacher, TopKTeacher):
        return teacher.rows(selector)
    return teacher.reshape(-1, teacher.shape[-1])[selector]


class _TopKAndTailLogprobs(torch.autograd.Function):
    """:func:`topk_and_tail_logprobs` in five passes over the logits instead of about twenty.

    Autograd through a log-softmax, a scatter and a log-sum-exp over the whole vocabulary writes
    and reads several full-size temporaries each way. Here the forward reads the logits for their
    maximum, writes ``e = exp(x - max)`` once and sums it with the ids zeroed (the tail's mass
    without cancellation); the backward turns that same buffer into the gradient in place, closed
    form. With ``Z = sum e``, ``O`` the sum outside the ids, ``g`` the incoming gradient of the k ids,
    ``g_tail`` the tail's, ``g_label`` the label's (0 without labels) and ``G`` their sum:
    ``dL/dx_j = e_j (g_tail / O - G / Z)`` off the ids, ``g_i - e_j G / Z`` at the i-th id, plus
    ``g_label`` at the label. Keeping ``e`` holds one logits-sized buffer from the forward to the
    backward, which a gradient needs anyway; without one, ``e`` lives a block at a time.

    With ``rows``, each block of the selected rows is copied out of the logits and its ``e`` written
    into those rows of the buffer, whose other rows are zero: the buffer is the gradient of the whole
    ``(N, V)`` logits, so no selection's backward (an index-add into a zero tensor, as slow on the
    CPU as the rest of this function together) ever runs.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, indices: Tensor, rows: Tensor | None, labels: Tensor | None) -> Tensor:
        count = indices.shape[0]
        maxes, outside = (torch.empty(count, dtype=logits.dtype, device=logits.device) for _ in range(2))
        at_ids = torch.empty(indices.shape, dtype=logits.dtype, device=logits.device)
        # contiguous whatever the logits' strides: the backward writes into it through a flat view
        exponentials = torch.empty_like(logits, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        if exponentials is not None and rows is not None:
            unread = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device).index_fill_(0, rows, False)
            exponentials.index_fill_(0, unread.nonzero().squeeze(1), 0.0)
        block = max(1, ROW_BLOCK_ELEMENTS // max(logits.shape[-1], 1))
        for start in range(0, count, block):
            part = slice(start, start + block)
            ids = indices[part]
            if rows is None:
                block_rows = logits[part]
                row_max = block_rows.amax(-1, keepdim=True)
                kept = None if exponentials is None else exponentials[part]
                shifted = torch.sub(block_rows, row_max, out=kept).exp_()
            else:
                block_rows = logits.index_select(0, rows[part])
                row_max = block_rows.amax(-1, keepdim=True)
                shifted = block_rows.sub_(row_max).exp_()
            at_ids[part] = shifted.gather(-1, ids)
            outside[part] = shifted.scatter_(-1, ids, 0.0).sum(-1)
            maxes[part] = row_max.squeeze(-1)
            if rows is not None and exponentials is not None:
                exponentials.index_copy_(0, rows[part], shifted)
        total = outside + at_ids.sum(-1)
        read = indices if labels is None else torch.cat([indices, labels.unsqueeze(-1)], dim=-1)
        at_logits = logits.gather(-1, read) if rows is None else logits[rows.unsqueeze(-1), read]
        top = at_logits - (maxes + total.log()).unsqueeze(-1)
        tail = outside.log() - total.log()
        ctx.save_for_backward(logits, indices, rows, labels, maxes, at_ids, total, outside, tail > LOG_FLOOR)
        # Held as a plain attribute: the first backward consumes the buffer as its gradient.
        ctx.exponentials = exponentials
        tail = tail.clamp(min=LOG_FLOOR)  # an empty tail (k = V), constant to the gradient
        categories = torch.cat([top[:, : indices.shape[1]], tail.unsqueeze(-1)], dim=-1)
        return categories if labels is None else torch.cat([categories, top[:, -1:]], dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        logits, indices, rows, labels, maxes, at_ids_exp, total, outside, tail_kept = ctx.saved_tensors
        exponentials, ctx.exponentials = ctx.exponentials, None
        if exponentials is None:  # a second backward (retain_graph): recompute what the first consumed
            selected = logits if rows is None else logits.index_select(0, rows)
            shifted = (selected - maxes.unsqueeze(-1)).exp_()
            exponentials = shifted if rows is None else torch.zeros_like(logits).index_copy_(0, rows, shifted)
        k = indices.shape[1]
        grad_top = grad[:, :k]
        grad_tail = torch.where(tail_kept, grad[:, k], torch.zeros_like(outside))
        grad_label = grad[:, k + 1] if labels is not None else None
        per_mass = (grad_top.sum(-1) + grad_tail + (0 if grad_label is None else grad_label)) / total
        tail_share = grad_tail / outside.clamp(min=torch.finfo(outside.dtype).tiny)
        at_ids = grad_top - at_ids_exp * per_mass.unsqueeze(-1)
        read_rows = torch.arange(len(indices), device=logits.device) if rows is None else rows
        if rows is None:
            exponentials.mul_((tail_share - per_mass).unsqueeze(-1))
        else:  # the unread rows are zero, and stay zero under any factor
            factor = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
            exponentials.mul_(factor.index_copy_(0, rows, tail_share - per_mass).unsqueeze(-1))
        flat = exponentials.view(-1)
        flat.index_copy_(0, (read_rows.unsqueeze(-1) * logits.shape[-1] + indices).flatten(), at_ids.flatten())
        if grad_label is not None:  # added: the label may be one of the ids
            flat.index_add_(0, read_rows * logits.shape[-1] + labels, grad_label)
        return exponentials, None, None, None


def topk_and_tail_logprobs(logits: Tensor, indices: Tensor, rows: Tensor | None = None) -> Tensor:
    """A student's log-probabilities at a sparse teacher's ids and of the mass outside them.

    Args:
        logits: ``(N, V)`` float32 or wider.
        indices: ``(n, k)`` int64, distinct ids per row.
        rows: ``(n,)`` int64, distinct: the rows of ``logits`` that ``indices`` belong to, read in
            place (the gradient is zero on the others); None: every row, ``n = N``.

    Returns:
        ``(n, k + 1)``: ``log softmax(logits)`` at the ids, then ``log(1 - their total)``, computed
        from the tail's own entries (exact for small tails), floored at :data:`LOG_FLOOR`.
    """
    return _TopKAndTailLogprobs.apply(logits, indices, rows, None)


def topk_tail_and_label_logprobs(logits: Tensor, indices: Tensor, labels: Tensor,
                                 rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`topk_and_tail_logprobs` and the log-probability of each row's label, from the same pass.

    The labels' cross-entropy and a sparse teacher's divergence then need one softmax of the
    student's rows, and their gradients meet in one logits-sized buffer instead of two that are added.

    Args:
        logits, indices, rows: as for :func:`topk_and_tail_logprobs`.
        labels: ``(n,)`` int64, one token id per row (among the ids or not).

    Returns:
        ``(categories, label_logprobs)``: ``(n, k + 1)`` as :func:`topk_and_tail_logprobs` gives them,
        and ``(n,)`` ``log softmax(logits)`` at the labels.
    """
    if labels.shape != indices.shape[:1]:
        raise ValueError(f"{tuple(labels.shape)} labels for {indices.shape[0]} rows")
    both = _TopKAndTailLogprobs.apply(logits, indices, rows, labels)
    return both[:, :-1], both[:, -1]


def reads_rows_in_place(teacher: Teacher, tail: TailRule) -> bool:
    """Whether the student's side is reduced to the teacher's categories in one pass over its rows read in
    place (:func:`topk_and_tail_logprobs`): a sparse teacher under ``"bucket"``."""
    return isinstance(teacher, TopKTeacher) and tail == "bucket"


def check_student_categories(student_categories: Tensor | None, teacher: Teacher, tail: TailRule) -> None:
    """Refuse student categories computed in advance unless the teacher is sparse under ``"bucket"`` (the only
    rule that reads them) and they have its ``(n, k + 1)`` shape."""
    if student_categories is None:
        return
    if not reads_rows_in_place(teacher, tail):
        raise ValueError("student categories computed in advance need a sparse teacher under the bucket rule")
    expected = (teacher.indices.reshape(-1, teacher.k).shape[0], teacher.k + 1)
    if student_categories.shape != expected:
        raise ValueError(f"student categories have shape {tuple(student_categories.shape)}, expected {expected}")


def category_logprobs(
    student_logits: Tensor, teacher: Teacher, temperature: float, tail: TailRule, rows: Tensor | None = None,
    student_categories: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the same categories, in float32 or wider.

    Args:
        student_logits: ``(N, V)`` student logits.
        teacher: ``(n, V)`` dense teacher logits, or a :class:`TopKTeacher` of n positions.
        temperature: both distributions are softmax(logits / temperature) (``"bucket"``: over
            the k + 1 categories, see the module docstring).
        tail: the rule for a sparse teacher's missing mass (module docstring).
        rows: ``(n,)`` int64, distinct: the student's rows that the teacher's n positions are;
            None: all of them, ``n = N``. Under ``"bucket"`` they are read in place
            (:func:`topk_and_tail_logprobs`); otherwise copied out.
        student_categories: ``(n, k + 1)``, what :func:`topk_and_tail_logprobs` gives for these
            rows and the teacher's ids, already computed (:func:`topk_tail_and_label_logprobs`); only
            for a :class:`TopKTeacher` under ``"bucket"``.

    Returns:
        ``(student_logprobs, teacher_logprobs)``, each ``(n, C)``, floored at :data:`LOG_FLOOR`;
        C = V for a dense teacher, k + 1 for ``"bucket"`` and k for ``"renormalize"``.
    """
    # Softmax over a large vocabulary in bf16 loses the tail; upcast once, here.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    check_student_categories(student_categories, teacher, tail)
    if rows is not None and not reads_rows_in_place(teacher, tail):
        student_logits = student_logits[rows]
    if not isinstance(teacher, TopKTeacher):
        teacher_logp = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
        student_logp = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    elif tail == "renormalize":
        teacher_logp = torch.log_softmax(teacher.logprobs.to(dtype) / temperature, dim=-1)
        student_logp = torch.log_softmax(student_logits.gather(-1, teacher.indices).to(dtype) / temperature, dim=-1)
    elif tail == "bucket":
        # Both sides are first reduced to the same k + 1 categories at T = 1, then tempered over
        # them: a cache cannot temper the teacher's tail token by token, and tempering only the
        # student's over the whole vocabulary would leave a student equal to its teacher far from
        # zero loss at T != 1 (its many small tail probabilities gain the most from 1/T).
        teacher_categories = torch.cat(
            [teacher.logprobs.to(dtype), teacher.tail_logprob.to(dtype).unsqueeze(-1)], dim=-1
        )
        teacher_logp = torch.log_softmax(teacher_categories / temperature, dim=-1)
        if student_categories is None:
            student_categories = topk_and_tail_logprobs(student_logits.to(dtype), teacher.indices, rows)
        student_logp = torch.log_softmax(student_categories / temperature, dim=-1)
    else:
        raise ValueError(f"unknown tail rule {tail!r}; expected 'bucket' or 'renormalize'")
    return student_logp.clamp(min=LOG_FLOOR), teacher_logp.clamp(min=LOG_FLOOR)
