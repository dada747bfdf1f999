"""``kdforge train`` and ``kdforge student init``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kdforge.config import load_config
from kdforge.errors import KdforgeError
from kdforge.student.init import init_student
from kdforge.training.distributed import current_rank
from kdforge.training.loop import train

student_app = typer.Typer(no_args_is_help=True, help="Build students from teachers.")


def train_command(
    config: Path = typer.Argument(..., help="A YAML run config (see configs/)."),
    out: Path = typer.Option(..., "--out", help="The run folder (checkpoints, history, student/)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: key.path=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run in --out from its last checkpoint."),
) -> None:
    """Distil (or fine-tune) a student as the config says; the last stdout line is the result JSON.

    Data parallel: ``torchrun --nproc_per_node N -m kdforge train CONFIG --out DIR``."""
    result = train(load_config(config, overrides), out, resume=resume)
    if current_rank() == 0:  # one result line, however many processes a launcher started
        typer.echo(json.dumps(result))


@student_app.command("init")
def student_init(
    source: Path = typer.Option(..., "--from", help="The teacher's model directory."),
    out: Path = typer.Option(..., "--out", help="Where to save the student."),
    layers: str = typer.Option(None, help="Comma-separated teacher layers to keep, e.g. 0,5,10."),
    num_layers: int = typer.Option(None, help="Keep this many maximally spaced (decoder) layers (default: 2 of a Whisper decoder, a quarter of an LM)."),
    encoder_layers: int = typer.Option(None, min=1, help="Whisper: keep this many maximally spaced encoder layers too (default: all)."),
) -> None:
    """Save a student made of some of the teacher's layers."""
    try:
        kept = [int(part) for part in layers.split(",")] if layers else None
    except ValueError:
        raise KdforgeError(f"--layers takes comma-separated layer numbers, got {layers!r}") from None
    typer.echo(init_student(source, out, kept, num_layers, encoder_layers))
