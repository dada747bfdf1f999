"""Where kdforge keeps what it builds once: prepared models, trained tiny teachers, caches."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def kdforge_home(home: str | Path | None = None) -> Path:
    """``home``, else ``$KDFORGE_HOME``, else ``~/.cache/kdforge``."""
    if home is not None:
        return Path(home)
    return Path(os.environ.get("KDFORGE_HOME") or Path.home() / ".cache" / "kdforge")


def built_once(kind: str, name: str, build: Callable[[Path], None], home: str | Path | None = None) -> Path:
    """``$KDFORGE_HOME/<kind>/<name>``, made by ``build(folder)`` the first time it is asked for.

    ``build`` writes into a hidden sibling folder that is renamed into place once complete, so a
    crash never leaves a half-built folder and processes racing for the same name (two torchrun
    ranks) all end up with one complete copy.
    """
    final = kdforge_home(home) / kind / name
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        build(staging)
        staging.rename(final)
    except OSError:
        if not final.exists():  # a real failure, not another process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
