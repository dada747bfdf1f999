"""Text normalisation, WER/CER, and `kdforge eval` on a tiny random Whisper."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import save_file
import typer
from typer.testing import CliRunner

from kdforge.cli.evaluate import eval_command
from kdforge.data.audio import read_audiofolder
from kdforge.errors import KdforgeError
from kdforge.evaluation import error_rates, evaluate, load_recognizer, normalise_text
from kdforge.evaluation.normalise import cardinal_words, ordinal_words

# normalisation

@pytest.mark.parametrize(("text", "expected"), [
    ("Hello, World!", "hello world"),
    ("  Don\u2019t   STOP\u2014believing. ", "don't stop believing"),
    ("'Quoted' words and the brothers' coats", "quoted words and the brothers coats"),
    ("Seventy-seven times", "seventy seven times"),
    ("He paid 1,000 coins for 144 cubits", "he paid one thousand coins for one hundred forty four cubits"),
    ("The 21st day, 3.5% & more", "the twenty first day three point five percent and more"),
    ("Caf\u00e9 na\u00efve", "cafe naive"),
])
def test_normalise_text(text, expected):
    assert normalise_text(text) == expected


def test_number_words():
    assert cardinal_words(0) == "zero"
    assert cardinal_words(1_000_019) == "one million nineteen"
    assert cardinal_words(90_500) == "ninety thousand five hundred"
    assert [ordinal_words(n) for n in (1, 2, 3, 12, 20, 40, 101)] == [
        "first", "second", "third", "twelfth", "twentieth", "fortieth", "one hundred first"]


# scoring

def test_error_rates_against_hand_counts():
    references = ["the cat sat on the mat", "hello world"]
    hypotheses = ["The cat sat on mat.", "Hello there, world!"]
    rates = error_rates(references, hypotheses)
    # words: one deletion ("the") + one insertion ("there") over 6 + 2 reference words
    assert rates.wer == pytest.approx(2 / 8)
    # characters: "the " deleted (4) + "there " inserted (6) over 22 + 11 reference characters
    assert rates.cer == pytest.approx(10 / 33)
    assert (rates.reference_words, rates.reference_characters) == (8, 33)
    assert error_rates(["one thousand years"], ["1,000 years"]).wer == 0.0


def test_error_rates_refuse_empty_references_and_length_mismatch():
    with pytest.raises(KdforgeError, match="utt7 is empty"):
        error_rates(["fine words", "!!"], ["a", "b"], ids=["utt3", "utt7"])
    with pytest.raises(KdforgeError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"])


# a tiny random Whisper (tests/conftest.py: `tiny_whisper`, 2 s window) on seven eSpeak utterances (`speech`)

def hypotheses(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batching_gives_the_same_transcripts_as_one_at_a_time(tiny_whisper, speech, tmp_path):
    one = evaluate(tiny_whisper, speech, batch_size=1, out_jsonl=tmp_path / "b1.jsonl", progress=False)
    four = evaluate(tiny_whisper, speech, batch_size=4, out_jsonl=tmp_path / "b4.jsonl", progress=False)
    rows_one, rows_four = hypotheses(tmp_path / "b1.jsonl"), hypotheses(tmp_path / "b4.jsonl")
    assert [r["hypothesis"] for r in rows_one] == [r["hypothesis"] for r in rows_four]
    assert len(rows_one) == one["n"] == four["n"] == 7
    assert one["wer"] == four["wer"] and one["cer"] == four["cer"]
    # the reported rates are those of the kept hypotheses
    rescored = error_rates([r["reference"] for r in rows_one], [r["hypothesis"] for r in rows_one])
    assert (one["wer"], one["cer"]) == (rescored.wer, rescored.cer)
    assert all(r["reference_normalised"] == normalise_text(r["reference"]) for r in rows_one)


def test_batches_hold_utterances_of_similar_length_and_hypotheses_keep_the_records_order(speech):
    from kdforge.data.audio import read_metadata
    from kdforge.evaluation.runner import transcribe_all

    class LengthReporter:
        sampling_rate = 16_000

        def __init__(self):
            self.batches: list[list[int]] = []

        def transcribe(self, batch):
            self.batches.append([len(audio) for audio in batch])
            return [str(len(audio)) for audio in batch]

    records = read_metadata(speech)
    recognizer = LengthReporter()
    hypotheses, _, _ = transcribe_all(recognizer, records, batch_size=3, progress=False)
    lengths = [len(item.audio) for item in read_audiofolder(speech)]
    assert hypotheses == [str(n) for n in lengths]
    assert sum(recognizer.batches, []) == sorted(lengths, reverse=True)  # longest first, every one once
    assert len(set(lengths)) > 3  # the check above would hold for any order otherwise


def test_audio_ctx_shrinks_the_window_and_the_token_budget(tiny_whisper, speech):
    full = load_recognizer(tiny_whisper)
    short = load_recognizer(tiny_whisper, audio_ctx=25)
    assert short.window_seconds == 0.5 and full.window_seconds > 1.5
    assert short.model.get_encoder().embed_positions.num_embeddings == 25
    # 8 tokens per second of audio, as much as the window holds, plus 8
    assert [full.token_budget(n) for n in (4000, 8000, 10**7)] == [10, 12, math.ceil(8 * full.window_seconds) + 8]
    assert short.token_budget(16000) == 4 + 8


def test_each_utterance_is_cut_to_its_own_budget_whatever_the_batch(tiny_whisper, speech):
    recognizer = load_recognizer(tiny_whisper)
    audio = next(read_audiofolder(speech)).audio
    clips = [audio[:4000], audio[:24000], audio[:12000]]  # 0.25 s, 1.5 s, 0.75 s
    lengths = [len(ids) for ids in recognizer.token_ids(clips)]
    assert all(length <= 2 + recognizer.token_budget(len(clip)) for clip, length in zip(clips, lengths))
    assert len(set(lengths)) > 1  # the random model loops until its budget stops it
    assert recognizer.transcribe(clips) == [recognizer.transcribe([clip])[0] for clip in clips]


def test_the_loop_guard_never_repeats_an_ngram_where_plain_greedy_loops(tiny_whisper, speech):
    clips = [item.audio for item in read_audiofolder(speech)][:3]

    def repeats(ids: list[int]) -> bool:
        pairs = list(zip(ids, ids[1:]))
        return len(set(pairs)) < len(pairs)

    plain = load_recognizer(tiny_whisper).token_ids(clips)
    guarded = load_recognizer(tiny_whisper, no_repeat_ngram_size=2).token_ids(clips)
    assert any(repeats(ids) for ids in plain)  # the random model loops
    assert not any(repeats(ids) for ids in guarded)


def test_cli_prints_a_table_then_the_json_line(tiny_whisper, speech, tmp_path):
    app = typer.Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(app, ["--model", str(tiny_whisper), "--data", str(speech), "--batch-size", "3",
                                      "--out", str(tmp_path / "h.jsonl")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert any("WER" in line for line in lines[:-1])
    last = json.loads(lines[-1])
    assert list(last) == ["wer", "cer", "n", "utterances_per_s"]
    rows = hypotheses(tmp_path / "h.jsonl")
    rescored = error_rates([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    assert last["n"] == 7 and last["wer"] == pytest.approx(rescored.wer) and last["cer"] == pytest.approx(rescored.cer)
    assert last["utterances_per_s"] > 0


def test_eval_refuses_other_models_and_an_existing_out_file(tiny_whisper, speech, tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({}, tmp_path / "llm" / "model.safetensors")  # a valid header; the type is refused before any weight is read
    with pytest.raises(KdforgeError, match="'llama' model"):
        evaluate(tmp_path / "llm", speech)
    (tmp_path / "kept.jsonl").write_text("{}\n")
    with pytest.raises(KdforgeError, match="already exists"):
        evaluate(tiny_whisper, speech, out_jsonl=tmp_path / "kept.jsonl")
    assert (tmp_path / "kept.jsonl").read_text() == "{}\n"
