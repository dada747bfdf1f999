"""Ensembles: minimum Bayes risk decoding, disagreement, the ensemble beating its members, and teacher weights."""

import json
import math

import pytest

from kdforge.data.audio import load_audio, read_metadata
from kdforge.errors import KdforgeError
from kdforge.evaluation import ensemble
from kdforge.evaluation.ensemble import disagreement, evaluate_ensemble, minimum_bayes_risk


def test_minimum_bayes_risk_picks_the_consensus():
    assert minimum_bayes_risk(["the cat sat", "the cat sat", "a dog ran"]) == 0
    assert minimum_bayes_risk(["a b c", "a b d", "a x d"]) == 1  # distances 3, 2, 3
    assert minimum_bayes_risk(["x", "y"]) == 0  # ties go to the earlier member
    assert minimum_bayes_risk(["A b!", "a c", "a c"], weights=[5, 1, 1]) == 0  # normalised; weights count
    assert minimum_bayes_risk(["a b", "a c", "a c"]) == 1


def test_disagreement_counts_differences_among_errors():
    references = ["one", "two", "three", "four"]
    first = ["one", "too", "tree", "for"]
    second = ["one", "two", "tree", "far"]
    result = disagreement(references, first, second)
    assert result["hypotheses_differ"] == pytest.approx(2 / 4)
    assert result["errors_differ"] == pytest.approx(2 / 3)  # utterances 2-4 have an error; 2 and 4 differ


class FixedRecognizer:
    """Answers the reference except on the utterances it is told to get wrong (known by their audio)."""

    sampling_rate = 16_000

    def __init__(self, records, wrong):
        self.answers = {load_audio(record.path, self.sampling_rate).tobytes():
                        ("zzz " + record.transcription) if index in wrong else record.transcription
                        for index, record in enumerate(records)}

    def transcribe(self, batch):
        return [self.answers[audio.tobytes()] for audio in batch]


def test_ensemble_beats_members_that_err_differently(speech, tmp_path, monkeypatch):
    records = read_metadata(speech)
    references = [r.transcription for r in records]
    wrong = {"a": {0, 1}, "b": {2, 3}, "c": {1, 4}}  # only utterance 1 is wrong in two members
    monkeypatch.setattr(ensemble, "load_recognizer",
                        lambda model_dir, audio_ctx=None, no_repeat_ngram_size=0: FixedRecognizer(records, wrong[str(model_dir)]))
    result = evaluate_ensemble(["a", "b", "c"], speech, batch_size=3, out_jsonl=tmp_path / "h.jsonl", progress=False)
    assert all(member["wer"] > 0 for member in result["members"])
    # utterance 1 is wrong in a and c alike ("zzz " + text): the majority error wins there, nowhere else
    rows = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [row["hypothesis"] for row in rows] == [("zzz " + t) if i == 1 else t for i, t in enumerate(references)]
    for name, errs in wrong.items():  # every member's own transcript of every utterance is kept beside the choice
        assert [row["members"][name] for row in rows] == [("zzz " + t) if i in errs else t
                                                           for i, t in enumerate(references)]
    assert result["wer"] < min(member["wer"] for member in result["members"])
    pair_ab = next(p for p in result["disagreement"] if (p["a"], p["b"]) == ("a", "b"))
    assert pair_ab["errors_differ"] == 1.0 and pair_ab["hypotheses_differ"] == pytest.approx(4 / len(references))
    pair_ac = next(p for p in result["disagreement"] if (p["a"], p["b"]) == ("a", "c"))
    assert pair_ac["errors_differ"] == pytest.approx(2 / 3)


def test_ensemble_needs_two_members(speech):
    with pytest.raises(KdforgeError, match="at least two"):
        evaluate_ensemble(["only"], speech)


