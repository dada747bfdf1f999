"""``kdforge bench lm-real``: RLKD with a real pretrained teacher (SmolLM2-135M-Instruct) on text given by path.

The student keeps a few maximally spaced layers of the teacher (with its embeddings, norm and tied
head, as distilled LLM students are commonly initialised) and is trained in full. The teacher runs
once, over ``train_records`` training and ``eval_records`` held-out records (:func:`split_records`), into a top-k
cache (k = 32, enough for MOR@20); every student then reads the cache, so no teacher runs during
training. Each base objective is trained without and with the ranking term, same data, same steps,
same seeds, and scored on the held-out records: perplexity, CR@1..5, MOR@3/5/10/20 (percent), with
the teacher's own perplexity and the untrained student as reference rows.

The ranking term's k follows the paper: 15 on plain text (Table 1), 5 on instruction data (Table 2).
Before training, the step cost with and without the ranking term is timed on the same batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kdforge.benchmarks.lm import GAINS_LEGEND, METRIC_KEYS, gains_table, mean_rows, plot_agreement, rlkd_gains
from kdforge.benchmarks.machine import describe_machine, machine_line
from kdforge.benchmarks.steps import StepTimer, median_step_seconds
from kdforge.config import parse_config
from kdforge.data.lm import read_jsonl
from kdforge.errors import KdforgeError
from kdforge.files import check_new_folder, write_json_atomic, write_text_atomic
from kdforge.home import kdforge_home

TEACHER = "smollm2-135m-instruct"
CACHE_TOP_K = 32
#: Words per passage of a text record: about 100 SmolLM2 tokens of English web text.
PASSAGE_WORDS = 64


@dataclass(frozen=True)
class RealPlan:
    """The sizes of one run, chosen from measured step costs (docs/results-lm.md says why)."""

    objectives: tuple[str, ...] = ("kl", "rkl", "tvd")
    student_layers: int = 4
    steps: int = 150
    batch_size: int = 8
    max_length: int = 128
    train_records: int = 1200
    eval_records: int = 100
    lr: float = 2e-4
    rlkd_weight: float = 2.0
    seeds: int = 1  # each row's mean and spread over seeds 0..seeds-1 (the seed sets the batch order)


def _passages(records: list[dict]) -> list[dict]:
    """Text records cut into passages of :data:`PASSAGE_WORDS` words (a long document would otherwise be
    cut to its first ``max_length`` tokens and the rest wasted); instruction records unchanged."""
    if "text" not in records[0]:
        return records
    passages = []
    for record in records:
        words = record["text"].split()
        passages += [{"text": " ".join(words[i : i + PASSAGE_WORDS])} for i in range(0, len(words), PASSAGE_WORDS)]
    return passages


def split_records(data: Path, eval_data: Path, train_count: int, eval_count: int) -> tuple[list[dict], list[dict]]:
    """Held-out: the last ``eval_count`` records of ``eval_data``; training: the first ``train_count`` records
    of ``data`` that are not held out (so one file can serve both). Text is cut into passages first.

    Raises:
        KdforgeError: unreadable data (named), or nothing left to train on.
    """
    held_out = _passages(read_jsonl(eval_data))[-eval_count:]
    seen = {json.dumps(record, sort_keys=True) for record in held_out}
    train = [r for r in _passages(read_jsonl(data)) if json.dumps(r, sort_keys=True) not in seen][:train_count]
    if not train:
        raise KdforgeError(f"{data} holds no training record outside the held-out ones")
    return train, held_out


def _run_config(out: Path, teacher: Path, plan: RealPlan, objective: dict, seed: int = 0) -> dict:
    return {
        "task": "lm",
        "teachers": [{"path": str(teacher), "name": "teacher"}],
        "student": {"path": str(out / "student-init")},
        "data": {"train": str(out / "data" / "train.jsonl"), "eval": str(out / "data" / "eval.jsonl"),
                 "max_length": plan.max_length},
        "objective": objective,
        "training": {"steps": plan.steps, "batch_size": plan.batch_size, "lr": plan.lr, "warmup_steps": 10,
                     "seed": seed, "eval_every": plan.steps, "checkpoint_every": plan.steps},
        "cache": {"dir": str(out / "cache"), "top_k": CACHE_TOP_K, "batch_size": 8},
    }


def _objective(name: str, with_rank: bool, rank_k: int, plan: RealPlan) -> dict:
    return {"name": name, **({"rlkd": {"k": rank_k, "weight": plan.rlkd_weight}} if with_rank else {})}


def _row(objective: str, with_rank: bool, per_seed: list[dict]) -> dict:
    """A held-out row in ``bench lm``'s layout: each metric's mean and spread over ``per_seed``."""
    keys = tuple(key for key in (*METRIC_KEYS, "train_seconds") if key in per_seed[0])
    return {"objective": objective, "rlkd": with_rank, "split": "heldout", **mean_rows(per_seed, keys)}


def step_costs(out: Path, teacher: Path, plan: RealPlan, rank_k: int, repeats: int) -> dict:
    """Median ms of one training step (cached teacher) for KL alone and KL + R, on the same batch."""
    from kdforge.tasks.lm import LMTask

    scratch = out / "step-costs"
    timers = {}
    for key, with_rank in (("step_ms_base", False), ("step_ms_rlkd", True)):
        config = parse_config(_run_config(out, teacher, plan, _objective("kl", with_rank, rank_k, plan)))
        timers[key] = StepTimer(LMTask(config, scratch), list(range(plan.batch_size)), scratch)
    timings = {key: 1000 * seconds for key, seconds in median_step_seconds(timers, repeats, warmup=1).items()}
    timings["rlkd_overhead_pct"] = 100 * (timings["step_ms_rlkd"] / timings["step_ms_base"] - 1)
    return timings


def run(out: Path, data: Path, eval_data: Path, plan: RealPlan = RealPlan(), teacher: Path | None = None,
        home: Path | None = None, timing_repeats: int = 5, command: str = "kdforge bench lm-real") -> dict:
    """Run the benchmark into the new folder ``out``: ``lm-real.json``, ``lm-real.md``, ``lm-real_agreement.png``.

    ``teacher``: a causal-LM folder in place of SmolLM2-135M-Instruct (prepared under ``home`` if needed).

    Raises:
        KdforgeError: the data cannot be read, ``out`` is not a new folder, or the teacher is not installed.
    """
    from kdforge.evaluation.lm import agreement_metrics
    from kdforge.models.prepare import model_dir, prepare
    from kdforge.student.init import init_student, maximally_spaced
    from kdforge.tasks.lm import LMTask, build_lm_cache_from_config, load_causal_lm, load_vocabulary
    from kdforge.training.loop import train

    train_records, eval_records = split_records(Path(data), Path(eval_data), plan.train_records, plan.eval_records)
    kind = "text" if "text" in train_records[0] else "instruction"  # bad data failed before any folder
    out, home = check_new_folder(out), kdforge_home(home)
    started = time.perf_counter()
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train_records), ("eval", eval_records)):
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    rank_k = 15 if kind == "text" else 5
    if teacher is None:
        prepare(TEACHER, home)
        teacher = model_dir(TEACHER, home)
    layers = maximally_spaced(load_vocabulary(teacher)[0].num_hidden_layers, plan.student_layers)
    init_student(teacher, out / "student-init", layers)
    reference_config = parse_config(_run_config(out, teacher, plan, _objective("kl", False, rank_k, plan)))
    cache_seconds = build_lm_cache_from_config(reference_config, out / "cache")["seconds"]

    reference = LMTask(reference_config, out)
    teacher_model, _ = load_causal_lm(teacher)
    rows = [
        _row("teacher", False, [agreement_metrics(teacher_model, None, reference.eval_examples,
                                                  reference.tokenizer.pad_token_id)]),
        _row("student_init", False, [reference.evaluate()]),
    ]
    del teacher_model, reference
    overhead = step_costs(out, teacher, plan, rank_k, timing_repeats)
    for objective in plan.objectives:
        for with_rank in (False, True):
            spec, per_seed = _objective(objective, with_rank, rank_k, plan), []
            for seed in range(plan.seeds):
                name = f"{objective}{'+r' if with_rank else ''}" + (f"-seed{seed}" if plan.seeds > 1 else "")
                result = train(parse_config(_run_config(out, teacher, plan, spec, seed)), out / "runs" / name)
                per_seed.append({**result["eval"], "train_seconds": result["train_seconds"]})
                print(f"{name}: " + ", ".join(f"{k} {result['eval'][k]:.2f}" for k in METRIC_KEYS if k in result["eval"]))
            rows.append(_row(objective, with_rank, per_seed))
    report = {"command": command, "machine": describe_machine(), "plan": asdict(plan),
              "teacher": str(teacher), "student_layers": layers, "data": {"train": str(data), "eval": str(eval_data),
                                                                     "train_records": len(train_records),
                                                                     "eval_records": len(eval_records), "kind": kind},
              "rlkd_k": rank_k, "cache_seconds": cache_seconds, "overhead": overhead, "heldout": rows,
              "seconds": time.perf_counter() - started}
    write_json_atomic(out / "lm-real.json", report)
    plot_agreement([r for r in rows if r["objective"] in plan.objectives], out / "lm-real_agreement.png")
    write_text_atomic(out / "lm-real.md", to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    plan, data, o = report["plan"], report["data"], report["overhead"]
    lines = ["# RLKD with a real teacher", "",
             f"Machine: {machine_line(report['machine'])}. Command: `{report['command']}`.",
             f"Teacher {report['teacher']}; student: its layers {report['student_layers']}, trained in full. "
             f"Data: {data['train_records']} {data['kind']} records of {data['train']}, held-out "
             f"{data['eval_records']} of {data['eval']}; {plan['steps']} steps x {plan['batch_size']} sequences "
             f"of <= {plan['max_length']} tokens, lr {plan['lr']}, seeds {plan['seeds']} (mean ± std); RLKD k = {report['rlkd_k']}, "
             f"weight {plan['rlkd_weight']}; teacher top-{CACHE_TOP_K} cached once ({report['cache_seconds']:.0f} s). "
             f"Whole run: {report['seconds'] / 60:.0f} min.", "",
             "| model | ppl | CR@1 | CR@2 | CR@3 | CR@4 | CR@5 | MOR@3 | MOR@5 | MOR@10 | MOR@20 | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["heldout"]:
        cells = " | ".join(f"{row[k]:.2f} ± {row[k + '_std']:.2f}" if k in row else "-" for k in METRIC_KEYS)
        seconds = f"{row['train_seconds']:.0f}" if "train_seconds" in row else "-"
        lines.append(f"| {row['objective']}{' + R' if row['rlkd'] else ''} | {cells} | {seconds} |")
    students = [row for row in report["heldout"] if row["objective"] in plan["objectives"]]
    lines += ["", f"+ R minus without, held-out, in points; {GAINS_LEGEND}", "", *gains_table(rlkd_gains(students))]
    lines += ["", f"Step (cached teacher, batch {plan['batch_size']}): KL {o['step_ms_base']:.0f} ms, KL + R "
              f"{o['step_ms_rlkd']:.0f} ms ({o['rlkd_overhead_pct']:+.1f}%).", "",
              "![agreement](lm-real_agreement.png)"]
    return "\n".join(lines) + "\n"
