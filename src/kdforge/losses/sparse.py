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

#: Log-probabilities are floored here: e**-1e4 is exactly 0 in float32 and float64, and a finite
#: floor keeps 0 * log 0 = 0 free of NaN in both values and gradients.
LOG_FLOOR = -1.0e4


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


def category_logprobs(
    student_logits: Tensor, teacher: Teacher, temperature: float, tail: TailRule
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the same categories, in float32 or wider.

    Args:
        student_logits: ``(n, V)`` student logits of n positions.
        teacher: ``(n, V)`` dense teacher logits, or a :class:`TopKTeacher` of n positions.
        temperature: both distributions are softmax(logits / temperature) (``"bucket"``: over
            the k + 1 categories, see the module docstring).
        tail: the rule for a sparse teacher's missing mass (module docstring).

    Returns:
        ``(student_logprobs, teacher_logprobs)``, each ``(n, C)``, floored at :data:`LOG_FLOOR`;
        C = V for a dense teacher, k + 1 for ``"bucket"`` and k for ``"renormalize"``.
    """
    # Softmax over a large vocabulary in bf16 loses the tail; upcast once, here.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype) / temperature
    if not isinstance(teacher, TopKTeacher):
        teacher_logp = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
        student_logp = torch.log_softmax(student, dim=-1)
    elif tail == "renormalize":
        teacher_logp = torch.log_softmax(teacher.logprobs.to(dtype) / temperature, dim=-1)
        student_logp = torch.log_softmax(student.gather(-1, teacher.indices), dim=-1)
    elif tail == "bucket":
        # Both sides are first reduced to the same k + 1 categories at T = 1, then tempered over
        # them: a cache cannot temper the teacher's tail token by token, and tempering only the
        # student's over the whole vocabulary would leave a student equal to its teacher far from
        # zero loss at T != 1 (its many small tail probabilities gain the most from 1/T).
        teacher_categories = torch.cat(
            [teacher.logprobs.to(dtype), teacher.tail_logprob.to(dtype).unsqueeze(-1)], dim=-1
        )
        teacher_logp = torch.log_softmax(teacher_categories / temperature, dim=-1)
        student_full = torch.log_softmax(student_logits.to(dtype), dim=-1)
        outside = student_full.scatter(-1, teacher.indices, LOG_FLOOR)
        student_categories = torch.cat(
            [student_full.gather(-1, teacher.indices), torch.logsumexp(outside, -1, keepdim=True)],
            dim=-1,
        )
        student_logp = torch.log_softmax(student_categories / temperature, dim=-1)
    else:
        raise ValueError(f"unknown tail rule {tail!r}; expected 'bucket' or 'renormalize'")
    return student_logp.clamp(min=LOG_FLOOR), teacher_logp.clamp(min=LOG_FLOOR)
