"""``kdforge bench perf``: what distillation costs, as ratios of times measured in one run on one machine.

* ``cached_step_over_student_step``: one training step of the ASR recipe (``configs/asr/lora-lppm-rlkd.yaml``:
  LoRA student, KD + RLKD from the teachers sharing its vocabulary, LPPM from all three teachers, read
  from the teacher cache) over a plain student step (cross-entropy on the references) on the same batch.
  A step is building the batch, forward, backward and AdamW (:mod:`kdforge.benchmarks.steps`).
  The same step without the projection mapping, and without KD and RLKD, is timed beside it: what
  each group of terms costs. ``mapping_products_seconds`` times the student's projections alone on
  the batch's points, forward and backward: the products the mapping cannot do without, so
  ``cached_step_floor_over_student_step`` (the step without the mapping, plus those products, over
  the student step) is the ratio a mapping with no other cost would reach.
* ``bfloat16_student_step_speedup`` and ``bfloat16_cached_step_over_student_step``: the plain and the
  cached step again under ``training.precision: bfloat16`` (mixed precision,
  :mod:`kdforge.training.precision`), timed in the same turns: what it saves on this machine's
  processor (a CPU with bfloat16 matrix units gains most), and whether the ratio holds there.
* ``online_over_cached_speedup``: the same distillation step with the teachers run on the batch
  (:func:`kdforge.teachers.build.teacher_signals`, the cache builder's own code) over the cached step.
  The teachers' greedy transcripts, which pick the training targets, still come from the cache: an
  online recipe would decode them too, so the online step is a lower bound.
* ``parallel_cache_speedup``: building the three teachers' cache with 1 worker over 2 workers
  (:func:`kdforge.teachers.build.build_cache_from_config`).
* ``ddp_2proc_throughput_ratio``: training samples per second of ``torchrun --nproc_per_node 2`` over
  1 process, on the tiny LM config (``configs/tiny-lm.yaml``); each launch's threads share the cores.
* ``chunked_peak_mb`` / ``naive_peak_mb``: memory one KL forward + backward adds at V = 128,000,
  chunked and plain autograd (:func:`kdforge.benchmarks.losses.run_case`, in fresh processes).
* ``student_over_ensemble_throughput``: utterances per second of greedy decoding at batch 8, the
  student over the minimum-Bayes-risk ensemble (its members run one after another).

Full runs use the real checkpoints (whisper-base and whisper-tiny.en, prepared on first use), a CTC
Conformer of the recipe's size with untrained weights, and the recipe's student (whisper-tiny.en's
encoder and 2 decoder layers, untrained LoRA) unless a trained one is given; ``quick`` runs the same
code on built-in tiny models, for a smoke test. Speech: 96 clean eSpeak utterances
(:func:`kdforge.data.synth.synthesize_corpus`, made once), quick: the 32 of ``builtin:tiny-speech``.
Writes ``perf.json`` and ``perf.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kdforge.benchmarks.machine import describe_machine, machine_line
from kdforge.errors import KdforgeError
from kdforge.files import write_json_atomic, write_text_atomic
from kdforge.models.loading import model_type_of
from kdforge.tasks.asr_distill import WhisperDistillationTask

#: The vocabulary of the issue's memory measurement.
MEMORY_VOCAB = 128_000
#: A launch that takes longer has hung (gloo waiting on a peer that died): the metric is given up.
DDP_TIMEOUT_S = 600
#: Every metric ``perf.json`` carries at its top level (None where one could not be measured).
METRICS = ("cached_step_over_student_step", "online_over_cached_speedup", "parallel_cache_speedup",
           "ddp_2proc_throughput_ratio", "chunked_peak_mb", "naive_peak_mb", "student_over_ensemble_throughput")


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    real_models: bool
    utterances: int | None  # eSpeak training utterances synthesised for the run; None: the built-in 32
    step_repeats: int
    kl_positions: int
    ddp_steps: int


FULL = Plan(real_models=True, utterances=96, step_repeats=20, kl_positions=1024, ddp_steps=200)
QUICK = Plan(real_models=False, utterances=None, step_repeats=2, kl_positions=64, ddp_steps=6)


def training_speech(utterances: int | None) -> str:
    """The training audiofolder: ``builtin:tiny-speech``, or ``utterances`` clean eSpeak utterances
    synthesised once into ``$KDFORGE_HOME/perf``."""
    if utterances is None:
        return "builtin:tiny-speech"
    from kdforge.data.synth import synthesize_corpus
    from kdforge.home import built_once

    folder = built_once("perf", f"speech-{utterances}",
                        lambda out: synthesize_corpus(out / "corpus", utterances, seed=7, test_fraction=0.0))
    return str(folder / "corpus" / "train")


def ensemble_folders(real_models: bool) -> dict[str, Path]:
    """The three teachers: whisper-base, whisper-tiny.en and an untrained CTC Conformer of the recipe's
    size (``init-ctc --frame-stack 3``), or two built-in tiny Whisper models and the tiny CTC model."""
    from kdforge.models.builtin import builtin_folder

    if not real_models:
        return {"whisper-wide": builtin_folder("tiny-whisper-wide"), "whisper-narrow": builtin_folder("tiny-whisper"),
                "ctc": builtin_folder("tiny-ctc")}
    from kdforge.demo import WHISPER_MODELS
    from kdforge.home import built_once
    from kdforge.models.ctc import build_ctc_model
    from kdforge.models.prepare import prepare

    ctc = built_once("perf", "ctc-small-untrained", lambda out: build_ctc_model(out, size="small", frame_stack=3))
    return {**{name: prepare(name)[0].path for name in WHISPER_MODELS}, "ctc": ctc}


def recipe_configs(configs: Path, teachers: dict[str, Path], cache_dir: Path, real_models: bool,
                   speech: str = "builtin:tiny-speech") -> dict:
    """The configs whose steps are timed, by name: ``cached`` is the recipe's (the tiny one without
    real models) with these teachers and cache, on ``speech``, every utterance labelled so that every
    step trains on the same target tokens; ``student`` has no teacher and only the cross-entropy
    term; ``cached_without_lppm`` and ``cached_without_logit_terms`` leave out the projection mapping,
    or KD and RLKD, to show what each costs; ``student_bfloat16`` and ``cached_bfloat16`` are the first two
    in mixed precision."""
    from kdforge.config import load_config

    path = configs / ("asr/lora-lppm-rlkd.yaml" if real_models else "tiny-asr.yaml")
    if not path.exists():
        raise KdforgeError(f"{path} does not exist: pass the repository's configs folder with --configs")
    members = [{"path": str(folder), "name": name} for name, folder in teachers.items()]
    overrides = [f"teachers={json.dumps(members)}", f"data.train={speech}", "data.eval=null",
                 "data.labelled=null", f"cache.dir={cache_dir}"]
    cached = load_config(path, overrides)
    ce_only = f"objective={{name: none, ce_weight: {cached.objective.ce_weight}}}"
    student = [*overrides, "teachers=[]", "alignment=null", ce_only]
    return {"cached": cached,
            "student": load_config(path, student),
            "cached_bfloat16": load_config(path, [*overrides, "training.precision=bfloat16"]),
            "student_bfloat16": load_config(path, [*student, "training.precision=bfloat16"]),
            "cached_without_lppm": load_config(path, [*overrides, "alignment=null"]),
            "cached_without_logit_terms": load_config(path, [*overrides, ce_only])}


def cache_build_seconds(config, work: Path) -> dict:
    """Wall and per-teacher seconds of building the cache with 1 worker (into ``config.cache.dir``,
    which the steps then read) and with 2, and the cache's size on disk."""
    from kdforge.teachers.build import build_cache_from_config

    serial = build_cache_from_config(config, config.cache.dir, workers=1)
    parallel = build_cache_from_config(config, work / "cache-2-workers", workers=2)
    megabytes = sum(f.stat().st_size for f in config.cache.dir.rglob("*") if f.is_file()) / 2**20
    return {"workers_1": serial, "workers_2": parallel, "speedup": serial["seconds"] / parallel["seconds"],
            "megabytes": megabytes}


