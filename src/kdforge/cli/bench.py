"""``kdforge bench ...``: benchmarks that write JSON + markdown results."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import get_args

import typer

from kdforge.benchmarks import losses as loss_benchmark
from kdforge.benchmarks.lm_real import RealPlan
from kdforge.losses import OBJECTIVES, ranking
from kdforge.errors import KdforgeError

app = typer.Typer(no_args_is_help=True, help="Benchmarks: each writes DIR/<name>.json and DIR/<name>.md.")


@app.command("losses")
def bench_losses(
    out: Path = typer.Option(..., "--out", help="Folder for losses.json and losses.md."),
    repeats: int = typer.Option(2, min=1, help="Timed forward+backward calls per case (after one warm-up)."),
    quick: bool = typer.Option(False, help="Small shapes (512 x 8,000 and 128 x 32,000) for a fast smoke run."),
) -> None:
    """Time and peak memory of every objective, dense and chunked, and the ranking term's cost."""
    shapes = ((512, 8_000), (128, 32_000)) if quick else loss_benchmark.SHAPES
    command = f"kdforge bench losses --out {out} --repeats {repeats}" + (" --quick" if quick else "")
    report = loss_benchmark.run(out, shapes=shapes, repeats=repeats, command=command)
    typer.echo(loss_benchmark.to_markdown(report))


#: ``--rank-on``'s choices: the ranking term's own (typer needs an Enum).
RankOn = Enum("RankOn", {name: name for name in get_args(ranking.RankOn)}, type=str)


def objective_names(text: str) -> tuple[str, ...]:
    """``--objectives``: base objective names, comma-separated.

    Raises:
        KdforgeError: an unknown name, or none.
    """
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in chosen if name not in OBJECTIVES]
    if unknown or not chosen:
        raise KdforgeError(f"--objectives: unknown objective {unknown[0] if unknown else '(none)'!r} "
                           f"(known: {', '.join(OBJECTIVES)})")
    return chosen


@app.command("lm")
def bench_lm(
    out: Path = typer.Option(..., "--out", help="Folder for lm.json, lm.md and lm_agreement.png."),
    seeds: int = typer.Option(None, help="Seeds per row (default: 1 with --quick, else 3)."),
    quick: bool = typer.Option(False, help="kl, rkl, tvd only, one seed, shorter training (< 10 min)."),
    long: bool = typer.Option(False, help="The earlier, longer plan: better trained teachers, 400 distillation "
                              "steps (about 2 hours from a cold start)."),
    objectives: str = typer.Option(None, help="Base objectives, comma-separated (default: the plan's)."),
    rlkd_weight: float = typer.Option(None, min=0.0, help="Weight of the ranking term (default: 2, the paper's)."),
    rank_on: RankOn = typer.Option(None, help="What the ranking term ranks (default: logits, the official code's)."),
    rank_eps: float = typer.Option(None, min=1e-6, help="The soft rank's regularisation strength (default: 1)."),
    student_lm_steps: int = typer.Option(None, min=0, help="Steps of language modelling on the corpus that each "
                                         "student takes before distillation; 0 = random students (default: 300, "
                                         "100 with --quick, 400 with --long)."),
) -> None:
    """RLKD's tables on tiny models: agreement (Table 1), accuracy (Table 2), step cost (Table 4)."""
    from kdforge.benchmarks import lm as lm_benchmark

    if quick and long:
        raise KdforgeError("--quick and --long are two different plans: give one of them")
    plan_name = "quick" if quick else "long" if long else "full"
    chosen = objective_names(objectives) if objectives else None
    command = ("kdforge bench lm --out DIR" + ("" if plan_name == "full" else f" --{plan_name}")
               + (f" --seeds {seeds}" if seeds else "")
               + (f" --objectives {','.join(chosen)}" if chosen else "")
               + (f" --rlkd-weight {rlkd_weight:g}" if rlkd_weight is not None else "")
               + (f" --rank-on {rank_on.value}" if rank_on else "")
               + (f" --rank-eps {rank_eps:g}" if rank_eps is not None else "")
               + (f" --student-lm-steps {student_lm_steps}" if student_lm_steps is not None else ""))
    report = lm_benchmark.run(out, plan_name, command=command, seeds=seeds, objectives=chosen,
                              rlkd_weight=rlkd_weight, rank_on=rank_on.value if rank_on else None, rank_eps=rank_eps,
                              student_lm_steps=student_lm_steps)
    typer.echo(lm_benchmark.to_markdown(report))


