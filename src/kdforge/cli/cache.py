"""``kdforge cache CONFIG.yaml --out DIR`` and ``kdforge cache verify DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kdforge.errors import KdforgeError


def cache_command(
    target: str = typer.Argument(..., help="A run config whose teachers to cache, or 'verify'."),
    folder: Path = typer.Argument(None, help="With 'verify': the cache folder."),
    out: Path = typer.Option(None, "--out", help="The new cache folder (with a config)."),
    workers: int = typer.Option(1, "--workers", min=1, help="ASR: teachers run at once, one process each."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: key.path=value (repeatable)."),
) -> None:
    """Run every teacher once over the training data (ASR audio, or LM records) and store its signals; or check a cache."""
    from kdforge.teachers.cache import verify_cache

    if target == "verify":
        if folder is None:
            raise KdforgeError("usage: kdforge cache verify CACHE_DIR")
        print(f"{folder}: {verify_cache(folder)} shards match the manifest")
        return
    if out is None:
        raise KdforgeError("usage: kdforge cache CONFIG.yaml --out CACHE_DIR [--workers N]")
    from kdforge.config import load_config
    from kdforge.teachers.build import build_cache_from_config

    config = load_config(target, overrides)
    if not config.teachers:
        raise KdforgeError(f"{target} names no teachers to cache")
    print(json.dumps(build_cache_from_config(config, out, workers=workers)))
