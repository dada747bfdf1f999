"""``kdforge demo`` end to end on tiny models: every stage, the report, the export, reuse and refusal."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from kdforge.demo import DemoPlan, claims, demo_command, parse_teacher_steps, run_demo
from kdforge.errors import KdforgeError
from kdforge.evaluation.runner import evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(utterances=12, test_fraction=0.25, labelled=4, student_steps=2, ctc_size="tiny",
            teacher_steps={"whisper-base": 2, "whisper-tiny.en": 2, "ctc": 2},
            teacher_overrides=("training.batch_size=4", "audio.audio_ctx=50"),
            student_overrides=("audio.audio_ctx=50", "student.num_layers=1", "student.lora={r: 2, alpha: 4}",
                               "training.batch_size=4", "training.warmup_steps=1"))


@pytest.fixture(scope="module")
def finished_demo(tiny_whisper, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    plan = DemoPlan(**TINY, methods=("lora_ce", "lora_lppm"))
    models = {"whisper-base": tiny_whisper, "whisper-tiny.en": tiny_whisper}
    report = run_demo(root / "out", plan, CONFIGS, home=root / "home", models=models)
    return root, plan, models, report


def test_the_demo_reports_every_row_and_exports_the_best_student(finished_demo):
    root, plan, _, report = finished_demo
    out = root / "out"
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["zeroshot:whisper-base", "zeroshot:whisper-tiny.en", "teacher:whisper-base",
                       "teacher:whisper-tiny.en", "teacher:ctc", "ensemble", "student_base", "lora_ce", "lora_lppm"]
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    assert "| lora_lppm | 1 |" in (out / "results.md").read_text()
    for picture in ("results_wer.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    students = {row["method"]: row["wer"]["mean"] for row in report["rows"] if row["method"] in plan.methods}
    assert report["exported_student"]["method"] == min(students, key=students.get)
    with safe_open(out / "student" / "model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
    assert not any("lora" in name or "heads" in name for name in names)  # merged, no projection heads
    from transformers import WhisperProcessor

    assert WhisperProcessor.from_pretrained(out / "student").tokenizer.get_vocab()  # the processor travels with it
    assert set(report["stage_seconds"]) == {"prepare_models", "synthesise_speech", "adapt_teachers", "score_teachers",
                                            "cache_teachers", "distil_students", "export"}
    lppm = next(row for row in report["rows"] if row["method"] == "lora_lppm")
    assert lppm["teachers_used"]["lppm"] == ["whisper-base", "whisper-tiny.en", "ctc"]
    # both tiny "Whisper" teachers share the student's vocabulary here: KD takes their mean
    assert lppm["teachers_used"]["logit"] == ["whisper-base", "whisper-tiny.en"]
    ce = next(row for row in report["rows"] if row["method"] == "lora_ce")
    assert not any(ce.get("teachers_used", {}).values())  # labels only: the demo's teachers are not pushed into it
    guarded = evaluate(out / "runs" / "lora_ce-s0" / "student", Path(report["test"]), batch_size=8,
                       no_repeat_ngram_size=4)
    assert ce["wer_guarded"]["values"] == [guarded["wer"]]  # every student is also scored with the loop guard


def test_a_second_demo_with_other_methods_seeds_and_settings_reuses_the_teachers_and_cache(finished_demo):
    root, plan, models, _ = finished_demo
    workspace = next((root / "home" / "demo").iterdir())
    stamps = {path: path.stat().st_mtime_ns for path in [*workspace.glob("teachers/*/result.json"),
                                                         *workspace.glob("cache-*/manifest.json")]}
    other = DemoPlan(**TINY, methods=("lora_ce",), seeds=2, student_settings=("training.lr=5.0e-4",))
    report = run_demo(root / "again", other, CONFIGS, home=root / "home", models=models)
    assert len(stamps) == 4 and all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    assert [p.name for p in (root / "home" / "demo").iterdir()] == [workspace.name]
    assert report["exported_student"]["method"] == "lora_ce"
    ce = next(row for row in report["rows"] if row["method"] == "lora_ce")
    assert ce["seeds"] == 2 and (root / "again" / "runs" / "lora_ce-s1" / "result.json").is_file()
    trained = json.loads((root / "again" / "runs" / "lora_ce-s1" / "config.json").read_text())
    assert trained["training"]["lr"] == 5.0e-4 != json.loads((root / "out" / "runs" / "lora_ce-s0" / "config.json")
                                                             .read_text())["training"]["lr"]
    assert report["command"] == (f"kdforge demo --out {root / 'again'} --method lora_ce --seeds 2 --student-steps 2 "
                                 "--utterances 12 --labelled 4 --teacher-steps whisper-base=2 --teacher-steps whisper-tiny.en=2 "
                                 "--teacher-steps ctc=2 --set training.lr=5.0e-4")


def test_a_setting_that_changes_the_mapped_layers_gets_a_cache_of_its_own(finished_demo):
    root, _, models, _ = finished_demo
    workspace = next((root / "home" / "demo").iterdir())
    first = sorted(workspace.glob("cache-*/manifest.json"))
    tokens = DemoPlan(**TINY, methods=("lora_lppm",), student_settings=("alignment.decoder_layers=[1]",))
    report = run_demo(root / "tokens", tokens, CONFIGS, home=root / "home", models=models)
    caches = sorted(workspace.glob("cache-*/manifest.json"))
    assert len(first) == 1 and len(caches) == 2 and first[0] in caches
    trained = json.loads((root / "tokens" / "runs" / "lora_lppm-s0" / "config.json").read_text())
    assert Path(trained["cache"]["dir"]) == next(path.parent for path in caches if path != first[0])
    lppm = next(row for row in report["rows"] if row["method"] == "lora_lppm")
    assert lppm["teachers_used"]["lppm_tokens"] == ["whisper-base", "whisper-tiny.en"]  # the CTC teacher has no decoder


def test_a_finished_demo_folder_is_refused_and_left_alone(finished_demo, capsys):
    from kdforge.cli import main

    out = finished_demo[0] / "out"
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--configs", str(CONFIGS)])
    assert exit_info.value.code == 2
    assert "holds a finished demo" in capsys.readouterr().err
    assert before == {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}


def test_teacher_budgets_are_named_steps_and_a_bad_one_is_refused_by_name():
    defaults = DemoPlan().teacher_steps
    longer = parse_teacher_steps(["whisper-base=120", "ctc=10"], defaults)
    assert longer == {**defaults, "whisper-base": 120, "ctc": 10}
    assert DemoPlan(teacher_steps=longer).key(CONFIGS) != DemoPlan().key(CONFIGS)  # another shared workspace
    with pytest.raises(KdforgeError, match="unknown teacher 'whisper-small'"):
        parse_teacher_steps(["whisper-small=10"], defaults)
    with pytest.raises(KdforgeError, match="STEPS must be a whole number >= 1"):
        parse_teacher_steps(["ctc=0"], defaults)
    with pytest.raises(KdforgeError, match="STEPS must be a whole number >= 1"):
        parse_teacher_steps(["ctc=²"], defaults)  # a digit to str.isdigit, not a number to int()
    with pytest.raises(KdforgeError, match="expected NAME=STEPS"):
        parse_teacher_steps(["whisper-base"], defaults)


def test_a_larger_corpus_gets_its_own_workspace_and_labels_must_fit_its_training_split(tmp_path, capsys):
    larger = DemoPlan(utterances=1200, labelled=120)
    assert larger.key(CONFIGS) != DemoPlan().key(CONFIGS)
    assert "--utterances 1200" in demo_command(Path("runs/x"), larger)
    assert "--labelled" not in demo_command(Path("runs/x"), larger)
    with pytest.raises(KdforgeError, match="between 1 and the 360 training utterances of a 400-utterance corpus"):
        DemoPlan(labelled=361)
    from kdforge.cli import main

    out = tmp_path / "refused"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--configs", str(CONFIGS), "--utterances", "100", "--labelled", "91"])
    assert exit_info.value.code == 2
    assert "got 91" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_the_claims_rank_the_students_plain_and_with_the_loop_guard():
    def row(method, wer, guarded=None, speed=10.0):
        return {"method": method, "wer": {"mean": wer}, "utterances_per_s": {"mean": speed},
                **({"wer_guarded": {"mean": guarded}} if guarded is not None else {})}

    rows = [row("ensemble", 0.30, speed=2.0), row("teacher:a", 0.31),
            row("lora_logit_kd", 0.40, 0.39, speed=16.0), row("lora_lppm", 0.45, 0.38), row("lora_ce", 0.50, 0.46)]
    checked = claims(rows, ensemble_beats_best_member=True)
    assert checked["best_student"] == "lora_logit_kd" and checked["ours_lowest_student_wer"] is False
    assert checked["best_student_guarded"] == "lora_lppm" and checked["ours_lowest_student_wer_guarded"] is True
    assert checked["best_student_speedup_over_ensemble"] == pytest.approx(8.0)
    assert checked["best_student_wer_over_ensemble"] == pytest.approx(0.40 / 0.30)
    alone = claims([row("lora_lppm", 0.45, 0.38)], ensemble_beats_best_member=False)
    assert alone["ours_lowest_student_wer"] is None and alone["best_student_speedup_over_ensemble"] is None
