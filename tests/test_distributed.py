"""Data parallelism: torchrun's processes train the very weights one process trains on the same global batch."""

import json
import shutil
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


@pytest.mark.parametrize("setting,refusal", [
    ("training.term_grad_norms_every=2", "term_grad_norms_every cannot be used with FSDP"),
    ("training.precision=float16", "precision float16 cannot be used with FSDP .*; use bfloat16"),
])
def test_settings_that_need_whole_gradients_are_refused_with_a_sharded_student(tmp_path, monkeypatch, setting, refusal):
    from kdforge.errors import KdforgeError
    from kdforge.training import distributed

    monkeypatch.setattr(distributed, "join", lambda device: distributed.World(rank=0, size=2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(KdforgeError, match=refusal):
        train(load_config(TINY_LM, [*SHORT, setting]), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


SHARDED = ["training.steps=4", "training.checkpoint_every=2", "training.eval_every=2", "training.device=cpu"]


def launch(*arguments: str, launcher: list[str]) -> dict:
    """Run ``kdforge`` under a two-process launcher; return the result line rank 0 printed."""
    run = subprocess.run([sys.executable, "-m", *launcher, "-m", "kdforge", *arguments], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fsdp_shards_the_student_writes_whole_checkpoints_and_resumes_exactly(tmp_path):
    """accelerate launch --use_fsdp shards the student with nothing in the config; its weights, evaluations
    and checkpoints are one process's; a sharded run resumed from its checkpoint ends where it would have."""
    settings = [f"--set={o}" for o in SHARDED]
    train(load_config(TINY_LM, SHARDED), tmp_path / "one", show_progress=False)
    accelerate = ["accelerate.commands.launch", "--use_fsdp", "--num_processes", "2"]
    result = launch("train", str(TINY_LM), "--out", str(tmp_path / "sharded"), *settings, launcher=accelerate)
    assert result["processes"] == 2 and result["fsdp"] is True

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    for weights in ("student/model.safetensors", "checkpoints/step-0000002/trainable.safetensors",
                    "checkpoints/step-0000002/optimizer.safetensors"):  # whole tensors, as one process writes them
        expected, written = load_file(one / weights), load_file(sharded / weights)
        assert written.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(written[name], value, rtol=1e-4, atol=3e-5)
    histories = [[json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()] for run in (one, sharded)]
    evaluations = [[e["eval"]["ppl"] for e in history if "eval" in e] for history in histories]
    assert len(evaluations[0]) == 2 and evaluations[1] == pytest.approx(evaluations[0], rel=1e-5)

    # the run as a kill after step 3 leaves it: checkpoint 2, three history lines, nothing exported
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(sharded / "config.json", resumed)
    shutil.copytree(sharded / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    (resumed / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in histories[1][:3]))
    torchrun = ["torch.distributed.run", "--nproc_per_node", "2"]
    launch("train", str(TINY_LM), "--out", str(resumed), "--resume", *settings, "--set=training.fsdp=true",
           launcher=torchrun)
    uninterrupted = load_file(sharded / "student" / "model.safetensors")
    assert all(torch.equal(value, uninterrupted[name])
               for name, value in load_file(resumed / "student" / "model.safetensors").items())


def test_gradients_of_sharded_and_replicated_parameters_are_clipped_by_one_norm(tmp_path):
    """clip_gradients over FSDP's sharded parameters and plain ones scales all by one total norm,
    exactly as clip_grad_norm_ does for the same parameters unsharded."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from kdforge.training.sharding import clip_gradients

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        sharded, replicated = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
        reference = [torch.nn.Parameter(p.detach().clone()) for p in [*sharded.parameters(), *replicated.parameters()]]
        fully_shard(sharded, mesh=torch.distributed.device_mesh.init_device_mesh("cpu", (1,)))
        features = torch.randn(4, 6)
        replicated(sharded(features)).square().sum().backward()
        w1, b1, w2, b2 = reference
        ((features @ w1.T + b1) @ w2.T + b2).square().sum().backward()
        expected = torch.nn.utils.clip_grad_norm_(reference, 0.5)

        parameters = [*sharded.parameters(), *replicated.parameters()]
        assert clip_gradients(parameters, 0.5) == pytest.approx(float(expected), rel=1e-6)
        for parameter, clipped in zip(parameters, reference):
            gradient = parameter.grad.full_tensor() if hasattr(parameter.grad, "full_tensor") else parameter.grad
            torch.testing.assert_close(gradient, clipped.grad)
    finally:
        dist.destroy_process_group()


def test_the_export_shell_keeps_the_structure_and_tied_weights_but_no_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdforge.training.sharding import block_classes, weightless_copy

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    shell = weightless_copy(model)
    assert all(p.is_meta for p in shell.parameters()) and not any(p.is_meta for p in model.parameters())
    assert shell.lm_head.weight is shell.model.embed_tokens.weight
    assert [n for n, _ in shell.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert block_classes(model) == {"LlamaDecoderLayer"}
    shell.load_state_dict(model.state_dict(), assign=True)
    shell.tie_weights()
    tokens = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(shell(tokens).logits, model(tokens).logits)
