"""Decoding several recognizers as one ensemble, and how differently they err.

Decision rule (minimum Bayes risk over the members' hypotheses): every member transcribes the
utterance; the ensemble answers with the hypothesis whose weighted word edit distance to all the
members' hypotheses is smallest, i.e. the transcript the ensemble agrees with most (ties go to the
earlier member). It needs no shared vocabulary, so Whisper models with different tokenizers and
CTC models over characters combine as they are. Distances are between normalised texts
(:func:`kdforge.evaluation.normalise.normalise_text`), the same normalisation WER uses.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from kdforge.data.audio import read_metadata
from kdforge.errors import KdforgeError
from kdforge.evaluation.normalise import normalise_text
from kdforge.evaluation.recognizers import load_recognizer
from kdforge.evaluation.runner import check_new_file, transcribe_all, write_hypotheses
from kdforge.evaluation.scoring import error_rates


def minimum_bayes_risk(hypotheses: list[str], weights: list[float] | None = None) -> int:
    """Index of the hypothesis with the least weighted word edit distance to all hypotheses."""
    words = [normalise_text(text).split() for text in hypotheses]
    weights = weights or [1.0] * len(hypotheses)
    risks = [sum(w * Levenshtein.distance(mine, other) for w, other in zip(weights, words)) for mine in words]
    return min(range(len(risks)), key=lambda index: (risks[index], index))


def disagreement(references: list[str], first: list[str], second: list[str]) -> dict[str, float]:
    """How two members' transcripts differ over a set.

    Returns:
        ``hypotheses_differ``: fraction of utterances where their normalised transcripts differ;
        ``errors_differ``: the same among utterances that at least one of them gets wrong (1.0 means
        they never make the same mistake, the ideal for an ensemble).
    """
    normal = [(normalise_text(r), normalise_text(a), normalise_text(b)) for r, a, b in zip(references, first, second)]
    differ = [a != b for _, a, b in normal]
    wrong = [(a != r) or (b != r) for r, a, b in normal]
    with_errors = [d for d, w in zip(differ, wrong) if w]
    return {"hypotheses_differ": sum(differ) / len(differ),
            "errors_differ": sum(with_errors) / len(with_errors) if with_errors else 0.0}


def evaluate_ensemble(model_dirs: list[str | Path], data_dir: str | Path, batch_size: int = 8,
                      audio_ctx: int | None = None, weights: list[float] | None = None,
                      out_jsonl: str | Path | None = None, progress: bool = True, no_repeat_ngram_size: int = 0) -> dict:
    """Score every member and their minimum-Bayes-risk ensemble on the audiofolder ``data_dir``
    (``no_repeat_ngram_size``: each Whisper member's loop guard, see
    :class:`~kdforge.evaluation.recognizers.WhisperRecognizer`).

    Returns:
        ``{"wer", "cer", "n", "utterances_per_s"}`` of the ensemble (its time is the members' times
        added: they run one after another), plus ``members`` (each member's scores) and
        ``disagreement`` (each pair, see :func:`disagreement`). ``out_jsonl`` keeps the ensemble's
        hypotheses and, under ``members``, each member's.
    Raises:
        KdforgeError: fewer than two members, weights that do not match, or bad input.
    """
    if len(model_dirs) < 2:
        raise KdforgeError("an ensemble needs at least two --model folders")
    if weights is not None and len(weights) != len(model_dirs):
        raise KdforgeError(f"{len(weights)} weights for {len(model_dirs)} models")
    out_jsonl = check_new_file(out_jsonl)
    records = read_metadata(data_dir)
    references, ids = [r.transcription for r in records], [r.id for r in records]
    members, transcripts, seconds = [], [], 0.0
    for model_dir in model_dirs:
        recognizer = load_recognizer(model_dir, audio_ctx, no_repeat_ngram_size=no_repeat_ngram_size)
        hypotheses, wall, _ = transcribe_all(recognizer, records, batch_size, progress)
        rates = error_rates(references, hypotheses, ids)
        members.append({"model": str(model_dir), "wer": rates.wer, "cer": rates.cer,
                        "utterances_per_s": len(records) / wall})
        transcripts.append(hypotheses)
        seconds += wall
    chosen = [options[minimum_bayes_risk(list(options), weights)] for options in zip(*transcripts)]
    rates = error_rates(references, chosen, ids)
    pairs = [{"a": str(model_dirs[i]), "b": str(model_dirs[j]), **disagreement(references, transcripts[i], transcripts[j])}
             for i, j in itertools.combinations(range(len(model_dirs)), 2)]
    if out_jsonl is not None:
        write_hypotheses(out_jsonl, records, chosen, dict(zip(map(str, model_dirs), transcripts)))
    return {"wer": rates.wer, "cer": rates.cer, "n": len(records), "utterances_per_s": len(records) / seconds,
            "members": members, "disagreement": pairs}
