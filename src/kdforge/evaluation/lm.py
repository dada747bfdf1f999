"""Language-model evaluation: perplexity, teacher agreement (CR@k, MOR@k) and exact-match accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kdforge.data.arithmetic import extract_answer
from kdforge.devices import device_of, to_device
from kdforge.losses.reduction import masked_mean, token_nll
from kdforge.losses.sparse import Teacher, TopKTeacher
from kdforge.metrics import topk_consistency_rate, topk_overlap_rate
from kdforge.tasks.lm import Example, Sampling, collate, generate_answers, next_token_logits

#: ``(example indices, collated batch) -> the teacher's distribution`` at the batch's positions.
TeacherOf = Callable[[list[int], dict[str, Tensor]], Teacher]

CR_KS = (1, 2, 3, 4, 5)
MOR_KS = (3, 5, 10, 20)


@torch.no_grad()
def agreement_metrics(student: torch.nn.Module, teacher: TeacherOf | None, examples: list[Example], pad_id: int,
                      batch_size: int = 16) -> dict[str, float]:
    """Token-weighted ``ppl`` and, with a teacher, ``cr@k``/``mor@k`` in percent.

    Args:
        student: a causal LM.
        teacher: ``(example indices, collated batch) -> teacher`` (``(B, L-1, V)`` log-probs or logits,
            or a :class:`~kdforge.losses.TopKTeacher`: rates at k beyond the ids it keeps are left out),
            or None for perplexity only.
        examples: tokenised records; their target tokens are what is scored.
        pad_id: the padding id.
    """
    was_training = student.training
    student.eval()
    device = device_of(student)
    sums: dict[str, float] = {}
    count = 0
    for start in range(0, len(examples), batch_size):
        indices = list(range(start, min(start + batch_size, len(examples))))
        batch = to_device(collate([examples[i] for i in indices], pad_id), device)
        mask = batch["target_mask"]
        n = int(mask.sum())
        logits = next_token_logits(student, batch)
        values = {"nll": float(masked_mean(token_nll(logits, batch["targets"]), mask))}
        if teacher is not None:
            reference = to_device(teacher(indices, batch), device)
            kept = reference.k if isinstance(reference, TopKTeacher) else logits.shape[-1]
            values |= {f"cr@{k}": 100 * topk_consistency_rate(logits, reference, k, mask) for k in CR_KS if k <= kept}
            values |= {f"mor@{k}": 100 * topk_overlap_rate(logits, reference, k, mask) for k in MOR_KS if k <= kept}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * n
        count += n
    student.train(was_training)
    metrics = {key: value / max(count, 1) for key, value in sums.items()}
    metrics["ppl"] = math.exp(metrics.pop("nll"))
    return metrics


def exact_match_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, queries: list[str],
                         answers: list[int], max_new_tokens: int = 48, sampling: Sampling | None = None) -> float:
    """Percent of queries whose continuation's ``#### N`` equals the reference answer (greedy, or
    sampled with ``sampling``)."""
    generated = generate_answers(model, tokenizer, queries, max_new_tokens=max_new_tokens, sampling=sampling)
    return 100 * sum(extract_answer(text) == answer for text, answer in zip(generated, answers)) / max(len(answers), 1)
