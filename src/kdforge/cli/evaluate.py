"""``kdforge eval``: argument parsing and printing for :func:`kdforge.evaluation.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

JSON_KEYS = ("wer", "cer", "n", "utterances_per_s")


def eval_command(
    model: Path = typer.Option(..., "--model", help="Hugging Face model directory (Whisper)."),
    data: Path = typer.Option(..., "--data", help="Audiofolder: a folder with metadata.csv (e.g. CORPUS/test)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Utterances decoded together."),
    audio_ctx: int = typer.Option(None, "--audio-ctx", help="Whisper encoder positions kept (1500 = 30 s, 400 = 8 s)."),
    out: Path = typer.Option(None, "--out", help="New JSONL file keeping every hypothesis."),
) -> None:
    """Greedy-decode an audiofolder; print a table, then a JSON line {wer, cer, n, utterances_per_s}."""
    from kdforge.evaluation import evaluate

    result = evaluate(model, data, batch_size=batch_size, audio_ctx=audio_ctx, out_jsonl=out)
    table = Table(title=f"kdforge eval: {model.name} on {data}")
    for column in ("WER", "CER", "utterances", "utt/s", "audio s", "audio_ctx", "batch"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['wer']:.4f}", f"{result['cer']:.4f}", str(result["n"]),
                  f"{result['utterances_per_s']:.2f}", f"{result['audio_seconds']:.1f}",
                  "model's" if audio_ctx is None else str(audio_ctx), str(batch_size))
    Console().print(table)
    print(json.dumps({key: result[key] for key in JSON_KEYS}))
