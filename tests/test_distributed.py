"""Data parallelism: torchrun's processes train the very weights one process trains on the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdforge.config import load_config
from kdforge.training.loop import train

TINY_LM = Path(__file__).parents[1] / "configs" / "tiny-lm.yaml"
SHORT = ["training.steps=4", "training.checkpoint_every=100", "data.eval=null", "training.device=cpu"]  # gloo, as on any machine


def test_two_processes_with_accumulation_reach_the_weights_of_one(tmp_path):
    train(load_config(TINY_LM, SHORT), tmp_path / "one", show_progress=False)
    # each of the 2 processes takes 4 of the 8 sequences, as 2 micro-batches of 2
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kdforge", "train",
               str(TINY_LM), "--out", str(tmp_path / "two"), *[f"--set={o}" for o in SHORT],
               "--set=training.grad_accum=2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["processes"] == 2  # one result line, from rank 0

    one = load_file(tmp_path / "one" / "student" / "model.safetensors")
    two = load_file(tmp_path / "two" / "student" / "model.safetensors")
    initial = load_file(load_config(TINY_LM).student.path / "model.safetensors")
    # AdamW divides each gradient by its running size, so where a gradient is near its eps (rows of
    # tokens the batch barely touches) float noise between the two summation orders becomes a visible
    # part of a step: allow 1% of one step (lr 3e-3) per weight, far below what one wrong shard moves.
    for name, weight in one.items():
        torch.testing.assert_close(two[name], weight, rtol=1e-4, atol=3e-5)
    assert max((one[n] - initial[n]).abs().max() for n in one) > 1e-3  # training moved the weights
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run_name / "history.jsonl").read_text().splitlines()]
              for run_name in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, monkeypatch):
    from kdforge.errors import KdforgeError
    from kdforge.training import distributed

    monkeypatch.setattr(distributed, "join", lambda device: distributed.World(rank=0, size=3))
    with pytest.raises(KdforgeError, match="batch_size 8 does not split into 3 processes x 1 micro-batches"):
        train(load_config(TINY_LM, SHORT), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
