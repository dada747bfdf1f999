"""``kdforge demo``: the main job (ensemble distillation on built-in data); see :mod:`kdforge.demo`."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for results and the student (new or empty)."),
    configs: Path = typer.Option(Path("configs"), help="The repository's configs folder (teachers/ and asr/)."),
    home: Path = typer.Option(None, "--home", help="Where shared teachers and caches live (default: $KDFORGE_HOME)."),
    method: list[str] = typer.Option([], "--method", help="Student methods to distil (repeatable; default: "
                                     "lora_ce, lora_logit_kd, lora_lppm, lora_lppm_rlkd)."),
    seeds: int = typer.Option(1, min=1, help="Training seeds per student method."),
    student_steps: int = typer.Option(None, min=1, help="Steps per student (default: 60)."),
    teacher_steps: list[str] = typer.Option([], "--teacher-steps", help="NAME=STEPS: adapt that teacher longer or "
                                            "shorter (repeatable; default whisper-base=30, whisper-tiny.en=40, "
                                            "ctc=300); other teacher budgets make another shared workspace."),
    utterances: int = typer.Option(None, min=2, help="Utterances to synthesise, 10% of them held out for the "
                                   "unseen-voice test (default: 400); another corpus makes another shared workspace."),
    labelled: int = typer.Option(None, min=1, help="Training utterances with transcripts, the teachers' adaptation "
                                 "set (default: 120); the students hear every training utterance."),
    settings: list[str] = typer.Option([], "--set", help="KEY=VALUE for every student's config (repeatable), e.g. "
                                       "alignment.weight=0.1 (not applied to a method whose config leaves that "
                                       "section out); teachers and cache are shared with other demos."),
) -> None:
    """Run the main job end to end: prepare models, synthesise speech, adapt teachers, cache, distil, score.

    Other methods, seeds or student budgets reuse the same teachers and cache (in $KDFORGE_HOME)."""
    from dataclasses import replace

    from kdforge.benchmarks.asr import to_markdown
    from kdforge.demo import DemoPlan, parse_teacher_steps, run_demo

    default = DemoPlan()
    plan = replace(default, methods=tuple(method) or default.methods, seeds=seeds,
                   student_steps=student_steps or default.student_steps, student_settings=tuple(settings),
                   teacher_steps=parse_teacher_steps(teacher_steps, default.teacher_steps),
                   utterances=utterances or default.utterances, labelled=labelled or default.labelled)
    report = run_demo(out, plan=plan, configs=configs, home=home)
    typer.echo(to_markdown(report))
