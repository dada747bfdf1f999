"""``kdforge bench asr-teachers``: the adapted ensemble against its members and zero-shot Whisper.

For each adaptation seed, every adapted teacher and the ensemble of that seed's teachers
(minimum Bayes risk, :func:`kdforge.evaluation.ensemble.evaluate_ensemble`) are scored on the
unseen-voice test split; rows give the mean and spread over seeds, with the teachers' pairwise
disagreement. Zero-shot rows score the unadapted checkpoints once. Writes ``teachers.json``,
``teachers.md`` and ``teachers_wer.png``.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from kdforge.benchmarks.machine import describe_machine, machine_line
from kdforge.errors import KdforgeError
from kdforge.evaluation.ensemble import evaluate_ensemble
from kdforge.evaluation.runner import evaluate
from kdforge.files import write_json_atomic, write_text_atomic


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run(members: dict[str, list[Path]], zeroshot: dict[str, Path], data_dir: Path, out: Path,
        audio_ctx: int | None = None, command: str = "") -> dict:
    """Score zero-shot models, each seed's adapted teachers and their ensemble on ``data_dir``.

    Args:
        members: teacher name -> its adapted model folders, one per seed (same count for all).
        zeroshot: name -> an unadapted model folder.

    Raises:
        KdforgeError: teachers with different numbers of seeds, or fewer than two teachers.
    """
    seeds = {len(folders) for folders in members.values()}
    if len(seeds) != 1 or len(members) < 2:
        raise KdforgeError("give at least two teachers, each with the same number of seed folders")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"method": f"zeroshot:{name}", "seeds": 1, **_scores([evaluate(folder, data_dir, audio_ctx=audio_ctx)])}
            for name, folder in zeroshot.items()]
    per_seed = [evaluate_ensemble([folders[seed] for folders in members.values()], data_dir, audio_ctx=audio_ctx)
                for seed in range(seeds.pop())]
    for index, name in enumerate(members):
        rows.append({"method": f"teacher:{name}", "seeds": len(per_seed),
                     **_scores([result["members"][index] for result in per_seed])})
    rows.append({"method": "ensemble", "seeds": len(per_seed), **_scores(per_seed)})
    # evaluate_ensemble lists the pairs in itertools.combinations order of its members
    disagreement = [{"a": a, "b": b, **{key: spread([r["disagreement"][index][key] for r in per_seed])
                                        for key in ("hypotheses_differ", "errors_differ")}}
                    for index, (a, b) in enumerate(itertools.combinations(members, 2))]
    best_member = min((r for r in rows if r["method"].startswith("teacher:")), key=lambda r: r["wer"]["mean"])
    report = {"command": command, "machine": describe_machine(), "data": str(data_dir), "audio_ctx": audio_ctx,
              "members": {name: [str(f) for f in folders] for name, folders in members.items()},
              "rows": rows, "disagreement": disagreement,
              "ensemble_beats_best_member": rows[-1]["wer"]["mean"] < best_member["wer"]["mean"]}
    write_json_atomic(out / "teachers.json", report)
    write_text_atomic(out / "teachers.md", to_markdown(report))
    plot_wer(rows, out / "teachers_wer.png")
    return report


def _scores(results: list[dict]) -> dict:
    return {key: spread([result[key] for result in results]) for key in ("wer", "cer", "utterances_per_s")}


def to_markdown(report: dict) -> str:
    lines = [f"Machine: {machine_line(report['machine'])}", "", f"Command: `{report['command']}`", "",
             "| model | seeds | WER | CER | utterances/s |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        wer, cer = row["wer"], row["cer"]
        lines.append(f"| {row['method']} | {row['seeds']} | {wer['mean']:.3f} ± {wer['std']:.3f} | "
                     f"{cer['mean']:.3f} ± {cer['std']:.3f} | {row['utterances_per_s']['mean']:.1f} |")
    lines += ["", "| teachers | transcripts differ | errors differ |", "|---|---|---|"]
    for pair in report["disagreement"]:
        lines.append(f"| {pair['a']} / {pair['b']} | {pair['hypotheses_differ']['mean']:.2f} | "
                     f"{pair['errors_differ']['mean']:.2f} |")
    lines += ["", f"Ensemble beats its best member: **{'yes' if report['ensemble_beats_best_member'] else 'no'}**"]
    return "\n".join(lines) + "\n"


def plot_wer(rows: list[dict], path: Path, title: str = "ASR teachers: zero-shot, adapted, ensemble") -> None:
    """A bar per row: mean WER with the seed spread as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(8, 0.8 * len(rows)), 4))
    names = [row["method"] for row in rows]
    axis.bar(names, [row["wer"]["mean"] for row in rows], yerr=[row["wer"]["std"] for row in rows], capsize=4,
             color=["#999999" if n.startswith("zeroshot") else "#c44e52" if n == "ensemble" else "#4c72b0" for n in names])
    axis.set(ylabel="WER (unseen voices)", title=title)
    axis.tick_params(axis="x", labelrotation=30)
    plt.setp(axis.get_xticklabels(), ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

