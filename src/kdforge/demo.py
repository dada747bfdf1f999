"""``kdforge demo``: the main job end to end, on built-in data and the real Whisper checkpoints.

Stages (each skipped when its result is already there):

1. prepare whisper-base and whisper-tiny.en as Hugging Face folders (``kdforge models prepare``);
2. synthesise a small noisy eSpeak corpus with unseen test voices (``kdforge synth-speech``);
3. adapt three teachers on its labelled part: both Whisper models with LoRA and a CTC Conformer
   from scratch (``configs/teachers``);
4. score zero-shot Whisper, each teacher and their ensemble (``kdforge bench asr-teachers``);
5. cache the teachers once (``kdforge cache``);
6. distil the student with each method of :attr:`DemoPlan.methods` from that cache and score it
   (``kdforge bench asr``);
7. write ``results.json``, ``results.md``, ``results_wer.png``, ``curves.png`` and the best
   student (``student/``, LoRA merged, processor included) into the output folder.

Stages 1-5 live in ``$KDFORGE_HOME/demo/<plan key>``, shared by every demo with the same plan, so a
second demo only distils and scores. Budgets are the full recipe's (``docs/results-asr.md``) scaled
down to fit 20 minutes on 2 CPU cores from a cold start; the numbers are a smoke-sized version of
that comparison, not its result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from kdforge.errors import KdforgeError
from kdforge.files import write_json_atomic
from kdforge.home import kdforge_home

#: teacher name -> its adaptation config in ``configs/teachers``.
TEACHER_CONFIGS = {"whisper-base": "whisper-base-lora.yaml", "whisper-tiny.en": "whisper-tiny-en-lora.yaml",
                   "ctc": "ctc-scratch.yaml"}
#: The real checkpoints the demo starts from; the student is initialised from whisper-tiny.en.
WHISPER_MODELS = ("whisper-base", "whisper-tiny.en")


#: Plan fields that concern only the students: demos that differ in them share one workspace.
STUDENT_SETTINGS = ("methods", "student_steps", "seeds", "student_settings")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo; the defaults fit 20 minutes on 2 CPU cores from a cold start."""

    utterances: int = 400
    test_fraction: float = 0.1
    labelled: int = 120
    corpus_seed: int = 5
    noise_snr: tuple[float, float] = (3.0, 15.0)
    speed: tuple[int, int] = (120, 220)
    teacher_steps: dict[str, int] = field(default_factory=lambda: {"whisper-base": 30, "whisper-tiny.en": 40,
                                                                   "ctc": 300})
    student_steps: int = 60
    methods: tuple[str, ...] = ("lora_ce", "lora_logit_kd", "lora_lppm", "lora_lppm_rlkd")
    #: training seeds per student method (each row reports the mean and spread over them)
    seeds: int = 1
    ctc_size: str = "small"
    #: ``--set`` overrides for every teacher config / every student config (tests shrink models with them)
    teacher_overrides: tuple[str, ...] = ()
    student_overrides: tuple[str, ...] = ()
    #: ``--set`` overrides of the students' training alone (loss weights, learning rate, ...), applied
    #: last; demos differing only in them share the teachers, and the cache unless a setting changes
    #: what it must hold (the mapped layers: those demos build one beside it, :func:`cache_folder`)
    student_settings: tuple[str, ...] = ()

    def key(self, configs: Path) -> str:
        """Names the shared workspace: what the data, teachers and cache depend on, hashed (the plan
        without the student methods and steps, and the teacher configs' text)."""
        shared = {name: value for name, value in asdict(self).items() if name not in STUDENT_SETTINGS}
        texts = [(configs / "teachers" / TEACHER_CONFIGS[name]).read_text() for name in sorted(TEACHER_CONFIGS)]
        payload = json.dumps({"plan": shared, "teacher_configs": texts}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def __post_init__(self):
        training = self.utterances - round(self.utterances * self.test_fraction)
        if not 1 <= self.labelled <= training:
            raise KdforgeError(f"labelled utterances must be between 1 and the {training} training utterances "
                               f"of a {self.utterances}-utterance corpus, got {self.labelled}")


def parse_teacher_steps(assignments: list[str], defaults: dict[str, int]) -> dict[str, int]:
    """``defaults`` with ``NAME=STEPS`` assignments applied (``--teacher-steps whisper-base=120``).

    Raises:
        KdforgeError: a malformed assignment, an unknown teacher name or a step count below 1.
    """
    steps = dict(defaults)
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals:
            raise KdforgeError(f"--teacher-steps {assignment!r}: expected NAME=STEPS, e.g. whisper-base=120")
        if name not in TEACHER_CONFIGS:
            raise KdforgeError(f"--teacher-steps {assignment!r}: unknown teacher {name!r}; "
                               f"known: {', '.join(TEACHER_CONFIGS)}")
        if not (value.isascii() and value.isdecimal()) or int(value) < 1:
            raise KdforgeError(f"--teacher-steps {assignment!r}: STEPS must be a whole number >= 1")
        steps[name] = int(value)
    return steps


def claim_output(out: Path, plan: DemoPlan) -> None:
    """Refuse a folder holding a finished demo or something else; record the plan in a new one.

    Raises:
        KdforgeError: ``out`` holds a finished demo, another demo's plan, or unrelated files.
    """
    record = out / "demo.json"
    if (out / "results.json").exists():
        raise KdforgeError(f"{out} holds a finished demo (results.json): it is never overwritten; choose another --out")
    if record.exists():
        if json.loads(record.read_text()) != json.loads(json.dumps(asdict(plan))):
            raise KdforgeError(f"{out} holds an unfinished demo with another plan; choose another --out")
        return  # an interrupted demo: finished stages are reused
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KdforgeError(f"{out} exists and is not an empty folder: it is never overwritten, choose another")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, asdict(plan))


