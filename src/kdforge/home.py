"""Where kdforge keeps what it builds once: prepared models, trained tiny teachers, caches."""

from __future__ import annotations

import os
from pathlib import Path


def kdforge_home(home: str | Path | None = None) -> Path:
    """``home``, else ``$KDFORGE_HOME``, else ``~/.cache/kdforge``."""
    if home is not None:
        return Path(home)
    return Path(os.environ.get("KDFORGE_HOME") or Path.home() / ".cache" / "kdforge")