class OnlineDistillationTask(WhisperDistillationTask):
    """The distillation task with its teachers run on every batch instead of read from the cache.

    Only the training targets (chosen by the cache's first pass) are still read from the cache; the
    teachers' hidden states come raw from their run and are mapped in the step.
    """

    def __init__(self, config, work_dir: Path):
        from kdforge.tasks.asr_distill import decoder_layer_plan, layer_plan
        from kdforge.teachers.build import teacher_signals
        from kdforge.teachers.cache import ENSEMBLE

        super().__init__(config, work_dir)
        self.premapped = set()
        layers, decoder_layers = layer_plan(config)[1], decoder_layer_plan(config)[1]
        used = {*self.logit_teachers, *(t.label for t in self.mapped)}
        self.teacher_runs = {t.label: teacher_signals(t.path, layers[t.label], config.cache.top_k, config.audio.audio_ctx,
                                                      decoder_layers.get(t.label, []))
                             for t in config.teachers if t.label in used}
        self.targets = [self.cache.text(ENSEMBLE, utterance, "target") for utterance in self.ids]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        audio, texts = [self.audio[i] for i in indices], [self.targets[i] for i in indices]
        ids = [self.ids[i] for i in indices]
        # the parent reads every teacher signal through self.cache: hand it this batch's, just computed
        self.cache = BatchSignals({name: dict(zip(ids, run(audio, texts))) for name, run in self.teacher_runs.items()})
        return super().batch(indices)


