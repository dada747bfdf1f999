"""``kdforge bench lm``'s verdict on the ranking term: a change counts only beyond the seed spread."""

from pathlib import Path

import pytest

from kdforge.benchmarks.lm import METRIC_KEYS, gains_table, rlkd_gains, to_markdown
from kdforge.errors import KdforgeError


def pretrain_row(rlkd: bool, value: float, spread: float) -> dict:
    return {"objective": "kl", "rlkd": rlkd, "split": "heldout", "seeds": 3, **{k: value for k in METRIC_KEYS},
            **{f"{k}_std": spread for k in METRIC_KEYS}}


def downstream_row(rlkd: bool, accuracy: float, spread: float) -> dict:
    return {"objective": "kl", "rlkd": rlkd, "accuracy": accuracy, "accuracy_std": spread, "seeds": 3}


def test_a_gain_counts_only_when_it_exceeds_both_rows_seed_spreads():
    report = {"pretrain": [pretrain_row(False, 10.0, 1.0), pretrain_row(True, 12.0, 0.5)],
              "downstream": [downstream_row(False, 20.0, 3.0), downstream_row(True, 21.0, 1.0)]}
    gains = {g["metric"]: g for g in rlkd_gains(report["pretrain"], report["downstream"])}
    assert set(gains) == {"cr@2", "cr@3", "cr@4", "cr@5", "mor@3", "mor@5", "mor@10", "mor@20", "accuracy"}
    assert gains["cr@2"]["delta"] == 2.0 and gains["cr@2"]["beyond_spread"]
    assert gains["accuracy"]["delta"] == 1.0 and not gains["accuracy"]["beyond_spread"]
    report |= {"machine": {"gpu": None, "cores": 2, "cpu": "test", "torch": "2.13.0"}, "command": "kdforge bench lm", "plan": {"seeds": 3, "cache_teachers": True},
               "overhead": {"step_ms_base": 100.0, "step_ms_rlkd": 110.0, "rlkd_overhead_pct": 10.0}}
    assert "| kl | +2.00* | +2.00* | +2.00* | +2.00* | +2.00* | +2.00* | +2.00* | +2.00* | +1.00 |" in to_markdown(report)


def test_a_change_every_seed_shows_counts_against_the_spread_of_the_paired_changes():
    seeds = {False: [10.0, 20.0, 30.0], True: [11.0, 21.5, 30.5]}  # +1, +1.5, +0.5: far inside the rows' spread
    rows = [{**pretrain_row(rlkd, sum(seeds[rlkd]) / 3, 10.0), **{f"{k}_seeds": seeds[rlkd] for k in METRIC_KEYS}}
            for rlkd in (False, True)]
    gain = next(g for g in rlkd_gains(rows) if g["metric"] == "cr@2")
    assert gain["delta"] == pytest.approx(1.0) and not gain["beyond_spread"]
    assert gain["paired_spread"] == pytest.approx(0.5) and gain["beyond_paired_spread"]
    rows[1]["cr@2_seeds"] = [12.5, 20.5, 30.0]  # +2.5, +0.5, 0: as large on average, not on every seed alike
    gain = next(g for g in rlkd_gains(rows) if g["metric"] == "cr@2")
    assert gain["paired_spread"] == pytest.approx(1.3229, abs=1e-4) and not gain["beyond_paired_spread"]
    assert gains_table(rlkd_gains(rows[:1] + [{**rows[1], "cr@3_seeds": [9.0]}]))[2].startswith("| kl | +1.00 | +1.00 |")


def test_quick_and_long_together_are_refused_before_anything_runs(tmp_path, capsys):
    from kdforge.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["bench", "lm", "--out", str(tmp_path / "bench"), "--quick", "--long"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "kdforge: error: --quick and --long are two different plans: give one of them\n"
    assert not (tmp_path / "bench").exists()


def test_an_unknown_plan_is_refused():
    from kdforge.benchmarks.lm import run

    with pytest.raises(KdforgeError, match="unknown plan 'medium' \\(known: quick, full, long\\)"):
        run(Path("unused"), "medium")