def test_cli_decodes_an_ensemble_and_ends_with_its_json(tiny_whisper, speech):
    import typer
    from typer.testing import CliRunner

    from kdforge.cli.evaluate import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(app, ["--model", str(tiny_whisper), "--model", str(tiny_whisper), "--data", str(speech)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert [m["wer"] for m in summary["members"]] == [summary["wer"]] * 2  # identical members: same answers
    assert summary["disagreement"][0]["hypotheses_differ"] == 0.0 and summary["n"] == len(read_metadata(speech))


def test_teacher_benchmark_rows_agree_with_single_evaluations(tiny_whisper, speech, tmp_path):
    from kdforge.benchmarks import asr_teachers
    from kdforge.evaluation.runner import evaluate
    from kdforge.models.ctc import build_ctc_model

    ctc = build_ctc_model(tmp_path / "ctc", size="tiny")
    report = asr_teachers.run({"w": [tiny_whisper, tiny_whisper], "c": [ctc, ctc]}, {"w0": tiny_whisper}, speech,
                              tmp_path / "out")
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["zeroshot:w0", "teacher:w", "teacher:c", "ensemble"]
    alone = evaluate(ctc, speech, progress=False)
    assert rows["teacher:c"]["wer"]["values"] == [alone["wer"], alone["wer"]] and rows["teacher:c"]["wer"]["std"] == 0
    assert [(p["a"], p["b"]) for p in report["disagreement"]] == [("w", "c")]
    assert report["ensemble_beats_best_member"] == (rows["ensemble"]["wer"]["mean"] < min(
        rows["teacher:w"]["wer"]["mean"], rows["teacher:c"]["wer"]["mean"]))
    assert "| ensemble | 2 |" in (tmp_path / "out" / "teachers.md").read_text()


def test_cached_teachers_average_like_dense_ones():
    """The sparse mean over the union of top-k ids is the dense mean where k = V, sums to 1 with its
    tail at any k, and merges an id both teachers keep into one category."""
    import torch

    from kdforge.losses import TopKTeacher, forward_kl
    from kdforge.teachers.ensemble import ensemble_logprobs, ensemble_top_k

    torch.manual_seed(0)
    first, second = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    weights = [3.0, 1.0]
    dense = ensemble_logprobs([first, second], weights)
    full = ensemble_top_k([TopKTeacher.from_logits(first, 11), TopKTeacher.from_logits(second, 11)], weights)
    assert torch.allclose(full.logprobs[..., :11], dense.gather(-1, full.indices[..., :11]), atol=1e-5)
    assert full.indices.shape[-1] == 11  # the union of two full vocabularies is the vocabulary
    student = torch.randn(3, 5, 11)
    assert torch.allclose(forward_kl(student, full), forward_kl(student, dense), atol=1e-5)

    small = ensemble_top_k([TopKTeacher.from_logits(first, 3), TopKTeacher.from_logits(second, 3)], weights)
    total = small.logprobs.exp().sum(-1) + small.tail_logprob.exp()
    assert torch.allclose(total, torch.ones(3, 5), atol=1e-5)
    rows = small.indices.reshape(-1, small.indices.shape[-1])
    assert all(len(set(row.tolist())) == len(row) for row in rows)  # distinct ids at every position
    shared = (first.topk(3).indices[..., :1] == second.topk(3).indices).any(-1)  # both keep first's best id
    best = first.topk(3).indices[..., 0]
    mean_best = dense.gather(-1, best[..., None])[..., 0]
    found = small.logprobs.gather(-1, (small.indices == best[..., None]).long().argmax(-1, keepdim=True))[..., 0]
    assert torch.allclose(found[shared], mean_best[shared], atol=1e-5)
    assert shared.any()


def test_weights_by_wer_favour_the_better_teacher_more_as_the_temperature_falls():
    from kdforge.teachers.ensemble import weights_by_wer

    assert weights_by_wer([0.3, 0.3, 0.3], 0.1) == pytest.approx([1 / 3] * 3)
    weights = weights_by_wer([0.28, 0.37, 1.0], 0.1)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(math.exp(0.9))  # exp(-(0.28 - 0.37) / 0.1)
    assert weights_by_wer([0.28, 0.37, 1.0], 0.01)[0] > weights[0] > weights_by_wer([0.28, 0.37, 1.0], 1.0)[0]
    with pytest.raises(ValueError, match="temperature"):
        weights_by_wer([0.3], 0.0)
