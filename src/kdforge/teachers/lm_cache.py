"""The offline cache of causal-LM teachers: each teacher's top-k next-token distribution, stored once.

Same folder layout and checks as the ASR cache (:mod:`kdforge.teachers.cache`). Each tokenised
example of the training data (and of the held-out data, for the agreement metrics) is an entry
``train-000042`` / ``eval-000007`` holding, for each of its positions t = 0..n-2 (the prediction of
token t + 1), the :class:`~kdforge.losses.TopKTeacher` fields ``topk_ids (n-1, k)``,
``topk_logprobs (n-1, k)`` and ``tail_logprob (n-1,)``.

The cache's data fingerprint is taken over the token ids and target masks themselves, so another
text, tokenizer, chat template or ``max_length`` makes it stale; the settings hold ``top_k``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kdforge.losses import TopKTeacher
from kdforge.tasks.lm import Example, collate, load_causal_lm, next_token_logits
from kdforge.teachers.cache import (TOP_K_FIELDS, TeacherCache, TeacherShards, as_top_k, model_identity,
                                    sealed_build, stack_top_k, top_k_signals, write_manifest)
from kdforge.teachers.ensemble import ensemble_top_k

Splits = dict[str, list[Example]]


def entry_id(split: str, index: int) -> str:
    """The cache entry of example ``index`` of ``split`` (``train`` or ``eval``)."""
    return f"{split}-{index:06d}"


def examples_fingerprint(splits: Splits) -> str:
    """sha256 over every split's token ids and target masks (what the teachers were run on)."""
    digest = hashlib.sha256()
    for split, examples in sorted(splits.items()):
        digest.update(split.encode())
        for example in examples:
            digest.update(repr((example.ids, example.is_target)).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def build_lm_cache(teachers: dict[str, str | Path], splits: Splits, pad_id: int, out: str | Path, top_k: int = 32,
                   batch_size: int = 8, show_progress: bool = True) -> dict:
    """Run each teacher once over every example of ``splits`` and store its top-k into the new folder ``out``.

    Returns:
        ``{"seconds": wall time, "teacher_seconds": {name: seconds}}``.
    """
    started = time.perf_counter()
    seconds = {}
    with sealed_build(out) as folder:
        written = {}
        for name, model_dir in teachers.items():
            began = time.perf_counter()
            model, _ = load_causal_lm(model_dir)
            model.eval()
            shards = TeacherShards(folder, name)
            for split, examples in splits.items():
                starts = range(0, len(examples), batch_size)
                for start in tqdm(starts, desc=f"caching {name} ({split})", unit="batch", disable=not show_progress):
                    chunk = examples[start : start + batch_size]
                    logits = next_token_logits(model, collate(chunk, pad_id))
                    for row, example in enumerate(chunk):
                        shards.add(entry_id(split, start + row), top_k_signals(logits[row, : len(example.ids) - 1], top_k))
            written[name] = (model_identity(model_dir), {"top_k": top_k}, shards)
            seconds[name] = time.perf_counter() - began
        write_manifest(folder, examples_fingerprint(splits), written)
    return {"seconds": time.perf_counter() - started, "teacher_seconds": seconds}


class CachedLMTeachers:
    """The teachers' (weighted) ensemble distribution of training or held-out examples, read from a cache.

    Args:
        root: the cache folder.
        teachers: name -> ``(model folder, weight)``, in the run's order.
        splits: the run's tokenised examples; they must be the ones the cache was built on.
        top_k: the ``cache.top_k`` the run expects.

    Raises:
        KdforgeError: the cache holds other teachers, settings or examples (named).
    """

    def __init__(self, root: str | Path, teachers: dict[str, tuple[str | Path, float]], splits: Splits, top_k: int):
        expected = {name: (model_dir, {"top_k": top_k}) for name, (model_dir, _) in teachers.items()}
        self.cache = TeacherCache(root, expected, examples_fingerprint(splits))
        self.names = list(teachers)
        self.weights = [weight for _, weight in teachers.values()]

    def top_k(self, split: str, indices: list[int], length: int) -> TopKTeacher:
        """The ensemble's top-k on the ``(B, length)`` grid of a batch of these examples (``length`` = L-1)."""
        entries = [entry_id(split, index) for index in indices]
        grids = [stack_top_k(as_top_k(self.cache.batch(name, entries, TOP_K_FIELDS)), 0, length) for name in self.names]
        return ensemble_top_k(grids, self.weights) if len(grids) > 1 else grids[0]