def demo_command(out: Path, plan: DemoPlan) -> str:
    """The ``kdforge demo`` command line of ``plan``'s settings that the CLI sets (students' and teachers' steps)."""
    default = DemoPlan()
    parts = [f"kdforge demo --out {out}"]
    if plan.methods != default.methods:
        parts += [f"--method {method}" for method in plan.methods]
    if plan.seeds != default.seeds:
        parts.append(f"--seeds {plan.seeds}")
    if plan.student_steps != default.student_steps:
        parts.append(f"--student-steps {plan.student_steps}")
    if plan.utterances != default.utterances:
        parts.append(f"--utterances {plan.utterances}")
    if plan.labelled != default.labelled:
        parts.append(f"--labelled {plan.labelled}")
    parts += [f"--teacher-steps {name}={steps}" for name, steps in plan.teacher_steps.items()
              if steps != default.teacher_steps.get(name)]
    parts += [f"--set {setting}" for setting in plan.student_settings]
    return " ".join(parts)


def data_and_budget(plan: DemoPlan, workspace: Path, steps: int) -> list[str]:
    """The ``--set`` overrides every demo config shares: its corpus, labels and step budget."""
    return [f"data.train={workspace / 'data' / 'train'}", f"data.eval={workspace / 'data' / 'test'}",
            f"data.labelled={plan.labelled}", f"training.steps={steps}", f"training.eval_every={steps}",
            f"training.checkpoint_every={steps}"]


def teacher_overrides(name: str, plan: DemoPlan, workspace: Path, models: dict[str, Path]) -> list[str]:
    """The ``--set`` overrides that point a full-size teacher config at the demo's data and budget."""
    start = workspace / "ctc-init" if name == "ctc" else models[name]
    return [f"student.path={start}", *data_and_budget(plan, workspace, plan.teacher_steps[name]),
            *plan.teacher_overrides]


def student_overrides(plan: DemoPlan, workspace: Path, models: dict[str, Path]) -> list[str]:
    """The ``--set`` overrides that point every method config at the demo's student, data and budget."""
    return [f"student.init_from={models['whisper-tiny.en']}", *data_and_budget(plan, workspace, plan.student_steps),
            *plan.student_overrides]


def distil_overrides(workspace: Path, cache: Path) -> list[str]:
    """The overrides for methods that read teachers: the demo's adapted teachers and the cache ``cache``."""
    teachers = ", ".join(f"{{path: {workspace / 'teachers' / name / 'student'}, name: {name}}}"
                         for name in TEACHER_CONFIGS)
    return [f"teachers=[{teachers}]", f"cache.dir={cache}"]


