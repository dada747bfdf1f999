"""``kdforge eval``: argument parsing and printing for :func:`kdforge.evaluation.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

JSON_KEYS = ("wer", "cer", "n", "utterances_per_s")


def eval_command(
    models: list[Path] = typer.Option(..., "--model", help="Model directory (Whisper or kdforge CTC); "
                                      "repeat it to decode an ensemble."),
    data: Path = typer.Option(..., "--data", help="Audiofolder: a folder with metadata.csv (e.g. CORPUS/test)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Utterances decoded together."),
    audio_ctx: int = typer.Option(None, "--audio-ctx", help="Whisper encoder positions kept (1500 = 30 s, 400 = 8 s)."),
    out: Path = typer.Option(None, "--out", help="New JSONL file keeping every hypothesis (an ensemble's members' too, under \"members\")."),
    no_repeat_ngram: int = typer.Option(0, "--no-repeat-ngram", min=0, help="Whisper models (CTC ones cannot loop): never repeat a token n-gram "
                                        "of this size in a transcript (a guard against decoding loops); 0: plain "
                                        "greedy, as every documented number."),
) -> None:
    """Greedy-decode an audiofolder; print a table, then a JSON line {wer, cer, n, utterances_per_s}.

    With several --model folders they are decoded as one ensemble (minimum Bayes risk over their
    transcripts); the table shows each member and the ensemble, and the JSON line adds ``members``
    and their pairwise ``disagreement``.
    """
    from kdforge.evaluation import evaluate
    from kdforge.evaluation.ensemble import evaluate_ensemble

    window = "model's" if audio_ctx is None else str(audio_ctx)
    if len(models) > 1:
        result = evaluate_ensemble(models, data, batch_size=batch_size, audio_ctx=audio_ctx, out_jsonl=out,
                                   no_repeat_ngram_size=no_repeat_ngram)
        table = Table(title=f"kdforge eval: ensemble of {len(models)} on {data}")
        for column in ("model", "WER", "CER", "utt/s"):
            table.add_column(column, justify="right")
        for member in result["members"]:
            table.add_row(Path(member["model"]).name, f"{member['wer']:.4f}", f"{member['cer']:.4f}",
                          f"{member['utterances_per_s']:.2f}")
        table.add_row("ensemble (MBR)", f"{result['wer']:.4f}", f"{result['cer']:.4f}", f"{result['utterances_per_s']:.2f}")
        Console().print(table)
        print(json.dumps({**{key: result[key] for key in JSON_KEYS}, "members": result["members"],
                          "disagreement": result["disagreement"]}))
        return
    model = models[0]
    result = evaluate(model, data, batch_size=batch_size, audio_ctx=audio_ctx, out_jsonl=out,
                      no_repeat_ngram_size=no_repeat_ngram)
    table = Table(title=f"kdforge eval: {model.name} on {data}")
    for column in ("WER", "CER", "utterances", "utt/s", "audio s", "audio_ctx", "batch"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['wer']:.4f}", f"{result['cer']:.4f}", str(result["n"]),
                  f"{result['utterances_per_s']:.2f}", f"{result['audio_seconds']:.1f}", window, str(batch_size))
    Console().print(table)
    print(json.dumps({key: result[key] for key in JSON_KEYS}))


def similarity_command(
    students: list[Path] = typer.Option(..., "--student", help="Whisper model directory; repeat it to compare several."),
    teachers: list[Path] = typer.Option(..., "--teacher", help="Whisper or kdforge CTC model directory; repeat it."),
    data: Path = typer.Option(..., "--data", help="Audiofolder: a folder with metadata.csv (e.g. CORPUS/test)."),
    audio_ctx: int = typer.Option(None, "--audio-ctx", help="Whisper encoder positions kept (400 = 8 s), as in training."),
    batch_size: int = typer.Option(8, "--batch-size", help="Utterances run together."),
    out: Path = typer.Option(None, "--out", help="New JSON file keeping every row."),
) -> None:
    """Linear CKA between each student encoder layer and its paired layer of each teacher; a table, then JSON rows.

    How far distillation moved the students' representations towards the teachers' (1 = the same up to
    an orthogonal map and scale): compare a student before training (its student-init folder) with
    students trained with and without the projection mapping.
    """
    from kdforge.evaluation.runner import check_new_file
    from kdforge.evaluation.similarity import representation_similarity
    from kdforge.files import write_json_atomic

    out = check_new_file(out)
    rows = representation_similarity(students, teachers, data, audio_ctx=audio_ctx, batch_size=batch_size)
    table = Table(title=f"kdforge similarity: linear CKA on {data}")
    for column in ("student", "layer", *(_short_name(t) for t in teachers)):
        table.add_column(column, justify="right")
    for student in dict.fromkeys(row["student"] for row in rows):
        for layer in dict.fromkeys(row["student_layer"] for row in rows if row["student"] == student):
            cells = [f"{row['cka']:.3f} (L{row['teacher_layer']})" for row in rows
                     if row["student"] == student and row["student_layer"] == layer]
            table.add_row(_short_name(student), str(layer), *cells)
    Console().print(table)
    if out is not None:
        write_json_atomic(out, rows)
    print(json.dumps(rows))


def _short_name(model_dir: str | Path) -> str:
    """A model folder's last two path parts (``lora_lppm-s0/student``): run folders name their models ``student``."""
    return "/".join(Path(model_dir).parts[-2:])
