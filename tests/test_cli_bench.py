"""The command line's error contract and the loss benchmark's measurements."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdforge.benchmarks import losses as loss_benchmark
from kdforge.errors import KdforgeError


def run_kdforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdforge", *args], capture_output=True, text=True, timeout=120)


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    done = run_kdforge("demo", "--out", str(tmp_path / "demo"), "--configs", str(tmp_path / "no-configs"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"kdforge: error: {tmp_path / 'no-configs'} lacks teachers/ and asr/: pass the repository's "
                     "configs folder with --configs"]
    assert not (tmp_path / "demo").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    done = run_kdforge("--debug", "demo", "--out", str(tmp_path / "demo"), "--configs", str(tmp_path / "no-configs"))
    assert done.returncode != 0 and "Traceback" in done.stderr and "KdforgeError" in done.stderr


def test_chunked_path_bounds_the_memory_the_dense_path_spends():
    dense = loss_benchmark.run_case("kl", 1024, 32_000, chunked=False, repeats=1)
    chunked = loss_benchmark.run_case("kl", 1024, 32_000, chunked=True, repeats=1)
    logits_mb = 1024 * 32_000 * 4 / 2**20
    assert dense["peak_mb"] > 4 * logits_mb  # the plain path holds several full-vocabulary tensors
    assert chunked["peak_mb"] < 2 * logits_mb  # gradient buffer + one chunk's temporaries
    assert chunked["seconds"] > 0 and dense["seconds"] > 0


def test_summary_reads_the_targets_off_the_rows():
    def row(objective, vocab, chunked, seconds, peak):
        return dict(objective=objective, positions=10, vocab=vocab, chunked=chunked, seconds=seconds,
                    peak_mb=peak, logits_mb=100.0)
    rows = [row("kl", 32_000, False, 2.0, 900), row("kl", 32_000, True, 0.5, 130), row("rank", 32_000, False, 1.0, 200),
            row("kl", 128_000, False, 3.0, 800), row("kl", 128_000, True, 3.0, 140)]
    summary = loss_benchmark.summarise(rows)
    assert summary["chunked_peak_mb"] == 140 and summary["naive_peak_mb"] == 800
    assert summary["chunked_peak_target_met"] and summary["rank_cost_target_met"]
    assert summary["rank_cost_pct_of_kl"] == pytest.approx(50.0)
    assert summary["rank_cost_pct_of_chunked_kl"] == pytest.approx(200.0)
    rows[-1]["peak_mb"] = 160
    assert not loss_benchmark.summarise(rows)["chunked_peak_target_met"]
    report = {"command": "kdforge bench losses", "machine": {"cores": 2, "cpu": "x", "gpu": None, "torch": "2"},
              "rows": rows, "summary": loss_benchmark.summarise(rows)}
    markdown = loss_benchmark.to_markdown(report)
    assert "| kl | 10 | 128,000 | chunked | 3.000 | 160 | 1.60 |" in markdown and "NOT met" in markdown
    json.dumps(report)


def test_a_users_overrides_win_over_the_benchmarks_teachers_and_cache():
    from kdforge.benchmarks.asr import method_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "asr"
    ours = method_config("lora_lppm", configs, 1, ("cache.dir=/tmp/mine",), ("cache.dir=/tmp/bench",))
    assert str(ours.cache.dir) == "/tmp/mine" and ours.training.seed == 1
    labels_only = method_config("lora_ce", configs, 0, (), ("cache.dir=/tmp/bench",))
    assert not labels_only.teachers and labels_only.cache.dir is None  # distil overrides skip label-only rows


def test_an_override_under_a_section_a_method_leaves_out_does_not_turn_it_into_another_method():
    from kdforge.benchmarks.asr import method_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "asr"
    settings = ("alignment.weight=0.1", "objective.rlkd.weight=3.0", "training.lr=0.5")
    kd = method_config("lora_logit_kd", configs, 0, settings)
    assert kd.alignment is None and kd.objective.rlkd is None and kd.training.lr == 0.5
    ours = method_config("lora_lppm_rlkd", configs, 0, settings)
    assert ours.alignment.weight == 0.1 and ours.objective.rlkd.weight == 3.0 and ours.training.lr == 0.5
    assert method_config("lora_lppm", configs, 0, ("teachers.0.weight=2.0",)).teachers[0].weight == 2.0
    with pytest.raises(KdforgeError, match="trainng"):  # a misspelt section is named, not skipped
        method_config("lora_logit_kd", configs, 0, ("trainng.lr=0.5",))
