"""``kdforge bench asr``: the student rows of the method comparison (issue: LPPM + LoRA student).

Every student row is one config of ``configs/asr`` plus overrides (the ablations), trained with
the same data, labels, step budget and teacher cache, once per seed, then scored on the
unseen-voice test split (WER/CER with jiwer, utterances per second at batch 8 on this machine).
Finished runs in ``OUT/runs`` are reused, so an interrupted benchmark continues. Teacher,
zero-shot and ensemble rows come from ``kdforge bench asr-teachers`` (its ``teachers.json``).
Writes ``asr.json``, ``asr.md`` and ``asr_wer.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kdforge.benchmarks.asr_teachers import plot_wer, spread
from kdforge.benchmarks.machine import describe_machine, machine_line
from kdforge.config import RunConfig, load_config
from kdforge.errors import KdforgeError
from kdforge.evaluation.runner import evaluate
from kdforge.files import write_json_atomic, write_text_atomic
from kdforge.teachers.build import build_cache_from_config
from kdforge.training.loop import train

#: method key -> (config in configs/asr, overrides): the student rows of the comparison.
STUDENT_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora_ce": ("lora-ce.yaml", ()),
    "lora_seq_kd": ("lora-seq-kd.yaml", ()),
    "lora_logit_kd": ("lora-logit-kd.yaml", ()),
    "lora_hidden_mse": ("lora-logit-kd.yaml", (
        "alignment={weight: 1.0, teachers: [whisper-base], student_layers: [4], teacher_map: identity, "
        "normalize: false, point_loss: mse, dim: 512}",)),
    "lora_lppm": ("lora-lppm.yaml", ()),
    "lora_lppm_rlkd": ("lora-lppm-rlkd.yaml", ()),
    "full_ft_lppm": ("lora-lppm.yaml", ("student.lora=null", "training.lr=1.0e-4")),
    "ablation:no_layerwise": ("lora-lppm.yaml", ("alignment.student_layers=[4]",)),
    "ablation:no_pointwise": ("lora-lppm.yaml", ("alignment.pointwise=false",)),
    "ablation:single_teacher": ("lora-lppm.yaml", ("alignment.teachers=[whisper-base]",)),
    "ablation:learned_teacher_proj": ("lora-lppm.yaml", ("alignment.teacher_map=learned",)),
}
#: The loop guard every student is also scored with: no token 4-gram twice in a transcript. On 40
#: test utterances one decoding loop moves a seed's WER by ~0.13, more than most method differences.
GUARD_NGRAM = 4
#: The reduced set ``kdforge demo`` and ``--quick`` run.
CORE_METHODS = ("lora_ce", "lora_logit_kd", "lora_lppm", "lora_lppm_rlkd")


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in a model folder's safetensors files (tied weights are saved once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def changes_a_setting_of(config: RunConfig, override: str) -> bool:
    """Whether ``override`` (``a.b.c=value``, a number picking a list item) is for ``config``: False only
    under a section the config leaves out (null: a KD row's ``alignment``, ``objective.rlkd`` without
    RLKD), which it would switch on, making the row another method. A misspelt key counts as for the
    config, so that validating it names the key."""
    node = config.model_dump()
    for key in override.split("=", 1)[0].strip().split(".")[:-1]:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            if node[key] is None:
                return False
            node = node[key]
        else:
            return True
    return True


def method_config(method: str, configs: Path, seed: int, overrides: tuple[str, ...] = (),
                  distil_overrides: tuple[str, ...] = ()) -> RunConfig:
    """The config of one method and seed: its file in ``configs`` plus the row's overrides, then
    ``distil_overrides`` (only methods that read teachers) and ``overrides`` (every method, last: a
    user's ``--set cache.dir=...`` wins over the benchmark's own cache). An override under a section
    the method leaves out is not applied to it (:func:`changes_a_setting_of`): ``--set
    alignment.weight=0.1`` tunes the LPPM rows and leaves the KD row KD."""
    config_name, method_overrides = STUDENT_METHODS[method]
    assignments = [*method_overrides, f"training.seed={seed}"]
    own = load_config(configs / config_name, assignments)
    overrides = tuple(override for override in overrides if changes_a_setting_of(own, override))
    config = load_config(configs / config_name, [*assignments, *overrides])
    if not config.teachers:
        return config
    return load_config(configs / config_name, [*assignments, *distil_overrides, *overrides])


def run_folder(out: Path, method: str, seed: int) -> Path:
    """Where :func:`run` trains one seed of one method."""
    return out / "runs" / f"{method.replace(':', '-')}-s{seed}"


def train_row(method: str, configs: Path, out: Path, seed: int, overrides: tuple[str, ...] = (),
              distil_overrides: tuple[str, ...] = ()) -> Path:
    """Train (or reuse) one seed of one method; returns its run folder."""
    run_dir = run_folder(out, method, seed)
    if not (run_dir / "result.json").exists():
        config = method_config(method, configs, seed, overrides, distil_overrides)
        train(config, run_dir, resume=(run_dir / "config.json").exists())
    return run_dir


def student_row(method: str, run_dirs: list[Path], test_dir: Path, teacher_params: dict[str, int]) -> dict:
    """Scores over seeds (plain greedy, and ``wer_guarded``: with the loop guard :data:`GUARD_NGRAM`)
    and the parameter accounting of one student method."""
    results = [json.loads((run / "result.json").read_text()) for run in run_dirs]
    scores = [evaluate(run / "student", test_dir, batch_size=8) for run in run_dirs]
    guarded = [evaluate(run / "student", test_dir, batch_size=8, no_repeat_ngram_size=GUARD_NGRAM) for run in run_dirs]
    counts = results[0]["parameters"]
    largest, ensemble = max(teacher_params.values()), sum(teacher_params.values())
    wer = spread([s["wer"] for s in scores])
    return {
        "method": method, "seeds": len(run_dirs),
        "wer": wer, "cer": spread([s["cer"] for s in scores]), "wer_std": wer["std"],
        "wer_guarded": spread([s["wer"] for s in guarded]),
        "utterances_per_s": spread([s["utterances_per_s"] for s in scores]),
        "train_seconds": spread([r["train_seconds"] for r in results]),
        "params": counts["student"], "trainable_params": counts["trainable"], "adapter_params": counts["adapter"],
        "trainable_pct_of_largest_teacher": 100 * counts["trainable"] / largest,
        "trainable_pct_of_ensemble": 100 * counts["trainable"] / ensemble,
        "adapter_pct_of_largest_teacher": 100 * counts["adapter"] / largest,
        "adapter_pct_of_ensemble": 100 * counts["adapter"] / ensemble,
        "teachers_used": results[0].get("teachers_used", {}),
    }


def run(out: Path, configs: Path, methods: tuple[str, ...], seeds: int, test_dir: Path,
        teachers_report: Path | None = None, overrides: tuple[str, ...] = (), command: str = "",
        distil_overrides: tuple[str, ...] = (), report_name: str = "asr") -> dict:
    """Train and score every (method, seed); merge the teacher rows; write the report files.

    ``overrides`` apply to every method's config, ``distil_overrides`` only to those that read
    teachers (the demo points them at its own teachers and cache with it).

    Raises:
        KdforgeError: an unknown method key.
    """
    unknown = [m for m in methods if m not in STUDENT_METHODS]
    if unknown:
        raise KdforgeError(f"unknown method {unknown[0]!r}; known: {', '.join(STUDENT_METHODS)}")
    out.mkdir(parents=True, exist_ok=True)
    some_config = method_config("lora_lppm", configs, 0, overrides, distil_overrides)
    if some_config.cache.dir is not None and not (some_config.cache.dir / "manifest.json").exists():
        # built from the mapping row (every layer any row maps), not by whichever teacher-reading row comes first
        build_cache_from_config(some_config, some_config.cache.dir)
    runs = {m: [train_row(m, configs, out, seed, overrides, distil_overrides) for seed in range(seeds)]
            for m in methods}
    teacher_params = {t.label: count_parameters(t.path) for t in some_config.teachers}
    rows = []
    if teachers_report is not None:
        rows += json.loads(Path(teachers_report).read_text())["rows"]
    init_dir = next((d / "student-init" for dirs in runs.values() for d in dirs if (d / "student-init").exists()), None)
    if init_dir is not None:
        base = evaluate(init_dir, test_dir, batch_size=8)
        rows.append({"method": "student_base", "seeds": 1, **{k: spread([base[k]]) for k in ("wer", "cer", "utterances_per_s")},
                     "params": count_parameters(init_dir)})
    rows += [student_row(m, dirs, test_dir, teacher_params) for m, dirs in runs.items()]
    report = {"command": command, "machine": describe_machine(), "test": str(test_dir), "seeds": seeds,
              "teacher_params": teacher_params, "rows": rows}
    write_report(out, report, report_name)
    return report


def write_report(out: Path, report: dict, name: str) -> None:
    """``NAME.json``, ``NAME.md`` and the WER bar chart ``NAME_wer.png`` in ``out``."""
    write_json_atomic(out / f"{name}.json", report)
    write_text_atomic(out / f"{name}.md", to_markdown(report))
    plot_wer(report["rows"], out / f"{name}_wer.png", title="ASR: teachers, ensemble and students (unseen voices)")


def to_markdown(report: dict) -> str:
    lines = [f"Machine: {machine_line(report['machine'])}", "", f"Command: `{report['command']}`", "",
             f"| method | seeds | WER | WER, loop guard (no {GUARD_NGRAM}-gram twice) | CER | utt/s "
             "| trainable (% largest / % ensemble) | shipped adapter (% largest) | train s | teachers used |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        wer, cer = row["wer"], row["cer"]
        share = (f"{row['trainable_params'] / 1e6:.2f}M ({row['trainable_pct_of_largest_teacher']:.2f}% / "
                 f"{row['trainable_pct_of_ensemble']:.2f}%)" if "trainable_params" in row else "")
        adapter = (f"{row['adapter_params'] / 1e6:.2f}M ({row['adapter_pct_of_largest_teacher']:.2f}%)"
                   if "adapter_params" in row else "")
        seconds = f"{row['train_seconds']['mean']:.0f}" if "train_seconds" in row else ""
        guarded = f"{row['wer_guarded']['mean']:.3f} ± {row['wer_guarded']['std']:.3f}" if "wer_guarded" in row else ""
        used = "; ".join(f"{term}: {', '.join(names)}" for term, names in row.get("teachers_used", {}).items() if names)
        lines.append(f"| {row['method']} | {row['seeds']} | {wer['mean']:.3f} ± {wer['std']:.3f} | {guarded} | "
                     f"{cer['mean']:.3f} ± {cer['std']:.3f} | {row['utterances_per_s']['mean']:.1f} | {share} | "
                     f"{adapter} | {seconds} | {used} |")
    if "exported_student" in report:
        chosen = report["exported_student"]
        lines += ["", f"Exported student: `{chosen['path']}`, from **{chosen['method']}** (WER {chosen['wer']:.3f})."]
    if "claims" in report:
        lines += ["", "| claim | value |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" if isinstance(value, float) else f"| {name} | {value} |"
                  for name, value in report["claims"].items()]
    if "stage_seconds" in report:
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in report["stage_seconds"].items()]
        lines += [f"| total | {sum(report['stage_seconds'].values()):.0f} |"]
    return "\n".join(lines) + "\n"
