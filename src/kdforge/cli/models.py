"""``kdforge models list|prepare``: the known pretrained checkpoints (see :mod:`kdforge.models.prepare`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kdforge.home import kdforge_home
from kdforge.models.prepare import list_models, prepare as prepare_models
from kdforge.models.registry import CHECKPOINTS

app = typer.Typer(no_args_is_help=True, help="Real pretrained checkpoints, converted once into Hugging Face folders.")

HOME_OPTION = typer.Option(None, "--home", help="Cache root (default: $KDFORGE_HOME, else ~/.cache/kdforge).")


@app.command("list")
def list_command(home: Path | None = HOME_OPTION) -> None:
    """Show the known checkpoints: installed, prepared, size, licence, parameters."""
    table = Table(title="kdforge models", caption=f"prepared folders: {kdforge_home(home) / 'models'}/NAME")
    table.add_column("name", no_wrap=True, min_width=max(len(name) for name in CHECKPOINTS))
    for column in ("installed", "prepared", "size", "licence", "params"):
        table.add_column(column, no_wrap=True)
    for row in list_models(home):
        table.add_row(row.name, "yes" if row.installed else "no", "yes" if row.prepared else "no",
                      f"{row.size_mb} MB", row.licence, f"{row.parameters / 1e6:.1f}M")
    Console().print(table)


@app.command("prepare")
def prepare_command(
    name: str = typer.Argument(..., help=f"One of {', '.join(CHECKPOINTS)}, or 'all'."),
    home: Path | None = HOME_OPTION,
) -> None:
    """Convert a checkpoint (or all) into $KDFORGE_HOME/models/NAME; does nothing if already there."""
    names = list(CHECKPOINTS) if name == "all" else [name]
    for each in names:
        started = time.perf_counter()
        result = prepare_models(each, home)[0]
        if result.created:
            print(f"{result.name}: prepared in {result.path} ({time.perf_counter() - started:.1f} s)")
        else:
            print(f"{result.name}: already prepared in {result.path}, nothing to do")


@app.command("init-ctc")
def init_ctc_command(
    out: Path = typer.Option(..., "--out", help="Where to save the new model (must not hold anything)."),
    size: str = typer.Option("small", help="small (~3M parameters) or tiny (for tests)."),
    frame_stack: int = typer.Option(4, min=1, help="Mel frames per model frame: 4 = 25 frames per second."),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Create a randomly initialised CTC Conformer over characters, to train with `kdforge train`."""
    from kdforge.models.ctc import build_ctc_model

    print(build_ctc_model(out, size=size, frame_stack=frame_stack, seed=seed))
