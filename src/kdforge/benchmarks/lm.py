"""``kdforge bench lm``: the RLKD paper's tables replicated on tiny models trained here.

Two ~5M-parameter teachers are trained once by kdforge (kept under ``$KDFORGE_HOME/tiny-lm``): one
on the built-in real-text corpus, and that one fine-tuned on the built-in arithmetic task. In the full
plan each is then cached once (top-k, :data:`CACHE_TOP_K`), and ~1M-parameter students (random
initialisation, one per seed, first trained by language modelling on the corpus as the paper's
TinyLlama student was pretrained) are distilled from the caches with each base objective, without and
with the ranking term, and measured as the paper measures:

* Table 1 analogue (corpus): perplexity, CR@1..5, MOR@3/5/10/20 on training and held-out passages
  (RLKD k = 15);
* Table 2 analogue (downstream): exact-match accuracy of greedy answers on unseen problems, for SFT
  (labels only), each objective alone and with the ranking term (k = 5), and the ranking term alone;
* Table 4 analogue: milliseconds per training step with and without the ranking term.

Every row is a mean over seeds with its standard deviation (the paper used one seed).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from kdforge.benchmarks.machine import describe_machine, machine_line
from kdforge.benchmarks.steps import StepTimer, median_step_seconds
from kdforge.config import parse_config
from kdforge.data.lm import builtin_records
from kdforge.errors import KdforgeError
from kdforge.evaluation.lm import CR_KS, MOR_KS, agreement_metrics, exact_match_accuracy
from kdforge.home import kdforge_home
from kdforge.models.tiny import build_tiny_lm
from kdforge.data.arithmetic import extract_answer
from kdforge.tasks.lm import encode_record, load_causal_lm, next_token_logits
from kdforge.training.loop import train

PRETRAIN_K, DOWNSTREAM_K = 15, 5
#: What each teacher's cache keeps of the 2,048 ids: many for the corpus teacher, whose next-token
#: distributions are broad, few for the arithmetic teacher, whose answers are nearly certain (the rest is
#: the tail bucket). Students read the cache, so no teacher runs during their training.
CACHE_TOP_K = {"web": 256, "arithmetic": 32}
METRIC_KEYS = ("ppl", *(f"cr@{k}" for k in CR_KS), *(f"mor@{k}" for k in MOR_KS))


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    objectives: tuple[str, ...]
    seeds: int
    corpus_teacher_steps: int  # batches of 16 passages, from random weights
    task_teacher_steps: int  # batches of 64 problems, fine-tuned from the corpus teacher
    pretrain_steps: int
    downstream_steps: int
    eval_passages: int
    eval_problems: int
    cache_teachers: bool  # worth it when the students read the training data several times over
    student_lm_steps: int  # batches of 8 passages of language modelling before distillation; 0 = random students
    rlkd_weight: float = 2.0  # the paper's
    rank_on: str = "logits"  # the official code's
    rank_eps: float = 1.0  # the soft rank's regularisation strength (torchsort's default, the official code's)

    def ranked_run(self, name: str, seed: int) -> str:
        """The run folder of a student trained with the ranking term (settings named unless the paper's)."""
        weight = "" if self.rlkd_weight == 2.0 else f"-w{self.rlkd_weight:g}"
        scores = "" if self.rank_on == "logits" else f"-{self.rank_on}"
        eps = "" if self.rank_eps == 1.0 else f"-eps{self.rank_eps:g}"
        return f"{name}{weight}{scores}{eps}-seed{seed}"

    def ranking(self, k: int) -> dict:
        """The ``objective.rlkd`` settings of a run with the ranking term."""
        return {"k": k, "weight": self.rlkd_weight, "rank_on": self.rank_on, "regularization_strength": self.rank_eps}

    def runs_folder(self, table: str, steps: int) -> str:
        """The folder of one table's student runs, named after how the students start."""
        start = f"-from-lm-{self.student_lm_steps}" if self.student_lm_steps else ""
        return f"{table}-{steps}{start}"


#: Sized to finish in under 10 minutes from a cold start on 2 CPU cores (teachers included): a smoke run of the
#: full plan, whose teachers are too briefly trained for its downstream column to measure much.
QUICK = Plan(("kl", "rkl", "tvd"), seeds=1, corpus_teacher_steps=200, task_teacher_steps=60, pretrain_steps=100,
             downstream_steps=100, eval_passages=100, eval_problems=100, cache_teachers=False, student_lm_steps=100)
#: Every objective over three seeds, sized to finish in under 90 minutes from a cold start on 2 CPU cores.
FULL = Plan(("kl", "rkl", "jsd", "tvd", "skl", "akl"), seeds=3, corpus_teacher_steps=600, task_teacher_steps=600,
            pretrain_steps=200, downstream_steps=200, eval_passages=150, eval_problems=200, cache_teachers=True,
            student_lm_steps=300)
#: The full grid's earlier, longer sizes (better trained teachers, twice the distillation steps): about two hours
#: from a cold start on 2 CPU cores, under one with its teachers already trained.
LONG = Plan(("kl", "rkl", "jsd", "tvd", "skl", "akl"), seeds=3, corpus_teacher_steps=1500, task_teacher_steps=1600,
            pretrain_steps=400, downstream_steps=400, eval_passages=200, eval_problems=300, cache_teachers=True,
            student_lm_steps=400)
PLANS = {"quick": QUICK, "full": FULL, "long": LONG}


def _run_config(teacher: Path | None, student: Path, data: str, steps: int, objective: dict, seed: int,
                max_length: int, cache: dict | None = None) -> dict:
    """A run's config; ``cache`` (``{"dir", "top_k"}``) makes its students read the teacher from that cache."""
    return {
        "task": "lm",
        "teachers": [{"path": str(teacher)}] if teacher else [],
        "student": {"path": str(student)},
        "data": {"train": data, "max_length": max_length},
        "objective": objective,
        "training": {"steps": steps, "batch_size": 8, "lr": 2e-3, "warmup_steps": 20, "seed": seed,
                     "eval_every": steps, "checkpoint_every": steps},
        **({"cache": cache} if cache else {}),
    }


def teacher_cache(home: Path, plan: Plan, teachers: dict[str, Path], name: str) -> dict | None:
    """Where the students of teacher ``name`` read it (built there by the first run that needs it); None
    when the plan runs its teachers online."""
    if not plan.cache_teachers:
        return None
    folder = teachers[name].parent.name  # one cache per trained teacher
    return {"dir": str(home / "tiny-lm" / f"cache-{folder}-top{CACHE_TOP_K[name]}"), "top_k": CACHE_TOP_K[name]}


def memoised_teacher(teacher: torch.nn.Module):
    """The teacher's log-probabilities on each evaluation batch, computed once: every student of the
    grid is scored on the same batches."""
    kept: dict[tuple[int, ...], torch.Tensor] = {}

    def logprobs(indices: list[int], batch: dict) -> torch.Tensor:
        if tuple(indices) not in kept:
            kept[tuple(indices)] = torch.log_softmax(next_token_logits(teacher, batch), -1)
        return kept[tuple(indices)]
    return logprobs


def _train_once(out_dir: Path, raw_config: dict) -> Path:
    """Train unless ``out_dir`` already holds this finished run; return its student directory."""
    if not (out_dir / "result.json").exists():
        train(parse_config(raw_config), out_dir, resume=(out_dir / "config.json").exists(), show_progress=False)
    return out_dir / "student"


def tiny_teachers(home: Path, plan: Plan) -> dict[str, Path]:
    """The built-in tokenizer and the two teachers trained from the built-in tiny teacher, once per step
    budget under ``home/tiny-lm``.

    The arithmetic teacher is the corpus teacher fine-tuned on the task, as real teachers are pretrained
    LMs fine-tuned on theirs. Trained from random weights on batches of 16 it mostly failed to copy the
    question's numbers into its solution (15% exact match in the first quick run, docs/results-lm.md).
    """
    from kdforge.models.builtin import builtin_folder

    root = home / "tiny-lm"
    language_modelling = {"name": "none", "ce_weight": 1.0}
    teachers = {"tokenizer": builtin_folder("tiny-lm-tokenizer", home)}
    initial = builtin_folder("tiny-lm-teacher", home)  # the tiny teacher, random, on that tokenizer
    corpus = _run_config(None, initial, "builtin:web-text", plan.corpus_teacher_steps, language_modelling, 0, 128)
    corpus["training"] |= {"batch_size": 16, "lr": 3e-3, "warmup_steps": 50}
    teachers["web"] = _train_once(root / f"teacher-web-{plan.corpus_teacher_steps}", corpus)
    task = _run_config(None, teachers["web"], "builtin:arithmetic", plan.task_teacher_steps, language_modelling, 0, 96)
    task["training"] |= {"batch_size": 64, "lr": 2e-3, "warmup_steps": 50}
    name = f"teacher-arithmetic-{plan.task_teacher_steps}x64-from-web-{plan.corpus_teacher_steps}"
    teachers["arithmetic"] = _train_once(root / name, task)
    return teachers


def _student_init(home: Path, tokenizer_dir: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    path = home / "tiny-lm" / f"student-init-seed{seed}"
    if not (path / "config.json").exists():
        build_tiny_lm(path, "student", AutoTokenizer.from_pretrained(tokenizer_dir), seed=seed)
    return path


def starting_student(home: Path, plan: Plan, tokenizer_dir: Path, seed: int) -> Path:
    """Seed ``seed``'s student before distillation: random, or trained by language modelling on the corpus
    (labels only, once per seed under ``home/tiny-lm``).

    From random weights the ranking term hurt every objective (docs/results-lm.md): a random student's
    top-k shares no id with the teacher's, so the term starts near its maximum with a gradient many times
    the base objective's. The paper distils into a pretrained student (TinyLlama), whose top-k already
    overlaps the teacher's.
    """
    initial = _student_init(home, tokenizer_dir, seed)
    if not plan.student_lm_steps:
        return initial
    language_modelling = _run_config(None, initial, "builtin:web-text", plan.student_lm_steps,
                                     {"name": "none", "ce_weight": 1.0}, seed, 128)
    return _train_once(home / "tiny-lm" / f"student-web-{plan.student_lm_steps}-seed{seed}", language_modelling)


def mean_rows(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """Mean, standard deviation and each seed's value of every metric (``key``, ``key_std``, ``key_seeds``)."""
    summary = {"seeds": len(rows)}
    for key in keys:
        values = [row[key] for row in rows]
        summary[key] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[f"{key}_seeds"] = values
    return summary


def pretrain_table(out: Path, home: Path, plan: Plan, teachers: dict[str, Path]) -> list[dict]:
    """Table 1 analogue: distil on the corpus; agreement on training and held-out passages."""
    teacher, tokenizer = load_causal_lm(teachers["web"])
    teacher.eval()
    splits = {
        "train": [encode_record(r, tokenizer, 128) for r in builtin_records("web-text")[: plan.eval_passages]],
        "heldout": [encode_record(r, tokenizer, 128) for r in builtin_records("web-text-heldout")[: plan.eval_passages]],
    }
    reference = {split: memoised_teacher(teacher) for split in splits}
    cache = teacher_cache(home, plan, teachers, "web")
    table = []
    for objective in plan.objectives:
        for with_rank in (False, True):
            per_seed = {split: [] for split in splits}
            for seed in range(plan.seeds):
                spec = {"name": objective, **({"rlkd": plan.ranking(PRETRAIN_K)} if with_rank else {})}
                name = plan.ranked_run(f"{objective}+r", seed) if with_rank else f"{objective}-seed{seed}"
                student_dir = _train_once(out / "runs" / plan.runs_folder("pretrain", plan.pretrain_steps) / name, _run_config(
                    teachers["web"], starting_student(home, plan, teachers["tokenizer"], seed), "builtin:web-text",
                    plan.pretrain_steps, spec, seed, 128, cache))
                student, _ = load_causal_lm(student_dir)
                for split, examples in splits.items():
                    per_seed[split].append(agreement_metrics(student, reference[split], examples, tokenizer.pad_token_id))
            for split, rows in per_seed.items():
                table.append({"objective": objective, "rlkd": with_rank, "split": split, **mean_rows(rows, METRIC_KEYS)})
    return table


def downstream_table(out: Path, home: Path, plan: Plan, teachers: dict[str, Path]) -> list[dict]:
    """Table 2 analogue: distil on the arithmetic task; exact-match accuracy of greedy answers."""
    problems = builtin_records("arithmetic-test")[: plan.eval_problems]
    queries = [p["query"] for p in problems]
    answers = [extract_answer(p["response"]) for p in problems]
    rank = plan.ranking(DOWNSTREAM_K)
    settings = [("sft", False, {"name": "none", "ce_weight": 1.0})]
    for objective in plan.objectives:
        settings += [(objective, False, {"name": objective}), (objective, True, {"name": objective, "rlkd": rank})]
    settings.append(("rank_only", True, {"name": "none", "rlkd": rank}))
    cache = teacher_cache(home, plan, teachers, "arithmetic")
    table = []
    for name, with_rank, spec in settings:
        accuracies = []
        for seed in range(plan.seeds):
            teacher = None if name == "sft" else teachers["arithmetic"]
            run = (plan.ranked_run(name if name == "rank_only" else f"{name}+r", seed) if with_rank
                   else f"{name}-seed{seed}")
            student_dir = _train_once(out / "runs" / plan.runs_folder("downstream", plan.downstream_steps) / run, _run_config(
                teacher, starting_student(home, plan, teachers["tokenizer"], seed), "builtin:arithmetic",
                plan.downstream_steps, spec, seed, 96, cache if teacher else None))
            student, tokenizer = load_causal_lm(student_dir)
            accuracies.append({"accuracy": exact_match_accuracy(student, tokenizer, queries, answers)})
        table.append({"objective": name, "rlkd": with_rank, **mean_rows(accuracies, ("accuracy",))})
    teacher, tokenizer = load_causal_lm(teachers["arithmetic"])
    table.append({"objective": "teacher", "rlkd": False, "accuracy": exact_match_accuracy(teacher, tokenizer, queries, answers),
                  "accuracy_std": 0.0, "seeds": 1})
    return table


def step_overhead(home: Path, plan: Plan, teachers: dict[str, Path], repeats: int = 20) -> dict:
    """Median milliseconds of one distillation step (batch, forward, backward, AdamW) with and without RLKD,
    with the corpus teacher cached or online as the grid's students have it."""
    from kdforge.tasks.lm import LMTask

    timers = {}
    for key, spec in (("step_ms_base", {"name": "kl"}), ("step_ms_rlkd", {"name": "kl", "rlkd": {"k": PRETRAIN_K}})):
        raw = _run_config(teachers["web"], _student_init(home, teachers["tokenizer"], 0), "builtin:web-text", 1, spec, 0, 128,
                          teacher_cache(home, plan, teachers, "web"))
        timers[key] = StepTimer(LMTask(parse_config(raw), home / "tiny-lm"), list(range(8)), home / "tiny-lm")
    timings = {key: 1000 * seconds for key, seconds in median_step_seconds(timers, repeats, warmup=2).items()}
    timings["rlkd_overhead_pct"] = 100 * (timings["step_ms_rlkd"] / timings["step_ms_base"] - 1)
    return timings


def gradient_balance(home: Path, plan: Plan, teachers: dict[str, Path]) -> list[dict]:
    """How hard the ranking term pulls against each base objective on a student about to be distilled on the
    corpus: both terms' gradient norms on the first training batch of seed 0, and the weighted ratio
    ``rlkd_weight * |grad L_rank| / |grad L_base|``, for a random student and for the plan's starting one."""
    from kdforge.tasks.lm import LMTask
    from kdforge.training.objective import term_gradient_norms

    starts = {"random": _student_init(home, teachers["tokenizer"], 0)}
    if plan.student_lm_steps:
        starts[f"lm-{plan.student_lm_steps}"] = starting_student(home, plan, teachers["tokenizer"], 0)
    rows = []
    for start, student in starts.items():
        configs = [parse_config(_run_config(teachers["web"], student, "builtin:web-text", 1,
                                            {"name": objective, "rlkd": plan.ranking(PRETRAIN_K)}, 0, 128,
                                            teacher_cache(home, plan, teachers, "web"))) for objective in plan.objectives]
        task = LMTask(configs[0], home / "tiny-lm")  # one task per student: only the objective changes
        batch = task.batch(list(range(8)))
        for objective, config in zip(plan.objectives, configs):
            task.config = config
            _, terms = task.loss(batch)
            norms = term_gradient_norms(terms, [p for p in task.student.parameters() if p.requires_grad])
            rows.append({"start": start, "objective": objective, "base_grad_norm": norms["kd"],
                         "rank_grad_norm": norms["rank"], "rank_loss": float(terms["rank"]),
                         "weighted_ratio": plan.rlkd_weight * norms["rank"] / norms["kd"]})
    return rows


def plot_agreement(pretrain: list[dict], path: Path) -> None:
    """CR@k and MOR@k on held-out text per objective, without and with RLKD (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in pretrain if r["split"] == "heldout"]
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, keys, title in ((axes[0], [f"cr@{k}" for k in CR_KS], "CR@k (held-out)"),
                              (axes[1], [f"mor@{k}" for k in MOR_KS], "MOR@k (held-out)")):
        for colour, objective in enumerate(objectives):
            for with_rank, style in ((False, "--"), (True, "-")):  # one colour per objective, solid = + R
                row = next(r for r in rows if r["objective"] == objective and r["rlkd"] == with_rank)
                axis.errorbar(range(len(keys)), [row[k] for k in keys], yerr=[row[f"{k}_std"] for k in keys],
                              color=f"C{colour}", linestyle=style, marker="o", capsize=3,
                              label=f"{objective}{' + R' if with_rank else ''}")
        axis.set_xticks(range(len(keys)), keys)
        axis.set_title(title)
        axis.set_ylabel("%")
    axes[1].legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def rlkd_gains(heldout: list[dict], downstream: list[dict] = ()) -> list[dict]:
    """Per base objective: what adding the ranking term changed, ``+ R`` minus without, on held-out
    agreement (``cr@2..5``, ``mor@k``: higher is better) and downstream accuracy. A change counts as
    ``"beyond spread"`` when it is larger than both rows' seed standard deviations (needs 2+ seeds).

    Args:
        heldout: agreement rows on held-out data, each objective without and with ``rlkd``.
        downstream: accuracy rows (``bench lm``'s Table 2); none for ``bench lm-real``.
    """
    gains = []
    for objective in dict.fromkeys(r["objective"] for r in heldout):
        rows = {r["rlkd"]: r for r in heldout if r["objective"] == objective}
        tasks = {r["rlkd"]: r for r in downstream if r["objective"] == objective}
        pairs = [(key, rows) for key in ("cr@2", "cr@3", "cr@4", "cr@5", *(f"mor@{k}" for k in MOR_KS))]
        if len(tasks) == 2:
            pairs.append(("accuracy", tasks))
        for key, pair in pairs:
            delta = pair[True][key] - pair[False][key]
            spread = max(pair[True][f"{key}_std"], pair[False][f"{key}_std"])
            paired = paired_changes(pair[True].get(f"{key}_seeds"), pair[False].get(f"{key}_seeds"))
            paired_spread = statistics.stdev(paired) if paired else None
            gains.append({"objective": objective, "metric": key, "delta": delta, "spread": spread,
                          "beyond_spread": pair[True]["seeds"] > 1 and abs(delta) > spread,
                          "paired_spread": paired_spread,
                          "beyond_paired_spread": paired_spread is not None and abs(delta) > paired_spread})
    return gains


def paired_changes(with_rank: list[float] | None, without: list[float] | None) -> list[float] | None:
    """Each seed's ``+ R`` value minus its value without: the seed fixes the student's start and the batch
    order, so the two runs of one seed differ by the ranking term alone. None without 2+ paired seeds."""
    if not with_rank or not without or len(with_rank) != len(without) or len(with_rank) < 2:
        return None
    return [a - b for a, b in zip(with_rank, without)]


#: What :func:`gains_table`'s marks mean.
GAINS_LEGEND = ("* where the change is larger than both rows' seed standard deviations; † where it is larger than "
                "the standard deviation of the seeds' paired changes (each seed's run with + R against its run "
                "without: same student start, same batches).")


def gains_table(gains: list[dict]) -> list[str]:
    """:func:`rlkd_gains` as markdown lines: one row per objective, ``+ R`` minus without in points,
    ``*`` where the change is beyond the seeds' spread, ``†`` where it is beyond the spread of the
    seeds' paired changes."""
    metrics = list(dict.fromkeys(g["metric"] for g in gains))
    lines = ["| objective | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for objective in dict.fromkeys(g["objective"] for g in gains):
        cells = {g["metric"]: f"{g['delta']:+.2f}{'*' if g['beyond_spread'] else ''}"
                              f"{'†' if g.get('beyond_paired_spread') else ''}" for g in gains
                 if g["objective"] == objective}
        lines.append(f"| {objective} | " + " | ".join(cells.get(m, "") for m in metrics) + " |")
    return lines


def student_start(plan: dict) -> str:
    """How a report's students started, in words."""
    steps = plan.get("student_lm_steps", 0)
    return (f"from {steps} steps of language modelling on the corpus (batches of 8 passages)" if steps
            else "from random weights")


def to_markdown(report: dict) -> str:
    lines = ["# RLKD on tiny models", "", f"Machine: {machine_line(report['machine'])}. Command: `{report['command']}`.",
             f"Seeds: {report['plan']['seeds']}; values are mean ± std over seeds; rates in percent.",
             f"Students start {student_start(report['plan'])}.", "",
             "## Table 1 analogue: distillation on the corpus", "",
             "| objective | split | ppl | CR@1 | CR@2 | CR@3 | CR@4 | CR@5 | MOR@3 | MOR@5 | MOR@10 | MOR@20 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["pretrain"]:
        cells = " | ".join(f"{r[k]:.2f} ± {r[k + '_std']:.2f}" for k in METRIC_KEYS)
        lines.append(f"| {r['objective']}{' + R' if r['rlkd'] else ''} | {r['split']} | {cells} |")
    lines += ["", "## Table 2 analogue: downstream exact-match accuracy", "", "| objective | accuracy % |", "|---|---|"]
    for r in report["downstream"]:
        label = r["objective"] + (" + R" if r["rlkd"] and r["objective"] != "rank_only" else "")
        lines.append(f"| {label} | {r['accuracy']:.1f} ± {r['accuracy_std']:.1f} |")
    heldout = [r for r in report["pretrain"] if r["split"] == "heldout"]
    lines += ["", "## What the ranking term changed", "",
              f"+ R minus without, in points (held-out agreement; downstream accuracy); {GAINS_LEGEND}", "",
              *gains_table(rlkd_gains(heldout, report["downstream"]))]
    if "gradients" in report:
        lines += ["", "## How hard the ranking term pulls at the start", "",
                  "Gradient norms on the first corpus batch of seed 0, before any distillation step; ratio = "
                  "rlkd weight x |grad rank| / |grad base|.", "",
                  "| student | objective | base grad norm | rank grad norm | rank loss | ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['start']} | {r['objective']} | {r['base_grad_norm']:.4f} | {r['rank_grad_norm']:.4f} | "
                  f"{r['rank_loss']:.3f} | {r['weighted_ratio']:.1f} |" for r in report["gradients"]]
    o = report["overhead"]
    lines += ["", "## Table 4 analogue: step time", "",
              f"KL step {o['step_ms_base']:.1f} ms, KL + R step {o['step_ms_rlkd']:.1f} ms "
              f"({o['rlkd_overhead_pct']:+.1f}%), corpus teacher "
              f"{'read from its cache' if report['plan']['cache_teachers'] else 'run online'}.", "",
              "![agreement](lm_agreement.png)"]
    return "\n".join(lines) + "\n"


def run(out: Path, plan_name: str = "full", home: Path | None = None, command: str = "kdforge bench lm",
        **plan_changes) -> dict:
    """Run the benchmark into ``out`` (``lm.json``, ``lm.md``, ``lm_agreement.png``); finished runs in
    ``out/runs`` are reused. ``plan_name`` picks one of :data:`PLANS`; ``plan_changes`` (``seeds=3``,
    ``objectives=("jsd",)``, ``rlkd_weight``, ``rank_on``, ``rank_eps``, ``student_lm_steps``...) replace
    its fields; None keeps a field."""
    if plan_name not in PLANS:
        raise KdforgeError(f"unknown plan {plan_name!r} (known: {', '.join(PLANS)})")
    plan = PLANS[plan_name]
    plan = Plan(**{**plan.__dict__, **{key: value for key, value in plan_changes.items() if value is not None}})
    out, home = Path(out), kdforge_home(home)
    out.mkdir(parents=True, exist_ok=True)
    teachers = tiny_teachers(home, plan)
    report = {"command": command, "plan": plan.__dict__, "machine": describe_machine(),
              "pretrain": pretrain_table(out, home, plan, teachers),
              "downstream": downstream_table(out, home, plan, teachers),
              "gradients": gradient_balance(home, plan, teachers),
              "overhead": step_overhead(home, plan, teachers)}
    (out / "lm.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_agreement(report["pretrain"], out / "lm_agreement.png")
    (out / "lm.md").write_text(to_markdown(report))
    return report
