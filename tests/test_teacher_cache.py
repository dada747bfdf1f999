"""The offline teacher cache: round trip, staleness, corruption, and losses equal to online ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from kdforge.errors import KdforgeError
from kdforge.losses import TopKTeacher, forward_kl, rlkd_ranking_loss
from kdforge.teachers.cache import (TeacherCache, TeacherShards, data_fingerprint, model_identity, verify_cache,
                                    write_manifest)

SETTINGS = {"layers": [0, 2], "top_k": 8}


@pytest.fixture
def world(tmp_path):
    """Two fake teacher folders, a fake audiofolder, and per-utterance signals of each teacher."""
    teachers = {}
    for name in ("base", "ctc"):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w": torch.randn(3, 3)}, folder / "model.safetensors")
        teachers[name] = folder
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.csv").write_text("file_name,transcription\n" + "".join(f"u{i}.wav,text {i}\n" for i in range(5)))
    for i in range(5):
        (data / f"u{i}.wav").write_bytes(b"RIFF" + bytes(i))
    generator = torch.Generator().manual_seed(0)
    signals = {name: {f"u{i}": {"hidden": torch.randn(7, 4, generator=generator).half(),
                                "logits": torch.randn(7, 50, generator=generator)} for i in range(5)}
               for name in teachers}
    return tmp_path, teachers, data, signals


def build(root, teachers, data, signals, shard_size=2):
    written = {}
    for name, folder in teachers.items():
        shards = TeacherShards(root, name, shard_size=shard_size)
        for utterance, tensors in signals[name].items():
            sparse = TopKTeacher.from_logits(tensors["logits"], 8)
            shards.add(utterance, {"hidden": tensors["hidden"], "logits": tensors["logits"], "topk_ids": sparse.indices,
                                   "topk_logprobs": sparse.logprobs, "tail_logprob": sparse.tail_logprob})
        written[name] = (model_identity(folder), SETTINGS, shards)
    write_manifest(root, data_fingerprint(data), written)


def expected(teachers):
    return {name: (folder, SETTINGS) for name, folder in teachers.items()}


def test_round_trip_and_losses_equal_online(world):
    tmp_path, teachers, data, signals = world
    build(tmp_path / "cache", teachers, data, signals)
    assert verify_cache(tmp_path / "cache") == 6  # 5 utterances in shards of 2, for 2 teachers
    cache = TeacherCache(tmp_path / "cache", expected(teachers), data_fingerprint(data))
    student = torch.randn(7, 50)
    for name in teachers:
        for utterance, tensors in signals[name].items():
            cached = cache.signals(name, utterance)
            assert cached["hidden"].dtype == torch.float16 and torch.equal(cached["hidden"], tensors["hidden"])
            assert forward_kl(student, cached["logits"]).item() == forward_kl(student, tensors["logits"]).item()
            sparse = TopKTeacher(cached["topk_ids"], cached["topk_logprobs"], cached["tail_logprob"])
            online = TopKTeacher.from_logits(tensors["logits"], 8)
            assert forward_kl(student, sparse).item() == forward_kl(student, online).item()
            assert rlkd_ranking_loss(student, sparse).item() == rlkd_ranking_loss(student, online).item()


def test_stale_caches_are_refused_naming_what_differs(world):
    tmp_path, teachers, data, signals = world
    build(tmp_path / "cache", teachers, data, signals)
    with pytest.raises(KdforgeError, match="built on other data"):
        TeacherCache(tmp_path / "cache", expected(teachers), "0" * 16)
    with pytest.raises(KdforgeError, match=r"other settings \(top_k differ\)"):
        TeacherCache(tmp_path / "cache", {"base": (teachers["base"], {**SETTINGS, "top_k": 16})}, data_fingerprint(data))
    TeacherCache(tmp_path / "cache", {"base": (teachers["base"], {**SETTINGS, "layers": [2]})}, data_fingerprint(data))
    with pytest.raises(KdforgeError, match=r"other settings \(layers \(1 not cached\) differ\)"):
        TeacherCache(tmp_path / "cache", {"base": (teachers["base"], {**SETTINGS, "layers": [1, 2]})},
                     data_fingerprint(data))
    with pytest.raises(KdforgeError, match="has no teacher 'whisper-small'"):
        TeacherCache(tmp_path / "cache", {"whisper-small": (teachers["base"], SETTINGS)}, data_fingerprint(data))
    save_file({"w": torch.zeros(3, 3)}, teachers["ctc"] / "model.safetensors")  # the teacher was retrained
    with pytest.raises(KdforgeError, match="holds another model for 'ctc'"):
        TeacherCache(tmp_path / "cache", expected(teachers), data_fingerprint(data))
    (data / "u0.wav").write_bytes(b"RIFF changed")
    assert data_fingerprint(data) != json.loads((tmp_path / "cache" / "manifest.json").read_text())["data"]


def test_corrupted_or_missing_shards_are_named(world):
    tmp_path, teachers, data, signals = world
    build(tmp_path / "cache", teachers, data, signals)
    shard = tmp_path / "cache" / "ctc" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(KdforgeError, match="shard ctc/shard-00001.safetensors is corrupted"):
        verify_cache(tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache", expected(teachers), data_fingerprint(data))
    assert cache.signals("ctc", "u0")["logits"].shape == (7, 50)  # other shards still read
    with pytest.raises(KdforgeError, match="shard ctc/shard-00001.safetensors is missing or corrupted"):
        cache.signals("ctc", "u2")
    shutil.rmtree(tmp_path / "cache" / "base")
    with pytest.raises(KdforgeError, match="shard base/shard-00000.safetensors is missing"):
        verify_cache(tmp_path / "cache")
    with pytest.raises(KdforgeError, match="not a teacher cache"):
        verify_cache(tmp_path)


def test_built_cache_holds_what_the_teachers_compute_online(tiny_whisper, speech, tmp_path):
    from kdforge.data.audio import load_audio, read_metadata
    from kdforge.evaluation.recognizers import load_recognizer
    from kdforge.models.ctc import build_ctc_model, stacked_log_mel
    from kdforge.models.loading import load_whisper
    from kdforge.teachers.build import build_cache

    ctc = build_ctc_model(tmp_path / "ctc", size="tiny")
    teachers = {"whisper": tiny_whisper, "ctc": ctc}
    layers = {"whisper": [0, 1], "ctc": [1]}
    build_cache(teachers, speech, tmp_path / "one", layers, top_k=4, batch_size=3, workers=1)
    assert verify_cache(tmp_path / "one") == 3  # 7 utterances fit one shard per teacher, and the ensemble's
    settings = {name: (path, {"layers": layers[name], "top_k": 4, "audio_ctx": None, "labelled": None})
                for name, path in teachers.items()}
    cache = TeacherCache(tmp_path / "one", settings, data_fingerprint(speech))

    record = read_metadata(speech)[2]
    audio = load_audio(record.path)
    model, processor = load_whisper(tiny_whisper)
    features = processor.feature_extractor([audio], sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        encoded = model.model.encoder(features, output_hidden_states=True)
    cached = cache.signals("whisper", record.id)
    frames = cached["hidden.1"].shape[0]
    assert frames == -(-len(audio) // 320)  # 20 ms encoder frames of this utterance only
    torch.testing.assert_close(cached["hidden.1"], encoded.hidden_states[1][0, :frames].half())
    ids = processor.tokenizer(" " + record.transcription).input_ids
    assert cached["label_ids"].tolist() == ids[2:]  # the text and end token after the 2-token prompt
    with torch.no_grad():
        logits = model(encoder_outputs=(encoded.last_hidden_state,), decoder_input_ids=torch.tensor([ids[:-1]])).logits[0, 1:]
    student = torch.randn_like(logits)
    online = TopKTeacher.from_logits(logits, 4)
    stored = TopKTeacher(cached["topk_ids"], cached["topk_logprobs"], cached["tail_logprob"])
    assert forward_kl(student, stored).item() == pytest.approx(forward_kl(student, online).item(), rel=1e-6)
    transcript = load_recognizer(tiny_whisper).transcribe([audio])[0]
    assert bytes(cached["pseudo_label"].tolist()).decode() == transcript

    ctc_cached = cache.signals("ctc", record.id)
    features, mask = stacked_log_mel(processor.feature_extractor, [audio], 4)
    assert ctc_cached["hidden.1"].shape[0] == ctc_cached["topk_ids"].shape[0] == int(mask.sum())

    build_cache(teachers, speech, tmp_path / "two", layers, top_k=4, batch_size=3, workers=2)
    parallel = TeacherCache(tmp_path / "two", settings, data_fingerprint(speech))
    for name in teachers:
        for utterance in read_metadata(speech):
            a, b = cache.signals(name, utterance.id), parallel.signals(name, utterance.id)
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_cli_builds_from_a_config_and_verify_names_a_bad_shard(tiny_whisper, speech, tmp_path):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": "asr", "teachers": [{"path": str(tiny_whisper), "name": "tiny", "layers": [1]}],
        "student": {"path": str(tiny_whisper)}, "data": {"train": str(speech)},
        "objective": {"name": "kl"}, "cache": {"top_k": 3}}))
    run = [sys.executable, "-m", "kdforge", "cache"]
    done = subprocess.run([*run, str(config), "--out", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout.strip().splitlines()[-1])["teacher_seconds"]) == {"tiny"}
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["teachers"]["tiny"]["settings"] == {"layers": [1], "decoder_layers": [], "top_k": 3, "audio_ctx": None,
                                                     "labelled": None, "map": None}  # no mapping: no mapped states
    done = subprocess.run([*run, "verify", str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "2 shards match" in done.stdout  # the teacher's and the targets'
    shard = tmp_path / "cache" / "tiny" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes() + b"x")
    done = subprocess.run([*run, "verify", str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "kdforge: error: shard tiny/shard-00000.safetensors is corrupted (checksum differs from the manifest)"


def test_audio_ctx_cuts_whisper_teachers_window(tiny_whisper, speech, tmp_path):
    from kdforge.data.audio import load_audio, read_metadata
    from kdforge.teachers.build import build_cache

    build_cache({"w": tiny_whisper}, speech, tmp_path / "cache", {"w": [1]}, top_k=2, audio_ctx=25)
    cache = TeacherCache(tmp_path / "cache", {"w": (tiny_whisper, {"layers": [1], "top_k": 2, "audio_ctx": 25,
                                                                   "labelled": None})},
                         data_fingerprint(speech))
    lengths = {r.id: len(load_audio(r.path)) for r in read_metadata(speech)}
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] > 16_000 // 2  # longer than the 0.5 s window
    assert cache.signals("w", longest)["hidden.1"].shape[0] == 25


def test_the_ensemble_transcript_is_the_consensus_of_the_teachers():
    from kdforge.teachers.build import ensemble_transcripts

    said = {"a": ["the cat", "a dog", "one"], "b": ["the cat", "a fog", "two"], "c": ["the hat", "a fog", "three"]}
    assert ensemble_transcripts(said) == ["the cat", "a fog", "one"]  # majority, majority, a three-way tie to the first


def test_unlabelled_utterances_are_teacher_forced_on_the_ensemble_transcript(tiny_whisper, speech, tmp_path):
    from kdforge.data.audio import labelled_ids, read_metadata
    from kdforge.models.loading import load_whisper
    from kdforge.teachers.build import build_cache
    from kdforge.teachers.cache import ENSEMBLE

    build_cache({"w": tiny_whisper}, speech, tmp_path / "cache", {"w": [1]}, top_k=2, labelled=3)
    settings = {"layers": [1], "top_k": 2, "audio_ctx": None, "labelled": 3}
    cache = TeacherCache(tmp_path / "cache", {"w": (tiny_whisper, settings)}, data_fingerprint(speech))
    records = read_metadata(speech)
    labelled = labelled_ids(records, 3)
    tokenizer = load_whisper(tiny_whisper)[1].tokenizer
    for record in records:
        text = lambda signal, teacher=ENSEMBLE: bytes(cache.signals(teacher, record.id)[signal].tolist()).decode()
        assert text("pseudo_label") == text("pseudo_label", "w")  # one teacher: its transcript is the ensemble's
        assert text("target") == (record.transcription if record.id in labelled else text("pseudo_label"))
        assert cache.signals("w", record.id)["label_ids"].tolist() == tokenizer(" " + text("target")).input_ids[2:]
    with pytest.raises(KdforgeError, match="labelled differ"):
        TeacherCache(tmp_path / "cache", {"w": (tiny_whisper, {**settings, "labelled": 4})}, data_fingerprint(speech))
