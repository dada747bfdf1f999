"""The ``kdforge`` command line: argument parsing only; every command calls a public Python API.

Errors a user can fix (bad input, missing files) are :class:`kdforge.errors.KdforgeError`: they
print one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys


def quiet_transformers() -> None:
    """Keep transformers' per-load progress bars and advisory warnings (Whisper's fixed-length windows
    need no attention mask) from burying kdforge's output; a user's own setting of either variable wins.

    The variables act when transformers is first imported; where it already was (a notebook, a test
    session calling :func:`main`), their values are applied to it directly.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity(logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"], logging.WARNING))
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            logging.disable_progress_bar()


quiet_transformers()  # before the commands below import transformers

import typer

from kdforge.cli import bench, demo
from kdforge.cli import cache as cache_cli
from kdforge.cli import data as data_cli
from kdforge.cli import evaluate as evaluate_cli
from kdforge.cli import imports, models
from kdforge.cli import train as train_cli
from kdforge.errors import KdforgeError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="kdforge: distil ensembles and large models into small students.")
app.command("demo")(demo.demo)
app.add_typer(bench.app, name="bench")
app.command("synth-speech")(data_cli.synth_speech)
app.command("eval")(evaluate_cli.eval_command)
app.command("similarity")(evaluate_cli.similarity_command)
app.add_typer(models.app, name="models")
app.add_typer(imports.app, name="import")
app.command("train")(train_cli.train_command)
app.command("cache")(cache_cli.cache_command)
app.add_typer(train_cli.student_app, name="student")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``kdforge`` console script."""
    quiet_transformers()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        app(args=args, prog_name="kdforge", standalone_mode=True)
    except KdforgeError as error:
        if debug:
            raise
        print(f"kdforge: error: {error}", file=sys.stderr)
        sys.exit(2)