class BatchSignals:
    """Teacher signals of one batch behind :meth:`kdforge.teachers.cache.TeacherCache.batch`'s interface."""

    def __init__(self, signals: dict[str, dict[str, dict[str, torch.Tensor]]]):
        self.signals = signals

    def batch(self, teacher: str, utterance_ids: list[str], names: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{name: self.signals[teacher][utterance][name] for name in names} for utterance in utterance_ids]


def step_seconds(tasks: dict, work: Path, repeats: int) -> dict:
    """Median seconds of a step of each task (by name) on the same first batch, the tasks taking turns,
    and of the cached task's student projections alone (:func:`mapping_products_seconds`)."""
    from kdforge.benchmarks.steps import StepTimer, median_step_seconds

    for task in tasks.values():
        task.step = task.config.training.steps  # past every loss warm-up: each term is computed
    indices = list(range(tasks["cached"].config.training.batch_size))
    timers = {name: StepTimer(task, indices, work) for name, task in tasks.items()}
    return {"seconds": median_step_seconds(timers, repeats), "batch_size": len(indices), "repeats": repeats,
            "mapping_products_seconds": mapping_products_seconds(tasks["cached"], indices, repeats)}


def mapping_products_seconds(task: WhisperDistillationTask, indices: list[int], repeats: int) -> float:
    """Median seconds of the student's projections forward and backward on as many points as the batch
    ``indices`` maps (random values; gradients for the weights and the points, as training takes them)."""
    from kdforge.benchmarks.steps import median_step_seconds

    projections = task.heads["student"]
    width = task.student.config.d_model  # the student's encoder states, whatever kind of projection maps them
    count = int(task.batch(indices)["encoder_frames"].sum())
    points = torch.randn(len(task.student_layers), count, width, requires_grad=True)

    def products() -> float:
        started = time.perf_counter()
        projections.zero_grad(set_to_none=True)
        points.grad = None
        projections.map_layers(points).sum().backward()
        return time.perf_counter() - started

    return median_step_seconds({"products": products}, repeats)["products"]


def kl_peak_memory(positions: int) -> dict:
    """Peak MB one KL forward + backward adds at ``positions`` x V = 128,000, chunked and plain."""
    from kdforge.benchmarks.losses import run_case

    rows = {chunked: run_case("kl", positions, MEMORY_VOCAB, chunked=chunked, repeats=1) for chunked in (True, False)}
    return {"positions": positions, "vocab": MEMORY_VOCAB, "logits_mb": rows[True]["logits_mb"],
            "chunked_peak_mb": rows[True]["peak_mb"], "naive_peak_mb": rows[False]["peak_mb"]}


