"""Text normalisation shared by references and hypotheses (and by the speech corpus' sentences).

WER and CER are only meaningful when both sides are written the same way, so every text goes
through :func:`normalise_text`, in this order:

1. Unicode NFKC; typographic apostrophes and backticks (``’ ‘ ` ´``) become ``'``.
2. Numbers are written out in words, the way the corpus' references are: ``1,000`` -> "one
   thousand", ``144`` -> "one hundred forty four" (American style, no "and"), ``3.5`` -> "three
   point five", ``21st`` -> "twenty first". Years are read as cardinals (``1990`` -> "one thousand
   nine hundred ninety"): the synthesised references never hold digits, so this only matters for
   a model that writes digits for spoken numbers. ``%`` -> "percent", ``&`` -> "and".
3. Lower case; accents dropped (``café`` -> "cafe").
4. Every character other than ``a-z``, apostrophe and space becomes a space (so ``seventy-seven``
   -> "seventy seven" and punctuation disappears); apostrophes at the edge of a word are dropped
   (they are quotation marks there), inner ones kept (``don't``).
5. Runs of spaces collapse to one; no leading or trailing space.
"""

from __future__ import annotations

import re
import unicodedata

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                       "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "`": "'", "´": "'"})
_SYMBOLS = {"%": " percent ", "&": " and "}
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:st|nd|rd|th)?")
_NOT_KEPT = re.compile(r"[^a-z' ]+")


def cardinal_words(number: int) -> str:
    """``144`` -> "one hundred forty four"; numbers of 10**15 and more are read digit by digit."""
    if number >= 10**15:
        return " ".join(_ONES[int(digit)] for digit in str(number))
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, unit = divmod(number, 10)
        return _TENS[tens] + ("" if unit == 0 else " " + _ONES[unit])
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + cardinal_words(rest))
    for scale, name in _SCALES:
        if number >= scale:
            high, rest = divmod(number, scale)
            return cardinal_words(high) + " " + name + ("" if rest == 0 else " " + cardinal_words(rest))
    raise AssertionError("unreachable: every number >= 1000 has a scale")


def ordinal_words(number: int) -> str:
    """``21`` -> "twenty first", ``40`` -> "fortieth": the last word of the cardinal made ordinal."""
    *head, last = cardinal_words(number).split()
    if last in _IRREGULAR_ORDINALS:
        last = _IRREGULAR_ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def _number_words(match: re.Match[str]) -> str:
    """The words of one matched number: ``1,000`` / ``3.5`` / ``21st``."""
    token = match.group(0)
    is_ordinal = token[-2:] in ("st", "nd", "rd", "th")
    digits = token[:-2] if is_ordinal else token
    whole, _, fraction = digits.replace(",", "").partition(".")
    if is_ordinal and not fraction:
        return f" {ordinal_words(int(whole))} "
    words = cardinal_words(int(whole))
    if fraction:
        words += " point " + " ".join(_ONES[int(digit)] for digit in fraction)
    return f" {words} "


def normalise_text(text: str) -> str:
    """Normalise one transcript as the module docstring describes: ``"Don't, 1,000 Cafés!"`` ->
    ``"don't one thousand cafes"``."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    text = _NUMBER.sub(_number_words, text)
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(char for char in text if not unicodedata.combining(char))
    words = (word.strip("'") for word in _NOT_KEPT.sub(" ", text).split())
    return " ".join(word for word in words if word)
