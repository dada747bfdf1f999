"""Placing a training step's inputs on the model's device (CPU here; a GPU where one is lent)."""

from __future__ import annotations

import pytest
import torch

from kdforge.devices import device_of, to_device
from kdforge.losses import TopKTeacher
from kdforge.training.distributed import training_device


def test_every_tensor_of_a_batch_moves_and_nothing_else_changes():
    teacher = TopKTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2))
    batch = {"inputs": torch.ones(2, 4), "teacher_topk": teacher, "hidden": [torch.ones(1), (torch.ones(2),)],
             "label": "utt-1", "count": 3}
    moved = to_device(batch, torch.device("meta"))
    tensors = [moved["inputs"], *(getattr(moved["teacher_topk"], f) for f in ("indices", "logprobs", "tail_logprob")),
               moved["hidden"][0], moved["hidden"][1][0]]
    assert all(t.is_meta for t in tensors)
    assert isinstance(moved["teacher_topk"], TopKTeacher) and isinstance(moved["hidden"][1], tuple)
    assert (moved["label"], moved["count"]) == ("utt-1", 3)
    assert batch["inputs"].device.type == "cpu"  # the caller's batch is left where it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("setting", ["auto", "cpu"])
def test_a_machine_without_a_gpu_trains_on_the_cpu(setting):
    assert training_device(setting) == torch.device("cpu")
    assert device_of(torch.nn.Linear(2, 2).to(training_device(setting))) == torch.device("cpu")
