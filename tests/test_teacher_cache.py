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