def cache_folder(workspace: Path, config) -> Path:
    """The workspace's teacher cache for ``config``, named by what it must hold
    (:func:`kdforge.tasks.asr_distill.cache_expectations`): student settings that change the mapped
    layers get a cache of their own beside the others instead of a stale one."""
    from kdforge.tasks.asr_distill import cache_expectations

    expected = {name: [str(path), settings] for name, (path, settings) in cache_expectations(config).items()}
    payload = json.dumps({"data": str(config.data.train), "teachers": expected}, sort_keys=True)
    return workspace / f"cache-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


class Stages:
    """Numbered stage banners on the console and the wall time of each stage."""

    def __init__(self, total: int):
        self.console, self.total, self.seconds = Console(), total, {}
        self._name, self._started = None, 0.0

    def start(self, name: str, what: str) -> None:
        self._finish()
        self.console.rule(f"[bold][{len(self.seconds) + 1}/{self.total}] {what}")
        self._name, self._started = name, time.perf_counter()

    def _finish(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._started, 1)
            self._name = None

    def done(self) -> dict[str, float]:
        self._finish()
        return self.seconds


def run_demo(out: str | Path, plan: DemoPlan | None = None, configs: str | Path = "configs",
             home: str | Path | None = None, models: dict[str, Path] | None = None) -> dict:
    """Run the demo into ``out`` (new or empty, or an interrupted demo with the same plan).

    Args:
        plan: sizes and budgets (default :class:`DemoPlan`).
        configs: the repository's ``configs`` folder (``teachers/`` and ``asr/`` are read).
        home: kdforge's home (default ``$KDFORGE_HOME``); the shared workspace lives under it.
        models: ``whisper-base`` and ``whisper-tiny.en`` folders to use instead of preparing the
            real checkpoints (tests pass tiny ones).

    Returns:
        The ``results.json`` report: ``rows`` (method, WER, CER, utterances/s, parameters, ...),
        ``exported_student``, ``stage_seconds``, ``claims``.

    Raises:
        KdforgeError: ``out`` holds a finished or different run, or a stage meets bad input.
    """
    from kdforge.benchmarks import asr, asr_teachers
    from kdforge.config import load_config
    from kdforge.data.synth import synthesize_corpus
    from kdforge.models.ctc import build_ctc_model
    from kdforge.models.prepare import prepare
    from kdforge.teachers.build import build_cache_from_config
    from kdforge.training.curves import plot_runs
    from kdforge.training.loop import train

    out, configs, plan = Path(out), Path(configs), plan or DemoPlan()
    unknown = [m for m in plan.methods if m not in asr.STUDENT_METHODS]
    if unknown:
        raise KdforgeError(f"unknown method {unknown[0]!r}; known: {', '.join(asr.STUDENT_METHODS)}")
    if not (configs / "teachers").is_dir() or not (configs / "asr").is_dir():
        raise KdforgeError(f"{configs} lacks teachers/ and asr/: pass the repository's configs folder with --configs")
    claim_output(out, plan)
    workspace = kdforge_home(home) / "demo" / plan.key(configs)
    workspace.mkdir(parents=True, exist_ok=True)
    stages = Stages(total=7)

    stages.start("prepare_models", "real checkpoints as Hugging Face folders")
    models = models or {name: prepare(name, home)[0].path for name in WHISPER_MODELS}

    stages.start("synthesise_speech", f"{plan.utterances} noisy eSpeak utterances, unseen test voices")
    if not (workspace / "data").exists():
        summary = synthesize_corpus(workspace / "data", plan.utterances, plan.corpus_seed, noise_snr=plan.noise_snr,
                                    speed=plan.speed, test_fraction=plan.test_fraction)
        counts = ", ".join(f"{split} {count}" for split, count in summary.utterances.items())
        stages.console.print(f"utterances: {counts}; {summary.audio_seconds:.0f} s of audio")

    stages.start("adapt_teachers", f"adapting {len(TEACHER_CONFIGS)} teachers on {plan.labelled} labelled utterances")
    if not (workspace / "ctc-init").exists():
        build_ctc_model(workspace / "ctc-init", size=plan.ctc_size, frame_stack=3, seed=0)
    for name, config_file in TEACHER_CONFIGS.items():
        run_dir = workspace / "teachers" / name
        if not (run_dir / "result.json").exists():
            stages.console.print(f"teacher {name}: {plan.teacher_steps[name]} steps")
            config = load_config(configs / "teachers" / config_file, teacher_overrides(name, plan, workspace, models))
            train(config, run_dir, resume=(run_dir / "config.json").exists())

    stages.start("score_teachers", "zero-shot Whisper, each teacher and their ensemble on unseen voices")
    test_dir = workspace / "data" / "test"
    overrides = student_overrides(plan, workspace, models)
    ours = load_config(configs / "asr" / "lora-lppm.yaml",
                       [*overrides, *distil_overrides(workspace, workspace / "cache"), *plan.student_settings])
    cache = cache_folder(workspace, ours)
    teachers_and_cache = distil_overrides(workspace, cache)
    teachers_report = asr_teachers.run({name: [workspace / "teachers" / name / "student"] for name in TEACHER_CONFIGS},
                                       {name: models[name] for name in WHISPER_MODELS}, test_dir,
                                       out / "teachers", audio_ctx=ours.audio.audio_ctx, command="kdforge demo")

    stages.start("cache_teachers", "caching the teachers' hidden states, top-k and transcripts")
    if not (cache / "manifest.json").exists():
        build_cache_from_config(ours, cache)

    stages.start("distil_students", f"distilling {len(plan.methods)} students x {plan.seeds} seeds, "
                                    f"{plan.student_steps} steps each")
    report = asr.run(out, configs / "asr", plan.methods, plan.seeds, test_dir, out / "teachers" / "teachers.json",
                     (*overrides, *plan.student_settings), command=demo_command(out, plan),
                     distil_overrides=tuple(teachers_and_cache), report_name="results")

    stages.start("export", "the best student, results and plots")
    students = [row for row in report["rows"] if row["method"] in plan.methods]
    best = min(students, key=lambda row: row["wer"]["mean"])
    run_dirs = {m: asr.run_folder(out, m, 0) for m in plan.methods}
    shutil.copytree(run_dirs[best["method"]] / "student", out / "student", dirs_exist_ok=True)
    plot_runs({m: [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
               for m, d in run_dirs.items()}, out / "curves.png")
    report.update(exported_student={"method": best["method"], "wer": best["wer"]["mean"], "path": str(out / "student")},
                  claims=claims(report["rows"], teachers_report["ensemble_beats_best_member"]),
                  workspace=str(workspace), plan=asdict(plan), stage_seconds=stages.done())
    asr.write_report(out, report, "results")
    return report


def claims(rows: list[dict], ensemble_beats_best_member: bool) -> dict:
    """The issue's claims checked on this run's rows (WER means; ``None`` where a row is missing); the
    ``_guarded`` ones rank the students by their loop-guarded WER instead (``wer_guarded``)."""
    by_method = {row["method"]: row for row in rows}
    ensemble = by_method.get("ensemble")
    result = {"ensemble_beats_best_member": ensemble_beats_best_member}
    for key, suffix in (("wer", ""), ("wer_guarded", "_guarded")):
        students = {m: row[key]["mean"] for m, row in by_method.items()
                    if m.startswith(("lora_", "full_ft", "ablation:")) and key in row}
        ours = min((w for m, w in students.items() if m in ("lora_lppm", "lora_lppm_rlkd")), default=None)
        others = min((w for m, w in students.items() if m not in ("lora_lppm", "lora_lppm_rlkd")), default=None)
        best = min(students, key=students.get) if students else None
        result |= {f"ours_lowest_student_wer{suffix}": None if ours is None or others is None else ours < others,
                   f"best_student{suffix}": best}
        if not suffix:  # speed and the gap to the ensemble, whose WER is plain greedy
            result["best_student_speedup_over_ensemble"] = (
                by_method[best]["utterances_per_s"]["mean"] / ensemble["utterances_per_s"]["mean"]
                if ensemble and best else None)
            result["best_student_wer_over_ensemble"] = (students[best] / ensemble["wer"]["mean"]
                                                        if ensemble and best else None)
    return result
