"""Language-model evaluation: perplexity, teacher agreement (CR@k, MOR@k) and exact-match accuracy."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedTokenizerBase

from kdforge.data.arithmetic import extract_answer
from kdforge.losses.reduction import masked_mean
from kdforge.metrics import token_nll, topk_consistency_rate, topk_overlap_rate
from kdforge.tasks.lm import Example, Sampling, collate, generate_answers, next_token_logits

CR_KS = (1, 2, 3, 4, 5)
MOR_KS = (3, 5, 10, 20)


@torch.no_grad()
def agreement_metrics(student: torch.nn.Module, teacher_logprobs, examples: list[Example], pad_id: int,
                      batch_size: int = 16) -> dict[str, float]:
    """Token-weighted ``ppl`` and, when ``teacher_logprobs(batch)`` gives a teacher, ``cr@k``/``mor@k`` in percent.

    Args:
        student: a causal LM.
        teacher_logprobs: ``batch -> (B, L-1, V)`` teacher log-probs, or None for perplexity only.
        examples: tokenised records; their target tokens are what is scored.
        pad_id: the padding id.
    """
    was_training = student.training
    student.eval()
    sums: dict[str, float] = {}
    count = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        mask = batch["target_mask"]
        n = int(mask.sum())
        logits = next_token_logits(student, batch)
        values = {"nll": float(masked_mean(token_nll(logits, batch["targets"]), mask))}
        teacher = teacher_logprobs(batch) if teacher_logprobs else None
        if teacher is not None:
            values |= {f"cr@{k}": 100 * topk_consistency_rate(logits, teacher, k, mask) for k in CR_KS}
            values |= {f"mor@{k}": 100 * topk_overlap_rate(logits, teacher, k, mask) for k in MOR_KS}
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