def ddp_samples_per_second(config: Path, work: Path, steps: int, processes: int) -> dict:
    """Train ``config`` for ``steps`` steps under ``torchrun --nproc_per_node processes``; samples per
    second from its ``result.json``. Each process gets ``cores // processes`` torch threads.

    Raises:
        KdforgeError: the launch failed (the message ends with its last output), or trained with
            another number of processes.
    """
    from kdforge.config import load_config

    threads = max(1, (os.cpu_count() or 1) // processes)
    run_dir = work / f"ddp-{processes}"
    overrides = [f"training.steps={steps}", f"training.eval_every={steps}", f"training.checkpoint_every={steps}",
                 "data.eval=null"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "kdforge", "train", str(config), "--out", str(run_dir), *[f"--set={o}" for o in overrides]]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                          timeout=DDP_TIMEOUT_S)
    if done.returncode != 0:
        raise KdforgeError(f"torchrun --nproc_per_node {processes} -m kdforge train failed: "
                           f"{(done.stderr or done.stdout)[-600:].strip()}")
    result = json.loads((run_dir / "result.json").read_text())
    if result["processes"] != processes:
        raise KdforgeError(f"torchrun started {processes} processes but {result['processes']} trained together")
    batch = load_config(config, overrides).training.batch_size
    return {"processes": processes, "threads_per_process": threads,
            "train_seconds": result["train_seconds"], "samples_per_s": steps * batch / result["train_seconds"]}


def ddp_throughput(config: Path, work: Path, steps: int) -> dict:
    """1 and 2 processes and their ratio; ``error`` instead if either launch fails, so that the other
    metrics still come out (data parallelism needs torchrun, gloo and free local ports)."""
    try:
        runs = {f"processes_{n}": ddp_samples_per_second(config, work, steps, n) for n in (1, 2)}
    except (KdforgeError, OSError, KeyError, json.JSONDecodeError, subprocess.TimeoutExpired) as error:
        return {"error": str(error), "ratio": None}
    ratio = runs["processes_2"]["samples_per_s"] / runs["processes_1"]["samples_per_s"]
    return {**runs, "steps": steps, "ratio": ratio}


def recognition_throughput(student: Path, teachers: dict[str, Path], data: str, audio_ctx: int | None) -> dict:
    """Greedy decoding at batch 8: the student, and the ensemble of ``teachers`` (Whisper ones cut to ``audio_ctx``)."""
    from kdforge.evaluation.ensemble import evaluate_ensemble
    from kdforge.evaluation.runner import evaluate

    alone = evaluate(student, data, batch_size=8)
    ensemble = evaluate_ensemble(list(teachers.values()), data, batch_size=8, audio_ctx=audio_ctx)
    keys = ("wer", "utterances_per_s")
    return {"utterances": alone["n"], "student": {key: alone[key] for key in keys},
            "ensemble": {key: ensemble[key] for key in keys},
            "members": {name: {key: member[key] for key in keys} for name, member in zip(teachers, ensemble["members"])},
            "ratio": alone["utterances_per_s"] / ensemble["utterances_per_s"]}


