"""Corpus-level word and character error rates with ``jiwer``, on normalised text.

WER = (substitutions + deletions + insertions) / reference words, summed over the whole set (not
a mean of per-utterance rates). CER is the same over characters, spaces included.
"""

from __future__ import annotations

from dataclasses import dataclass

import jiwer

from kdforge.errors import KdforgeError
from kdforge.evaluation.normalise import normalise_text


@dataclass(frozen=True)
class ErrorRates:
    """WER and CER of a set, with the reference sizes they are fractions of."""

    wer: float
    cer: float
    reference_words: int
    reference_characters: int


def error_rates(references: list[str], hypotheses: list[str], ids: list[str] | None = None) -> ErrorRates:
    """Normalise both sides with :func:`normalise_text` and score the whole set at once.

    Args:
        references, hypotheses: one text per utterance, same length.
        ids: utterance names for error messages.
    Raises:
        KdforgeError: lengths differ, or a reference is empty after normalisation (WER undefined).
    """
    if len(references) != len(hypotheses):
        raise KdforgeError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise KdforgeError("nothing to score: no utterances")
    clean_refs = [normalise_text(text) for text in references]
    clean_hyps = [normalise_text(text) for text in hypotheses]
    for index, reference in enumerate(clean_refs):
        if not reference:
            name = ids[index] if ids else f"#{index}"
            raise KdforgeError(f"the reference of {name} is empty after normalisation: {references[index]!r}")
    words = jiwer.process_words(clean_refs, clean_hyps)
    characters = jiwer.process_characters(clean_refs, clean_hyps)
    return ErrorRates(wer=words.wer, cer=characters.cer,
                      reference_words=sum(len(text.split()) for text in clean_refs),
                      reference_characters=sum(len(text) for text in clean_refs))
