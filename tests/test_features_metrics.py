"""Point losses of the projection mapping and the agreement metrics, against plain loops."""

import math

import numpy as np
import pytest
import torch

from kdforge.losses import TopKTeacher, cosine_loss, geodesic_loss, mse_loss
from kdforge.metrics import perplexity, topk_consistency_rate, topk_overlap_rate

import reference
from reference import random_logits


def test_geodesic_is_the_angle_between_points():
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.0, 5.0, 0.0], [-1.0, -1.0, 0.0]])
    per_point = [math.pi / 2, 0.0, math.pi]
    assert geodesic_loss(student, teacher).item() == pytest.approx(np.mean(per_point), abs=2e-3)
    mask = torch.tensor([True, False, False])
    assert geodesic_loss(student, teacher, mask).item() == pytest.approx(math.pi / 2, abs=1e-6)


def test_point_losses_match_loops_and_gradcheck():
    student = random_logits(2, 5, 8, seed=1, dtype=torch.float64).requires_grad_()
    teacher = random_logits(2, 5, 8, seed=2, dtype=torch.float64)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    s, t, m = student.detach().reshape(-1, 8).numpy(), teacher.reshape(-1, 8).numpy(), mask.reshape(-1).numpy()
    cos = [float(s[i] @ t[i] / np.linalg.norm(s[i]) / np.linalg.norm(t[i])) for i in range(10) if m[i]]
    mse = [float(((s[i] - t[i]) ** 2).mean()) for i in range(10) if m[i]]
    assert geodesic_loss(student, teacher, mask).item() == pytest.approx(np.mean(np.arccos(cos)), rel=1e-9)
    assert cosine_loss(student, teacher, mask).item() == pytest.approx(1 - np.mean(cos), rel=1e-9)
    assert mse_loss(student, teacher, mask).item() == pytest.approx(np.mean(mse), rel=1e-9)
    for fn in (geodesic_loss, cosine_loss, mse_loss):
        assert torch.autograd.gradcheck(lambda x: fn(x, teacher, mask), (student,))


def test_point_losses_with_no_valid_point_are_zero_with_gradient():
    student = random_logits(3, 4, seed=4).requires_grad_()
    for fn in (geodesic_loss, cosine_loss, mse_loss):
        value = fn(student, random_logits(3, 4, seed=5), torch.zeros(3, dtype=torch.bool))
        value.backward()
        assert value.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))
        student.grad = None


def test_geodesic_gradient_is_finite_at_identical_points():
    points = random_logits(4, 6, seed=6).requires_grad_()
    geodesic_loss(points, points.detach()).backward()
    assert torch.isfinite(points.grad).all()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_consistency_and_overlap_rates_match_loops(k):
    teacher = random_logits(6, 5, 20, seed=7)
    student = teacher + (0.8 / k) * random_logits(6, 5, 20, seed=8)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(9)) > 0.2
    s, t, m = student.reshape(-1, 20).numpy(), teacher.reshape(-1, 20).numpy(), mask.reshape(-1).numpy()
    rows = [i for i in range(30) if m[i]]
    same = [reference.topk(s[i], k) == reference.topk(t[i], k) for i in rows]
    overlap = [len(set(reference.topk(s[i], k)) & set(reference.topk(t[i], k))) / k for i in rows]
    assert 0 < np.mean(same) < 1  # the case really distinguishes
    assert topk_consistency_rate(student, teacher, k, mask) == pytest.approx(np.mean(same))
    assert topk_overlap_rate(student, teacher, k, mask) == pytest.approx(np.mean(overlap))
    sparse = TopKTeacher.from_logits(teacher, 10)
    assert topk_consistency_rate(student, sparse, k, mask) == pytest.approx(np.mean(same))


def test_consistency_requires_the_same_order():
    teacher = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    swapped = torch.tensor([[2.0, 3.0, 1.0, 0.0]])
    assert topk_consistency_rate(swapped, teacher, 2) == 0.0
    assert topk_overlap_rate(swapped, teacher, 2) == 1.0


def test_perplexity_is_exp_of_mean_nll():
    logits = random_logits(2, 6, 11, seed=10)
    targets = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(11))
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(12)) > 0.3
    nll = [-math.log(reference.softmax(logits[b, t].numpy())[targets[b, t]]) for b in range(2) for t in range(6) if mask[b, t]]
    assert perplexity(logits, targets, mask) == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    uniform = torch.zeros(1, 3, 11)
    assert perplexity(uniform, torch.zeros(1, 3, dtype=torch.long)) == pytest.approx(11.0, rel=1e-6)
