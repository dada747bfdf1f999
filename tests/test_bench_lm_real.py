"""``kdforge bench lm-real`` on a tiny teacher: held-out split, rows, step costs, files; and its input errors."""

import json

import pytest

from kdforge.benchmarks import lm_real
from kdforge.errors import KdforgeError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_one_file_serves_training_and_held_out_text_without_overlap(tmp_path):
    words = [f"w{i}" for i in range(lm_real.PASSAGE_WORDS * 5)]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(words[:lm_real.PASSAGE_WORDS * 3])},
                                                 {"text": " ".join(words[lm_real.PASSAGE_WORDS * 3:])}])
    train, held_out = lm_real.split_records(data, data, train_count=10, eval_count=2)
    assert len(held_out) == 2 and len(train) == 3  # five passages: the last two are held out
    assert " ".join(r["text"] for r in train + held_out) == " ".join(words)
    with pytest.raises(KdforgeError, match="no training record outside the held-out ones"):
        lm_real.split_records(data, data, train_count=10, eval_count=5)


def test_the_benchmark_trains_each_objective_with_and_without_ranking_over_seeds_from_one_cache(tiny_lm, tmp_path):
    plan = lm_real.RealPlan(objectives=("kl",), student_layers=2, steps=2, batch_size=4, max_length=96,
                            train_records=12, eval_records=6, seeds=2)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [json.loads(line) for line in tiny_lm["data"].read_text().splitlines()[-6:]])
    report = lm_real.run(tmp_path / "out", tiny_lm["data"], held_out, plan, teacher=tiny_lm["teacher"], timing_repeats=1)
    rows = {(r["objective"], r["rlkd"]): r for r in report["heldout"]}
    assert set(rows) == {("teacher", False), ("student_init", False), ("kl", False), ("kl", True)}
    assert report["rlkd_k"] == 5 and report["data"]["kind"] == "instruction"  # the paper's k for instruction data
    assert "cr@1" not in rows["teacher", False] and rows["teacher", False]["ppl"] > 1
    for key in ("kl", False), ("kl", True):
        runs = [json.loads((tmp_path / "out" / "runs" / f"kl{'+r' if key[1] else ''}-seed{seed}" / "result.json").read_text())
                for seed in (0, 1)]
        assert rows[key]["seeds"] == 2 and 0 <= rows[key]["mor@20"] <= 100
        assert rows[key]["ppl"] == pytest.approx((runs[0]["eval"]["ppl"] + runs[1]["eval"]["ppl"]) / 2)
        assert rows[key]["ppl_std"] == pytest.approx(abs(runs[0]["eval"]["ppl"] - runs[1]["eval"]["ppl"]) / 2 ** 0.5)
    # every student read the one cache: each run's config points at it, and nobody built another
    configs = [json.loads((run / "config.json").read_text()) for run in sorted((tmp_path / "out" / "runs").iterdir())]
    assert len(configs) == 4 and {c["cache"]["dir"] for c in configs} == {str(tmp_path / "out" / "cache")}
    assert {c["training"]["seed"] for c in configs} == {0, 1}
    assert report["overhead"]["step_ms_rlkd"] > 0 and report["overhead"]["step_ms_base"] > 0
    saved = json.loads((tmp_path / "out" / "lm-real.json").read_text())
    assert saved["heldout"] == report["heldout"]
    assert (tmp_path / "out" / "lm-real_agreement.png").stat().st_size > 0
    markdown = (tmp_path / "out" / "lm-real.md").read_text()
    assert "| kl + R |" in markdown
    gain = rows["kl", True]["mor@5"] - rows["kl", False]["mor@5"]  # the ranking term's change, in the table
    beyond = abs(gain) > max(rows["kl", True]["mor@5_std"], rows["kl", False]["mor@5_std"])
    paired = [a - b for a, b in zip(rows["kl", True]["mor@5_seeds"], rows["kl", False]["mor@5_seeds"])]
    beyond_paired = abs(gain) > abs(paired[0] - paired[1]) / 2 ** 0.5  # two seeds' standard deviation
    lines = markdown.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| objective | cr@2"))
    header, gains = lines[at], lines[at + 2]
    assert gains.startswith("| kl | ")
    cell = gains.split(" | ")[header.split(" | ").index("mor@5")]
    assert cell == f"{gain:+.2f}{'*' if beyond else ''}{'†' if beyond_paired else ''}"


def test_bad_data_fails_before_any_folder_is_made(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(KdforgeError, match=r"bad.jsonl:2: not JSON"):
        lm_real.run(tmp_path / "out", bad, bad)
    assert not (tmp_path / "out").exists()