def run(out_dir: str | Path, quick: bool = False, command: str = "kdforge bench perf",
        configs: str | Path = "configs", student: str | Path | None = None, step_repeats: int | None = None) -> dict:
    """Measure every metric of the module docstring; write ``out_dir/perf.json`` and ``perf.md``.

    Args:
        quick: built-in tiny models and fewer repeats (a smoke run, not a measurement).
        configs: the repository's configs folder (the ASR recipe, ``tiny-asr.yaml``, ``tiny-lm.yaml``).
        student: a trained student folder to decode for the throughput ratio; by default the recipe's
            student as built, untrained.
        step_repeats: timed steps per task (their median), instead of the plan's (20; quick: 2): the
            step ratios of one code move by a few hundredths between runs of 20.

    Raises:
        KdforgeError: a configs folder without the recipe's configs, or bad models or data.
    """
    from kdforge.demo import Stages
    from kdforge.student.lora import exportable
    from kdforge.tasks.asr import WhisperTask

    out_dir, configs, plan = Path(out_dir), Path(configs), QUICK if quick else FULL
    if step_repeats is not None:
        plan = replace(plan, step_repeats=step_repeats)
    if student is not None:
        model_type_of(student)  # a wrong folder fails now, not after the other metrics' minutes
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(total=6)
    with tempfile.TemporaryDirectory(prefix=".perf-work-", dir=out_dir) as scratch:
        work = Path(scratch)
        stages.start("models", "teachers, student and speech")
        teachers = ensemble_folders(plan.real_models)
        recipe = recipe_configs(configs, teachers, work / "cache-1-worker", plan.real_models,
                                training_speech(plan.utterances))
        distil = recipe["cached"]
        stages.start("cache", "building the teacher cache with 1 worker, then 2")
        cache = cache_build_seconds(distil, work)
        stages.start("steps", "plain, cached and online training steps, taking turns")
        cached = WhisperDistillationTask(distil, work)
        tasks = {"student": WhisperTask(recipe["student"], work), "cached": cached,
                 "online": OnlineDistillationTask(distil, work),
                 **{name: WhisperDistillationTask(recipe[name], work)
                    for name in ("cached_without_lppm", "cached_without_logit_terms", "cached_bfloat16")},
                 "student_bfloat16": WhisperTask(recipe["student_bfloat16"], work)}
        steps = step_seconds(tasks, work, plan.step_repeats)
        decoded = work / "student" if student is None else Path(student)
        if student is None:  # the recipe's student as training exports it (its dynamic window included)
            cached.export(decoded, exportable(cached.student, merge=True))
        stages.start("memory", f"KL peak memory at V = {MEMORY_VOCAB:,}, chunked and plain")
        memory = kl_peak_memory(plan.kl_positions)
        stages.start("ddp", "tiny LM training with 1 and 2 processes (torchrun)")
        ddp = ddp_throughput(configs / "tiny-lm.yaml", work, plan.ddp_steps)
        stages.start("throughput", "greedy decoding: student and ensemble")
        throughput = recognition_throughput(decoded, teachers, distil.data.train, distil.audio.audio_ctx)
    seconds = steps["seconds"]
    report = {
        "command": command, "machine": describe_machine(), "quick": quick, "plan": asdict(plan),
        "cached_step_over_student_step": seconds["cached"] / seconds["student"],
        "cached_step_floor_over_student_step":
            (seconds["cached_without_lppm"] + steps["mapping_products_seconds"]) / seconds["student"],
        "bfloat16_student_step_speedup": seconds["student"] / seconds["student_bfloat16"],
        "bfloat16_cached_step_over_student_step": seconds["cached_bfloat16"] / seconds["student_bfloat16"],
        "online_over_cached_speedup": seconds["online"] / seconds["cached"],
        "parallel_cache_speedup": cache["speedup"],
        "ddp_2proc_throughput_ratio": ddp["ratio"],
        "chunked_peak_mb": memory["chunked_peak_mb"], "naive_peak_mb": memory["naive_peak_mb"],
        "student_over_ensemble_throughput": throughput["ratio"],
        "models": {"teachers": {name: str(folder) for name, folder in teachers.items()},
                   "student": "the recipe's student, untrained (LoRA merged)" if student is None else str(decoded),
                   "weights": "real checkpoints, CTC untrained" if plan.real_models else "built-in tiny, random"},
        "steps": steps, "cache": cache, "memory": memory, "ddp": ddp, "throughput": throughput,
        "stage_seconds": stages.done(),
    }
    write_json_atomic(out_dir / "perf.json", report)
    write_text_atomic(out_dir / "perf.md", to_markdown(report))
    return report


def _ratio(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}"


