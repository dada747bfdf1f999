"""The sentence source and the eSpeak NG corpus generator."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import soundfile
import typer
from typer.testing import CliRunner

from kdforge.cli.data import synth_speech
from kdforge.data.sentences import MAX_WORDS, MIN_WORDS, builtin_sentences, clean_sentence, sentences_from_file
from kdforge.data import synth
from kdforge.data.synth import (METADATA_COLUMNS, SAMPLE_RATE, add_noise, measured_snr_db, split_by_rank,
                                synthesize_corpus)
from kdforge.errors import KdforgeError

N, SEED = 10, 7


def rows(split_dir):
    with open(split_dir / "metadata.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def corpus_bytes(root):
    """Every file of a corpus but corpus.json (which holds timings), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "corpus.json"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same seed three times: clean with 2 workers, clean with 1 worker, noisy (15 dB); 4
    utterances per synthesis process, so each corpus takes three processes."""
    root = tmp_path_factory.mktemp("synth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synth, "UTTERANCES_PER_PROCESS", 4)
        synthesize_corpus(root / "clean", N, SEED, workers=2)
        synthesize_corpus(root / "clean_again", N, SEED, workers=1)
        synthesize_corpus(root / "noisy", N, SEED, noise_snr=15.0, workers=2)
    return root


# sentences

def test_builtin_sentences_are_many_distinct_and_normalised():
    sentences = builtin_sentences()
    assert len(sentences) >= 1000
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert re.fullmatch(r"[a-z']+( [a-z']+)*", sentence), sentence
        assert MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def test_clean_sentence_normalises_and_rejects_digits_and_lengths():
    assert clean_sentence("He said, \u201cDon`t go to the well-house!\u201d") == "he said don't go to the well house"
    assert clean_sentence("He had 12 sons and many daughters.") is None
    assert clean_sentence("Too short here.") is None
    assert clean_sentence(" ".join(["word"] * (MAX_WORDS + 1))) is None
    assert clean_sentence("The café was open all night long.") is None  # no reliable spoken form kept


def test_sentences_from_file_filters_and_deduplicates(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("The quick brown fox jumps.\nthe quick brown fox jumps\nIn 1999 it rained.\n"
                    "A second usable sentence here.\n", encoding="utf-8")
    assert sentences_from_file(path) == ["the quick brown fox jumps", "a second usable sentence here"]
    path.write_text("Only one good sentence here.\n42 is a number we like.\n", encoding="utf-8")
    with pytest.raises(KdforgeError, match="usable sentences"):
        sentences_from_file(path)


# split rule

def test_split_by_rank_is_disjoint_complete_and_independent_of_order():
    names = [f"speaker{i}" for i in range(20)]
    train, test = split_by_rank(names, 0.25)
    assert len(test) == 5 and not set(train) & set(test) and set(train) | set(test) == set(names)
    assert split_by_rank(list(reversed(names)), 0.25) == (train, test)


def test_speakers_and_sentences_of_test_never_occur_in_train(corpora):
    summary = json.loads((corpora / "clean" / "corpus.json").read_text())
    train_speakers, test_speakers = set(summary["speakers"]["train"]), set(summary["speakers"]["test"])
    assert test_speakers and not train_speakers & test_speakers
    train_rows, test_rows = rows(corpora / "clean" / "train"), rows(corpora / "clean" / "test")
    assert {r["speaker"] for r in test_rows} <= test_speakers
    assert {r["speaker"] for r in train_rows} <= train_speakers
    assert not {r["transcription"] for r in train_rows} & {r["transcription"] for r in test_rows}
    assert (len(train_rows), len(test_rows)) == (N - round(N * 0.2), round(N * 0.2))


# determinism and layout

def test_same_seed_gives_identical_files_whatever_the_worker_count(corpora):
    first, second = corpus_bytes(corpora / "clean"), corpus_bytes(corpora / "clean_again")
    assert len(first) == N + 2  # N wavs and the two metadata.csv
    assert first == second


def test_another_seed_gives_another_corpus(corpora, tmp_path):
    synthesize_corpus(tmp_path / "other", N, SEED + 1, workers=1)
    assert rows(tmp_path / "other" / "train") != rows(corpora / "clean" / "train")


def test_files_are_16k_mono_pcm16_in_audiofolder_layout(corpora):
    for split in ("train", "test"):
        split_dir = corpora / "clean" / split
        with open(split_dir / "metadata.csv", encoding="utf-8") as handle:
            assert handle.readline().strip() == ",".join(METADATA_COLUMNS)
        for row in rows(split_dir):
            info = soundfile.info(split_dir / row["file_name"])
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
            assert 0.5 < info.duration < 9.0  # a 4-16 word sentence at 140-200 words/min
            assert 140 <= int(row["rate_wpm"]) <= 200 and 30 <= int(row["pitch"]) <= 70


# noise

def test_add_noise_reaches_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = np.sin(np.linspace(0, 2000, 160_000))
    for snr in (0.0, 10.0, 25.0):
        assert measured_snr_db(clean, add_noise(clean, snr, rng)) == pytest.approx(snr, abs=0.1)


def test_noisy_corpus_is_the_clean_one_plus_noise_at_the_snr(corpora):
    clean_rows, noisy_rows = rows(corpora / "clean" / "train"), rows(corpora / "noisy" / "train")
    assert [r["transcription"] for r in clean_rows] == [r["transcription"] for r in noisy_rows]
    for clean_row, noisy_row in zip(clean_rows, noisy_rows):
        clean, _ = soundfile.read(corpora / "clean" / "train" / clean_row["file_name"])
        noisy, _ = soundfile.read(corpora / "noisy" / "train" / noisy_row["file_name"])
        assert float(noisy_row["snr_db"]) == 15.0
        assert measured_snr_db(clean, noisy) == pytest.approx(15.0, abs=0.5)


# errors and the command line

def test_refuses_a_non_empty_out_folder_and_unknown_voices(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(KdforgeError, match="not an empty folder"):
        synthesize_corpus(tmp_path / "full", 2, 0)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(KdforgeError, match="unknown eSpeak voice 'en-gb'"):
        synthesize_corpus(tmp_path / "a", 2, 0, voices=["en-gb"])
    with pytest.raises(KdforgeError, match="unknown eSpeak variant 'zz9'"):
        synthesize_corpus(tmp_path / "b", 2, 0, variants=["zz9"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_parses_voices_variants_and_ranges(tmp_path):
    app = typer.Typer()
    app.command()(synth_speech)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["--out", str(out), "--n", "6", "--seed", "1", "--voices", "en-us,en-029",
                                      "--variants", "m1,f2", "--noise-snr", "10:20", "--speed", "150:160",
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "corpus.json").read_text())
    assert sorted(summary["speakers"]["train"] + summary["speakers"]["test"]) == [
        "en-029+f2", "en-029+m1", "en-us+f2", "en-us+m1"]
    assert summary["speed_wpm"] == [150, 160] and summary["noise_snr_db"] == [10.0, 20.0]
    for row in rows(out / "train") + rows(out / "test"):
        assert 150 <= int(row["rate_wpm"]) <= 160 and 10.0 <= float(row["snr_db"]) <= 20.0
