"""``kdforge bench losses``: time and peak memory of every objective, dense and chunked.

Each case runs in fresh processes. Memory: one forward + backward in a process whose C allocator
returns every freed block of 128 KiB or more to the system (``MALLOC_MMAP_THRESHOLD_``), so its
resident set follows the live tensors instead of glibc's cached free lists; ``peak_mb`` is the
growth of the maximum resident set over what the process held once the inputs (student and teacher
logits, float32) existed: what the loss adds, the student's gradient included. Time: the median of
``repeats`` forward + backward calls after one warm-up, in a process with the default allocator.
``logits_mb`` is one float32 logits tensor, for scale.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.progress import Progress

from kdforge.benchmarks.machine import describe_machine, machine_line
from kdforge.losses import OBJECTIVES, rlkd_ranking_loss
from kdforge.losses.reduction import auto_chunk_size

#: (positions, vocabulary size) of the issue's two regimes.
SHAPES = ((4096, 32_000), (1024, 128_000))
RANK_K = 5


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_resident_mb() -> float:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries that across
    fork and exec, so a child of a large process (``kdforge bench perf``) would report its parent's size."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def measure_case(objective: str, positions: int, vocab: int, chunked: bool, repeats: int) -> dict:
    """Forward + backward of one objective on random logits: median seconds, or added peak MB if repeats == 0."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(positions, vocab, generator=generator).mul_(3).requires_grad_()
    teacher = torch.randn(positions, vocab, generator=generator).mul_(3)
    if objective == "rank":
        def step() -> torch.Tensor:
            return rlkd_ranking_loss(student, teacher, k=RANK_K)
    else:
        loss = OBJECTIVES[objective]
        def step() -> torch.Tensor:
            return loss(student, teacher, chunk_size=auto_chunk_size(vocab) if chunked else None)
    before = _resident_mb()
    seconds = []
    for _ in range(repeats + 1):  # the first call warms up (and is the memory measurement)
        student.grad = None
        start = time.perf_counter()
        step().backward()
        seconds.append(time.perf_counter() - start)
    if repeats == 0:
        return {"peak_mb": _peak_resident_mb() - before}
    return {"seconds": statistics.median(seconds[1:])}


def _run_isolated(case: dict, environment: dict | None = None) -> dict:
    command = [sys.executable, "-m", "kdforge.benchmarks.losses", json.dumps(case)]
    env = None if environment is None else {**os.environ, **environment}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(objective: str, positions: int, vocab: int, chunked: bool, repeats: int) -> dict:
    """One table row: time and memory, each measured in its own fresh process."""
    case = dict(objective=objective, positions=positions, vocab=vocab, chunked=chunked)
    memory = _run_isolated({**case, "repeats": 0}, {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    timing = _run_isolated({**case, "repeats": repeats})
    return {**case, **timing, **memory, "logits_mb": positions * vocab * 4 / 2**20}


def plan_cases(shapes=SHAPES, objectives=None, repeats: int = 3) -> list[dict]:
    """Every objective dense and chunked at every shape, plus the ranking term (dense: it keeps only top-k)."""
    names = list(objectives or OBJECTIVES)
    cases = []
    for positions, vocab in shapes:
        for name in names:
            for chunked in (False, True):
                cases.append(dict(objective=name, positions=positions, vocab=vocab, chunked=chunked, repeats=repeats))
        cases.append(dict(objective="rank", positions=positions, vocab=vocab, chunked=False, repeats=repeats))
    return cases


def summarise(rows: list[dict]) -> dict:
    """The issue's targets, read off the measured rows."""
    def find(objective, vocab, chunked=False):
        return next(r for r in rows if r["objective"] == objective and r["vocab"] == vocab and r["chunked"] == chunked)

    largest = max(r["vocab"] for r in rows)
    smallest = min(r["vocab"] for r in rows)
    chunked_kl, naive_kl = find("kl", largest, True), find("kl", largest, False)
    rank_seconds = find("rank", smallest)["seconds"]
    rank_cost = rank_seconds / find("kl", smallest)["seconds"]
    return {
        "chunked_peak_mb": chunked_kl["peak_mb"],
        "naive_peak_mb": naive_kl["peak_mb"],
        "chunked_peak_over_logits": chunked_kl["peak_mb"] / chunked_kl["logits_mb"],
        "chunked_peak_target_met": chunked_kl["peak_mb"] <= 1.5 * chunked_kl["logits_mb"],
        "rank_cost_pct_of_kl": 100 * rank_cost,
        "rank_cost_pct_of_chunked_kl": 100 * rank_seconds / find("kl", smallest, True)["seconds"],
        "rank_cost_target_met": rank_cost < 1.0,
        "summary_vocab": {"peak": largest, "rank": smallest},
    }


def to_markdown(report: dict) -> str:
    lines = [
        "# Loss benchmark",
        "",
        f"Machine: {machine_line(report['machine'])}. Command: `{report['command']}`.",
        "Forward + backward per call (median), and the memory the call adds over its inputs.",
        "",
        "| objective | positions | V | path | seconds | peak MB | peak / logits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        path = "chunked" if r["chunked"] else "dense"
        lines.append(f"| {r['objective']} | {r['positions']} | {r['vocab']:,} | {path} | {r['seconds']:.3f} "
                     f"| {r['peak_mb']:.0f} | {r['peak_mb'] / r['logits_mb']:.2f} |")
    s = report["summary"]
    lines += [
        "",
        f"- Chunked KL peak at V = {s['summary_vocab']['peak']:,}: {s['chunked_peak_mb']:.0f} MB "
        f"({s['chunked_peak_over_logits']:.2f}x one logits tensor; target <= 1.5x: "
        f"{'met' if s['chunked_peak_target_met'] else 'NOT met'}); dense KL: {s['naive_peak_mb']:.0f} MB.",
        f"- Ranking term (k = {RANK_K}) at V = {s['summary_vocab']['rank']:,}: {s['rank_cost_pct_of_kl']:.1f}% of the "
        f"dense KL term's time (target < 100%: {'met' if s['rank_cost_target_met'] else 'NOT met'}), "
        f"{s['rank_cost_pct_of_chunked_kl']:.1f}% of the chunked KL term's.",
    ]
    return "\n".join(lines) + "\n"


def run(out_dir: Path, shapes=SHAPES, objectives=None, repeats: int = 3, command: str = "kdforge bench losses") -> dict:
    """Run every case in its own process; write ``out_dir/losses.json`` and ``losses.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = plan_cases(shapes, objectives, repeats)
    rows = []
    with Progress() as progress:
        task = progress.add_task("loss benchmark", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case['objective']} V={case['vocab']:,} "
                                              f"{'chunked' if case['chunked'] else 'dense'}")
            rows.append(run_case(**case))
            progress.advance(task)
    report = {"command": command, "machine": describe_machine(), "rows": rows, "summary": summarise(rows)}
    (out_dir / "losses.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "losses.md").write_text(to_markdown(report))
    return report


if __name__ == "__main__":
    print(json.dumps(measure_case(**json.loads(sys.argv[1]))))