@app.command("lm-real")
def bench_lm_real(
    out: Path = typer.Option(..., "--out", help="New folder for lm-real.json, lm-real.md, the plot and every run."),
    data: Path = typer.Option(..., "--data", help="Training JSONL ('text', or 'query' and 'response')."),
    eval_data: Path = typer.Option(..., "--eval", help="Held-out JSONL of the same kind."),
    steps: int = typer.Option(RealPlan.steps, min=1, help="Training steps per student."),
    layers: int = typer.Option(RealPlan.student_layers, min=1, help="Teacher layers the student keeps."),
    max_length: int = typer.Option(RealPlan.max_length, min=8, help="Tokens per sequence."),
    batch_size: int = typer.Option(RealPlan.batch_size, min=1, help="Sequences per step."),
    train_records: int = typer.Option(RealPlan.train_records, min=1,
                                      help="Training records (the first N of --data that are not held out)."),
    eval_records: int = typer.Option(RealPlan.eval_records, min=1, help="Held-out records (the last N of --eval)."),
    objectives: str = typer.Option(",".join(RealPlan.objectives), help="Base objectives, comma-separated."),
    seeds: int = typer.Option(RealPlan.seeds, min=1, help="Seeds per row (they set the batch order): mean and spread."),
    teacher: Path = typer.Option(None, help="A causal-LM folder in place of SmolLM2-135M-Instruct."),
    timing_repeats: int = typer.Option(5, min=1, help="Timed steps (median) of the ranking term's cost measurement: "
                                       "a cost of a few percent needs dozens."),
) -> None:
    """RLKD with a real teacher: each objective without and with the ranking term, CR@k, MOR@k, perplexity."""
    from kdforge.benchmarks import lm_real

    chosen = objective_names(objectives)
    plan = RealPlan(objectives=chosen, student_layers=layers, steps=steps, max_length=max_length,
                    batch_size=batch_size, train_records=train_records, eval_records=eval_records, seeds=seeds)
    command = (f"kdforge bench lm-real --out DIR --data {data} --eval {eval_data} --steps {steps} --layers {layers} "
               f"--max-length {max_length} --batch-size {batch_size} --train-records {train_records} --eval-records {eval_records} "
               f"--objectives {','.join(chosen)} --seeds {seeds} --timing-repeats {timing_repeats}"
               + (f" --teacher {teacher}" if teacher else ""))
    report = lm_real.run(out, data, eval_data, plan, teacher=teacher, timing_repeats=timing_repeats, command=command)
    typer.echo(lm_real.to_markdown(report))


@app.command("asr-teachers")
def bench_asr_teachers(
    out: Path = typer.Option(..., "--out", help="Folder for teachers.json, teachers.md and teachers_wer.png."),
    data: Path = typer.Option(..., "--data", help="The unseen-voice test audiofolder."),
    teacher: list[str] = typer.Option(..., "--teacher", help="NAME=DIR1,DIR2,...: an adapted teacher, one folder "
                                      "per seed (repeat for each teacher)."),
    zeroshot: list[str] = typer.Option([], "--zeroshot", help="NAME=DIR: an unadapted model (repeatable)."),
    audio_ctx: int = typer.Option(None, "--audio-ctx", help="Whisper encoder positions (400 = 8 s)."),
) -> None:
    """Adapted teachers (mean and spread over seeds), their ensemble, and zero-shot Whisper on unseen voices."""
    from kdforge.benchmarks import asr_teachers

    def named(option: str) -> tuple[str, str]:
        name, _, value = option.partition("=")
        if not name or not value:
            raise KdforgeError(f"expected NAME=DIR[,DIR...], got {option!r}")
        return name, value

    members = {name: [Path(p) for p in value.split(",")] for name, value in map(named, teacher)}
    unadapted = {name: Path(value) for name, value in map(named, zeroshot)}
    command = "kdforge bench asr-teachers " + " ".join(
        [f"--out {out}", f"--data {data}", *[f"--teacher {t}" for t in teacher], *[f"--zeroshot {z}" for z in zeroshot]]
        + ([f"--audio-ctx {audio_ctx}"] if audio_ctx else []))
    report = asr_teachers.run(members, unadapted, data, out, audio_ctx=audio_ctx, command=command)
    typer.echo(asr_teachers.to_markdown(report))


@app.command("asr")
def bench_asr(
    out: Path = typer.Option(..., "--out", help="Folder for asr.json, asr.md, asr_wer.png and runs/."),
    seeds: int = typer.Option(3, min=1, help="Training seeds per student method."),
    configs: Path = typer.Option(Path("configs/asr"), help="The folder of the method configs."),
    test: Path = typer.Option(None, help="The unseen-voice test audiofolder (default: the configs' data.eval)."),
    teachers: Path = typer.Option(None, help="teachers.json of `kdforge bench asr-teachers`, for the teacher, "
                                  "zero-shot and ensemble rows."),
    method: list[str] = typer.Option([], "--method", help="Only these method keys (repeatable; default: all)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key in every method's config that has its section (repeatable)."),
) -> None:
    """Every student row of the comparison, mean and spread over seeds; finished runs are reused."""
    from kdforge.benchmarks import asr
    from kdforge.config import load_config

    methods = tuple(method) or tuple(asr.STUDENT_METHODS)
    test = test or load_config(configs / "lora-lppm.yaml", overrides).data.eval
    command = " ".join(["kdforge bench asr", f"--out {out}", f"--seeds {seeds}", *[f"--method {m}" for m in method],
                        *[f"--set {o}" for o in overrides]] + ([f"--teachers {teachers}"] if teachers else []))
    report = asr.run(out, configs, methods, seeds, Path(test), teachers, tuple(overrides), command)
    typer.echo(asr.to_markdown(report))


@app.command("perf")
def bench_perf(
    out: Path = typer.Option(..., "--out", help="Folder for perf.json and perf.md."),
    quick: bool = typer.Option(False, help="Built-in tiny models, fewer repeats: a smoke run (< 3 min), not a measurement."),
    configs: Path = typer.Option(Path("configs"), help="The repository's configs folder (asr/, tiny-asr.yaml, tiny-lm.yaml)."),
    student: Path = typer.Option(None, help="A trained student folder to decode for the throughput ratio "
                                 "(default: the recipe's student, untrained)."),
    step_repeats: int = typer.Option(None, min=1, help="Timed training steps per task, their median taken "
                                     "(default 20; --quick: 2)."),
) -> None:
    """Step, cache, data-parallel, memory and decoding costs as ratios measured in one run (about 15 min)."""
    from kdforge.benchmarks import perf

    command = " ".join(["kdforge bench perf", f"--out {out}"] + (["--quick"] if quick else [])
                       + ([f"--student {student}"] if student else [])
                       + ([f"--step-repeats {step_repeats}"] if step_repeats else []))
    report = perf.run(out, quick=quick, command=command, configs=configs, student=student, step_repeats=step_repeats)
    typer.echo(perf.to_markdown(report))
