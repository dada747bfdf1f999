"""Exact resume after a real ``kill -9``: the resumed run ends with the uninterrupted run's weights, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