def to_markdown(report: dict) -> str:
    steps, cache, memory, ddp, speed = (report[k] for k in ("steps", "cache", "memory", "ddp", "throughput"))
    seconds = steps["seconds"]
    lines = [
        "# Performance ratios", "",
        f"Machine: {machine_line(report['machine'])}. Command: `{report['command']}`."
        + (" **Quick run: tiny random models, not a measurement.**" if report["quick"] else ""),
        f"Models: {report['models']['weights']}; student: {report['models']['student']}.", "",
        "| metric | value | from |", "|---|---|---|",
        f"| cached_step_over_student_step (target <= 1.10) | {_ratio(report['cached_step_over_student_step'])} | "
        f"{seconds['cached']:.3f} s / {seconds['student']:.3f} s per step of {steps['batch_size']} "
        f"(median of {steps['repeats']}) |",
        f"| online_over_cached_speedup | {_ratio(report['online_over_cached_speedup'])} | "
        f"{seconds['online']:.3f} s / {seconds['cached']:.3f} s |",
        f"| (cached step without LPPM over student step) | {_ratio(seconds['cached_without_lppm'] / seconds['student'])} | "
        f"{seconds['cached_without_lppm']:.3f} s: what the projection mapping costs |",
        f"| (cached step without KD and RLKD over student step) | "
        f"{_ratio(seconds['cached_without_logit_terms'] / seconds['student'])} | "
        f"{seconds['cached_without_logit_terms']:.3f} s: what the logit terms cost |",
        f"| (floor: cached step without LPPM, plus the student projections alone, over student step) | "
        f"{_ratio(report['cached_step_floor_over_student_step'])} | {steps['mapping_products_seconds']:.3f} s: "
        "the mapping's unavoidable products, forward and backward |",
        f"| bfloat16_student_step_speedup | {_ratio(report['bfloat16_student_step_speedup'])} | "
        f"{seconds['student']:.3f} s / {seconds['student_bfloat16']:.3f} s: the plain step in float32 over "
        "mixed precision |",
        f"| bfloat16_cached_step_over_student_step | {_ratio(report['bfloat16_cached_step_over_student_step'])} | "
        f"{seconds['cached_bfloat16']:.3f} s / {seconds['student_bfloat16']:.3f} s: both in mixed precision |",
        f"| parallel_cache_speedup | {_ratio(report['parallel_cache_speedup'])} | "
        f"{cache['workers_1']['seconds']:.1f} s (1 worker) / {cache['workers_2']['seconds']:.1f} s (2 workers); "
        f"the cache holds {cache['megabytes']:.0f} MB |",
        f"| ddp_2proc_throughput_ratio | {_ratio(report['ddp_2proc_throughput_ratio'])} | " + (
            f"{ddp['processes_2']['samples_per_s']:.1f} / {ddp['processes_1']['samples_per_s']:.1f} samples/s "
            f"({ddp['processes_2']['threads_per_process']} / {ddp['processes_1']['threads_per_process']} threads "
            "per process)" if ddp["ratio"] is not None else f"failed: {ddp['error']}") + " |",
        f"| chunked_peak_mb | {report['chunked_peak_mb']:.0f} | KL at {memory['positions']:,} x "
        f"{memory['vocab']:,} (one logits tensor: {memory['logits_mb']:.0f} MB) |",
        f"| naive_peak_mb | {report['naive_peak_mb']:.0f} | the same, plain autograd |",
        f"| student_over_ensemble_throughput | {_ratio(report['student_over_ensemble_throughput'])} | "
        f"{speed['student']['utterances_per_s']:.1f} / {speed['ensemble']['utterances_per_s']:.1f} utterances/s "
        f"at batch 8 over {speed['utterances']} utterances (WER {speed['student']['wer']:.2f} / "
        f"{speed['ensemble']['wer']:.2f}) |",
    ]
    if report["models"]["student"].startswith("the recipe's student, untrained"):
        lines += ["", "The student is untrained: it decodes until its token budget rather than to an end token, "
                      "so its throughput is a lower bound. `--student DIR` decodes a trained one."]
    return "\n".join(lines) + "\n"
