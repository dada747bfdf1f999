"""Exact resume after a real ``kill -9``: the resumed run ends with the uninterrupted run's weights, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY_LM = Path(__file__).parents[1] / "configs" / "tiny-lm.yaml"
# adapters with dropout: the resumed run must also restore the random stream exactly
SETTINGS = ["training.steps=10", "training.checkpoint_every=2", "data.eval=null",
            "student.lora={r: 4, alpha: 8, dropout: 0.3}"]


def kdforge_train(out: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "kdforge", "train", str(TINY_LM), "--out", str(out),
               *[f"--set={s}" for s in SETTINGS], *options]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_mid_training_resumes_to_the_same_weights(tmp_path):
    straight = kdforge_train(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    killed = kdforge_train(tmp_path / "killed")
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-0000004").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)  # somewhere in step 5 or 6: mid-step, mid-log or mid-checkpoint
    killed.wait()
    assert not (tmp_path / "killed" / "result.json").exists()

    resumed = kdforge_train(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    expected = load_file(tmp_path / "straight" / "student" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "student" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_a_run_resumes_on_another_device_setting_but_not_with_another_config(tmp_path):
    from kdforge.config import load_config
    from kdforge.errors import KdforgeError
    from kdforge.training.checkpoint import claim_run_folder

    config = load_config(TINY_LM, ["training.device=auto"])
    assert claim_run_folder(tmp_path / "run", config, resume=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for setting in ("device", "keep_checkpoints", "term_grad_norms_every"):
        del saved["training"][setting]  # as runs started before a setting existed saved them: it has its default
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert not claim_run_folder(tmp_path / "run", load_config(TINY_LM, ["training.device=cpu"]), resume=True)
    logging = load_config(TINY_LM, ["training.term_grad_norms_every=5"])  # what a run logs is not what it trains
    assert not claim_run_folder(tmp_path / "run", logging, resume=True)
    with pytest.raises(KdforgeError, match="was started with another config"):
        claim_run_folder(tmp_path / "run", load_config(TINY_LM, ["training.lr=0.5"]), resume=True)
