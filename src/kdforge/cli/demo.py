"""``kdforge demo``: the main job (ensemble distillation on built-in data); see :mod:`kdforge.demo`."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for results and the student (new or empty)."),
    configs: Path = typer.Option(Path("configs"), help="The repository's configs folder (teachers/ and asr/)."),
    home: Path = typer.Option(None, "--home", help="Where shared teachers and caches live (default: $KDFORGE_HOME)."),
) -> None:
    """Run the main job end to end: prepare models, synthesise speech, adapt teachers, cache, distil, score."""
    from kdforge.benchmarks.asr import to_markdown
    from kdforge.demo import run_demo

    report = run_demo(out, configs=configs, home=home)
    typer.echo(to_markdown(report))
