"""Independent float64 reference implementations: plain loops, written from METHODS.md.

Nothing here imports kdforge. Each function handles ONE position (or one row) at a time, so the
batched, vectorised library code is checked against the textbook definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def kl(a: np.ndarray, b: np.ndarray) -> float:
    if any(x > 0 and y == 0 for x, y in zip(a, b)):
        return math.inf
    return float(sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0))


def divergence(name: str, p: np.ndarray, q: np.ndarray, **params) -> float:
    """Divergence between teacher distribution p and student distribution q."""
    if name == "kl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "tvd":
        return 0.5 * float(np.abs(p - q).sum())
    if name == "jsd":
        beta = params.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skl":
        a = params.get("alpha", 0.1)
        return kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = params.get("alpha", 0.1)
        return kl(q, a * q + (1 - a) * p)
    if name == "akl":
        mu = params.get("mu", 0.5)
        order = np.argsort(-p, kind="stable")
        head_gap = tail_gap = 0.0
        cumulative = 0.0
        for rank, c in enumerate(order):
            cumulative += p[c]
            gap = abs(p[c] - q[c])
            if rank == 0 or cumulative <= mu:
                head_gap += gap
            else:
                tail_gap += gap
        w_head = 0.5 if head_gap + tail_gap == 0 else head_gap / (head_gap + tail_gap)
        return w_head * kl(p, q) + (1 - w_head) * kl(q, p)
    raise KeyError(name)


def objective(name, student, teacher, mask=None, temperature=1.0, **params) -> float:
    """Mean over valid positions of T^2 * divergence(softmax(t/T), softmax(s/T))."""
    s = student.detach().double().reshape(-1, student.shape[-1]).numpy()
    t = teacher.detach().double().reshape(-1, teacher.shape[-1]).numpy()
    m = np.ones(len(s), bool) if mask is None else mask.reshape(-1).numpy()
    values = [
        temperature**2 * divergence(name, softmax(t[i], temperature), softmax(s[i], temperature), **params)
        for i in range(len(s))
        if m[i]
    ]
    return float(np.mean(values)) if values else 0.0


def sparse_distributions(student_row, indices, logprobs, tail_logprob, temperature, tail):
    """(p, q) over the categories of a sparse teacher, built element by element."""
    q_full = softmax(student_row, temperature)
    if tail == "renormalize":
        p = softmax(np.asarray(logprobs), temperature)
        q = np.array([q_full[i] for i in indices])
        return p, q / q.sum()
    p = softmax(np.append(np.asarray(logprobs), tail_logprob), temperature)
    q_one = softmax(student_row, 1.0)  # the student's k + 1 categories at T = 1, then tempered like p
    q_top = [q_one[i] for i in indices]
    categories = np.append(q_top, max(1e-300, 1.0 - sum(q_top)))
    return p, softmax(np.log(categories), temperature)


def pav_decreasing(y: list[float]) -> list[float]:
    """Pool-adjacent-violators for the non-increasing least-squares fit."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in y:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: list[float] = []
    for total, count in blocks:
        out.extend([total / count] * count)
    return out


def soft_rank(values, eps: float) -> np.ndarray:
    """Blondel et al.'s l2 soft rank: projection of values/eps onto the permutahedron of 1..n."""
    theta = np.asarray(values, dtype=np.float64) / eps
    n = len(theta)
    order = np.argsort(-theta, kind="stable")
    s = theta[order]
    w = np.arange(n, 0, -1, dtype=np.float64)
    primal = s - np.array(pav_decreasing(list(s - w)))
    ranks = np.empty(n)
    ranks[order] = primal
    return ranks


def topk(row: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-row, kind="stable")[:k]]


def union(teacher_top: list[int], student_top: list[int]) -> list[int]:
    return list(dict.fromkeys(list(teacher_top) + list(student_top)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt((a * a).sum() * (b * b).sum())
    return 0.0 if denom == 0 else float((a * b).sum() / denom)


def rlkd_ranking(student, teacher, mask=None, k=5, eps=1.0, rank_on="logits") -> float:
    s = student.detach().double().reshape(-1, student.shape[-1]).numpy()
    t = teacher.detach().double().reshape(-1, teacher.shape[-1]).numpy()
    m = np.ones(len(s), bool) if mask is None else mask.reshape(-1).numpy()
    losses = []
    for i in range(len(s)):
        if not m[i]:
            continue
        ids = union(topk(t[i], k), topk(s[i], k))
        ts = softmax(t[i]) if rank_on == "probs" else t[i]
        ss = softmax(s[i]) if rank_on == "probs" else s[i]
        rho = pearson(soft_rank(ss[ids], eps), soft_rank(ts[ids], eps))
        losses.append(1 - rho)
    return float(np.mean(losses)) if losses else 0.0


def random_logits(*shape: int, seed: int = 0, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
