"""Writing files so that nothing of an earlier run is overwritten or half-written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kdforge.errors import KdforgeError


def check_new_folder(path: str | Path) -> Path:
    """``path`` as a Path, refusing a file or a non-empty folder (an empty or missing one is fine).

    Raises:
        KdforgeError: something is already there; it is never overwritten.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise KdforgeError(f"{path} exists and is not an empty folder: it is never overwritten, choose another")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def write_json_atomic(path: Path, payload: dict | list) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
