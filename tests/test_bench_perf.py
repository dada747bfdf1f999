"""``kdforge bench perf``: every metric comes out, computed from its own measurements, and the online
step distils from exactly what the cache holds."""

from pathlib import Path

import pytest
import torch

from kdforge.benchmarks import perf
from kdforge.errors import KdforgeError

CONFIGS = Path(__file__).parents[1] / "configs"


def test_quick_run_reports_every_metric_from_its_measurements(tmp_path, monkeypatch):
    def no_launcher(*args, **kwargs):
        raise KdforgeError("torchrun is not there")

    # the launch itself is tested in test_distributed.py; here, that a failed one spares the other metrics
    monkeypatch.setattr(perf, "ddp_samples_per_second", no_launcher)
    report = perf.run(tmp_path / "out", quick=True, command="kdforge bench perf --quick", configs=CONFIGS,
                      step_repeats=3)

    assert set(perf.METRICS) <= set(report)
    assert report["steps"]["repeats"] == report["plan"]["step_repeats"] == 3  # the quick plan's 2, overridden
    assert report["ddp_2proc_throughput_ratio"] is None and "torchrun is not there" in report["ddp"]["error"]
    seconds = report["steps"]["seconds"]
    assert all(value > 0 for value in seconds.values())
    assert report["cached_step_over_student_step"] == seconds["cached"] / seconds["student"]
    assert report["online_over_cached_speedup"] == seconds["online"] / seconds["cached"]
    products = report["steps"]["mapping_products_seconds"]
    assert 0 < products < seconds["cached"]  # a part of the mapping, so of the step
    assert report["cached_step_floor_over_student_step"] == (seconds["cached_without_lppm"] + products) / seconds["student"]
    assert set(seconds) == {"student", "cached", "online", "cached_without_lppm", "cached_without_logit_terms",
                            "student_bfloat16", "cached_bfloat16"}
    assert report["bfloat16_student_step_speedup"] == seconds["student"] / seconds["student_bfloat16"]
    assert report["bfloat16_cached_step_over_student_step"] == seconds["cached_bfloat16"] / seconds["student_bfloat16"]
    cache = report["cache"]
    assert report["parallel_cache_speedup"] == cache["workers_1"]["seconds"] / cache["workers_2"]["seconds"]
    assert set(cache["workers_2"]["teacher_seconds"]) == {"whisper-wide", "whisper-narrow", "ctc"}
    assert cache["megabytes"] > 0
    assert 0 < report["chunked_peak_mb"] < report["naive_peak_mb"]
    speed = report["throughput"]
    assert speed["utterances"] == 32 and set(speed["members"]) == {"whisper-wide", "whisper-narrow", "ctc"}
    assert report["student_over_ensemble_throughput"] == (speed["student"]["utterances_per_s"]
                                                          / speed["ensemble"]["utterances_per_s"])
    assert report["machine"]["cores"] >= 1

    saved = (tmp_path / "out" / "perf.json").read_text()
    assert '"cached_step_over_student_step"' in saved
    markdown = (tmp_path / "out" / "perf.md").read_text()
    assert all(f"| {name}" in markdown for name in (*perf.METRICS, "bfloat16_student_step_speedup",
                                                     "bfloat16_cached_step_over_student_step"))
    assert "failed: torchrun is not there" in markdown and "Quick run" in markdown
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["perf.json", "perf.md"]  # no work folder left


def test_the_online_step_computes_what_the_cache_holds(tmp_path, monkeypatch):
    from kdforge.tasks.asr_distill import WhisperDistillationTask
    from kdforge.teachers.build import build_cache_from_config
    from kdforge.teachers.cache import TeacherCache

    teachers = perf.ensemble_folders(real_models=False)
    distil = perf.recipe_configs(CONFIGS, teachers, tmp_path / "cache", real_models=False)["cached"]
    build_cache_from_config(distil, distil.cache.dir)
    # the cache's first batch of teacher passes: the online step runs the teachers on the same inputs
    indices = list(range(distil.cache.batch_size))
    cached_task = WhisperDistillationTask(distil, tmp_path)
    cached_task.premapped = set()  # the raw states, which the online teachers give (and the step then maps)
    cached = cached_task.batch(indices)
    online_task = perf.OnlineDistillationTask(distil, tmp_path)

    def no_cache_read(*args, **kwargs):
        raise AssertionError("the online step read teacher signals from the cache")

    monkeypatch.setattr(TeacherCache, "batch", no_cache_read)
    online = online_task.batch(indices)

    assert set(online) == set(cached)
    assert {f"hidden/{name}" for name in teachers} <= set(online) and "teacher_topk" in online
    for key, value in cached.items():
        if key == "teacher_topk":
            for field in ("indices", "logprobs", "tail_logprob"):
                torch.testing.assert_close(getattr(online[key], field), getattr(value, field), rtol=0, atol=0)
        else:
            torch.testing.assert_close(online[key], value, rtol=0, atol=0)


def test_the_mixed_precision_steps_differ_from_their_float32_twins_in_precision_alone(tmp_path):
    recipe = perf.recipe_configs(CONFIGS, perf.ensemble_folders(real_models=False), tmp_path / "cache",
                                 real_models=False)
    for name in ("student", "cached"):
        mixed, plain = (recipe[key].model_dump() for key in (f"{name}_bfloat16", name))
        assert plain["training"].pop("precision") == "float32"
        assert mixed["training"].pop("precision") == "bfloat16"
        assert mixed == plain


def test_a_configs_folder_without_the_recipe_is_named(tmp_path):
    with pytest.raises(KdforgeError, match="pass the repository's configs folder with --configs"):
        perf.recipe_configs(tmp_path, {}, tmp_path / "cache", real_models=True)


def test_bench_lm_times_a_step_with_and_without_the_ranking_term(tmp_path):
    from kdforge.benchmarks.lm import QUICK, step_overhead
    from kdforge.models.builtin import builtin_folder

    teachers = {"web": builtin_folder("tiny-lm-teacher"), "tokenizer": builtin_folder("tiny-lm-tokenizer")}
    timings = step_overhead(tmp_path, QUICK, teachers, repeats=2)
    assert timings["step_ms_base"] > 0 and timings["step_ms_rlkd"] > 0
    assert timings["rlkd_overhead_pct"] == pytest.approx(100 * (timings["step_ms_rlkd"] / timings["step_ms_base"] - 1))
