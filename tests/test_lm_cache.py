"""The causal-LM teacher cache: what it stores, losses and metrics equal to running the teachers, staleness."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdforge.cli import app
from kdforge.config import parse_config
from kdforge.errors import KdforgeError
from kdforge.losses import TopKTeacher
from kdforge.tasks.lm import LMTask, load_causal_lm, next_token_logits
from kdforge.training.loop import train


def raw_config(tiny_lm, cache_dir=None, top_k=300, **objective):
    raw = {
        "task": "lm",
        "teachers": [{"path": str(tiny_lm["teacher"])}],
        "student": {"init_from": str(tiny_lm["teacher"]), "layers": [0, 3]},
        "data": {"train": str(tiny_lm["data"]), "eval": str(tiny_lm["data"]), "max_length": 64},
        "objective": {"name": "kl", "ce_weight": 0.5, "rlkd": {"k": 4}, **objective},
        "training": {"steps": 3, "batch_size": 4, "lr": 3e-3, "eval_every": 3, "checkpoint_every": 3},
        "cache": {"top_k": top_k, "batch_size": 16},
    }
    if cache_dir is not None:
        raw["cache"]["dir"] = str(cache_dir)
    return raw


def test_the_cache_holds_each_teachers_top_k_of_every_position(tiny_lm, tmp_path):
    task = LMTask(parse_config(raw_config(tiny_lm, tmp_path / "cache", top_k=6)), tmp_path / "run")
    assert task.teachers == []  # a cached run loads no teacher weights
    teacher, _ = load_causal_lm(tiny_lm["teacher"])
    batch = task.batch([5, 2])
    online = TopKTeacher.from_logits(next_token_logits(teacher, batch), 6)
    cached = batch["teacher_topk"]
    for row, index in enumerate([5, 2]):
        n = len(task.train_examples[index].ids) - 1  # positions that predict a token of the example
        assert torch.equal(cached.indices[row, :n], online.indices[row, :n])
        torch.testing.assert_close(cached.logprobs[row, :n], online.logprobs[row, :n], rtol=0, atol=1e-5)
        torch.testing.assert_close(cached.tail_logprob[row, :n], online.tail_logprob[row, :n], rtol=0, atol=1e-5)
    shard = load_file(next((tmp_path / "cache" / "teacher").glob("shard-*.safetensors")))
    assert shard["train-000002/topk_ids"].shape == (len(task.train_examples[2].ids) - 1, 6)
    assert any(name.startswith("eval-") for name in shard)


@pytest.mark.parametrize("objective", [{"name": "kl"}, {"name": "tvd"}, {"name": "none", "ce_weight": 1.0}])
def test_with_the_whole_vocabulary_cached_losses_and_metrics_equal_running_the_teacher(tiny_lm, tmp_path, objective):
    online = LMTask(parse_config(raw_config(tiny_lm, **objective)), tmp_path / "online")
    cached = LMTask(parse_config(raw_config(tiny_lm, tmp_path / "cache", top_k=300, **objective)), tmp_path / "cached")
    cached.student.load_state_dict(online.student.state_dict())
    indices = [0, 7, 3, 11]
    loss_online, terms_online = online.loss(online.batch(indices))
    loss_cached, terms_cached = cached.loss(cached.batch(indices))
    assert set(terms_cached) == set(terms_online) >= {"rank"}
    torch.testing.assert_close(loss_cached, loss_online, rtol=1e-4, atol=1e-5)
    metrics_online, metrics_cached = online.evaluate(), cached.evaluate()
    assert set(metrics_cached) == set(metrics_online) >= {"ppl", "cr@5", "mor@20"}
    for key, value in metrics_online.items():
        assert metrics_cached[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_cache_of_other_data_or_settings_is_refused(tiny_lm, tmp_path):
    LMTask(parse_config(raw_config(tiny_lm, tmp_path / "cache", top_k=8)), tmp_path / "first")
    with pytest.raises(KdforgeError, match=r"built on other data .* rebuild it"):
        LMTask(parse_config(raw_config(tiny_lm, tmp_path / "cache", top_k=8) | {
            "data": {"train": str(tiny_lm["data"]), "max_length": 48}}), tmp_path / "second")
    with pytest.raises(KdforgeError, match=r"other settings \(top_k differ\)"):
        LMTask(parse_config(raw_config(tiny_lm, tmp_path / "cache", top_k=16)), tmp_path / "third")


def test_cli_caches_lm_teachers_and_training_reads_them_without_running_a_teacher(tiny_lm, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdforge.student.init import init_student

    init_student(tiny_lm["teacher"], tmp_path / "student", [0, 3])  # built first: it reads the teacher's weights
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw_config(tiny_lm, tmp_path / "cache", top_k=8) | {
        "student": {"path": str(tmp_path / "student")}}))
    runner = CliRunner()
    built = runner.invoke(app, ["cache", str(config), "--out", str(tmp_path / "cache")])
    assert built.exit_code == 0, built.output
    assert set(json.loads(built.stdout)["teacher_seconds"]) == {"teacher"}
    assert "shards match" in runner.invoke(app, ["cache", "verify", str(tmp_path / "cache")]).output

    import transformers

    loaded = []
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, *a, **k: loaded.append(str(path)) or original(path, *a, **k))
    result = train(parse_config(yaml.safe_load(config.read_text())), tmp_path / "run", show_progress=False)
    assert loaded == [str(tmp_path / "student")]
    assert {"ppl", "cr@5", "mor@5"} <= set(result["eval"])
    assert "mor@10" not in result["eval"]  # 8 cached ids cannot tell the teacher's top 10


def test_a_cached_weighted_ensemble_equals_running_both_teachers(tiny_lm, tmp_path):
    from kdforge.models.tiny import build_tiny_lm

    second = build_tiny_lm(tmp_path / "second", "student", tiny_lm["tokenizer"], seed=5)
    ensemble = [{"path": str(tiny_lm["teacher"]), "weight": 3.0}, {"path": str(second), "weight": 1.0}]
    online = LMTask(parse_config(raw_config(tiny_lm) | {"teachers": ensemble}), tmp_path / "online")
    cached = LMTask(parse_config(raw_config(tiny_lm, tmp_path / "cache") | {"teachers": ensemble}), tmp_path / "cached")
    cached.student.load_state_dict(online.student.state_dict())
    torch.testing.assert_close(cached.loss(cached.batch([1, 4]))[0], online.loss(online.batch([1, 4]))[0],
                               rtol=1e-4, atol=1e-5)
