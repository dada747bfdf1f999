"""RLKD: exact unions, the soft rank (against torchsort and a PAV loop) and the ranking loss."""

import math

import numpy as np
import pytest
import torch
import torchsort
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kdforge.losses import TopKTeacher, exact_topk_union, forward_kl, rlkd_loss, rlkd_ranking_loss, soft_rank, topk_overlap
from kdforge.losses import ranking
from kdforge.losses.ranking import isotonic_decreasing, topk_indices

import reference
from reference import random_logits


@pytest.mark.parametrize("strength", [1e-3, 0.1, 1.0, 5.0])
def test_soft_rank_equals_torchsort(strength):
    values = random_logits(64, 10, seed=1, dtype=torch.float64).requires_grad_()
    ours = soft_rank(values, strength)
    theirs = torchsort.soft_rank(values, regularization="l2", regularization_strength=strength)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    direction = random_logits(64, 10, seed=2, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((ours * direction).sum(), values)
    (g_theirs,) = torch.autograd.grad((theirs * direction).sum(), values)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10)


def test_soft_rank_of_a_valid_subset_ranks_it_alone():
    values = random_logits(40, 9, seed=3, dtype=torch.float64)
    valid = torch.rand(40, 9, generator=torch.Generator().manual_seed(4)) > 0.4
    valid[:, 0] = True
    ours = soft_rank(values, 0.7, valid)
    for row in range(40):
        expected = reference.soft_rank(values[row][valid[row]].numpy(), 0.7)
        np.testing.assert_allclose(ours[row][valid[row]].numpy(), expected, rtol=1e-10, atol=1e-10)
        assert torch.all(ours[row][~valid[row]] == 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=12), st.integers(1, 12))
def test_isotonic_matches_pool_adjacent_violators(values, length):
    length = min(length, len(values))
    got = isotonic_decreasing(torch.tensor([values], dtype=torch.float64), torch.tensor([length]))
    np.testing.assert_allclose(got[0, :length].numpy(), reference.pav_decreasing(values[:length]), rtol=1e-9, atol=1e-9)


def test_union_is_exact_per_row():
    teacher_top = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    student_top = torch.tensor([[3, 2, 1], [6, 10, 11], [12, 13, 14]])
    ids, valid = exact_topk_union(teacher_top, student_top)
    for row in range(3):
        want = reference.union(teacher_top[row].tolist(), student_top[row].tolist())
        assert ids[row][valid[row]].tolist() == want
    assert valid.sum(-1).tolist() == [3, 5, 6]
    # The official code's shortcut, torch.unique(dim=-1) over the concatenated batch, dedupes
    # whole columns, so rows keep duplicates and all have length 2k: not a per-row union.
    shortcut = torch.unique(torch.cat([teacher_top, student_top], -1), dim=-1)
    assert shortcut.shape[-1] == 6 and len(set(shortcut[0].tolist())) == 3


@pytest.mark.parametrize("rank_on", ["logits", "probs"])
@pytest.mark.parametrize("k,strength", [(2, 1.0), (5, 1.0), (5, 0.01), (8, 3.0)])
def test_ranking_loss_matches_unbatched_reference(rank_on, k, strength):
    student, teacher = random_logits(3, 6, 30, seed=5), random_logits(3, 6, 30, seed=6)
    student[0, 0] = teacher[0, 0] + 0.3 * student[0, 0]  # some positions share top-k members
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(7)) > 0.3
    got = rlkd_ranking_loss(student, teacher, mask, k=k, regularization_strength=strength, rank_on=rank_on)
    want = reference.rlkd_ranking(student, teacher, mask, k=k, eps=strength, rank_on=rank_on)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), transform=st.sampled_from(["affine", "cube", "exp"]))
def test_invariant_to_increasing_transforms_when_regularisation_is_small(seed, transform):
    student = random_logits(4, 16, seed=seed, dtype=torch.float64)
    teacher = random_logits(4, 16, seed=seed + 1, dtype=torch.float64)
    f = {"affine": lambda x: 3 * x - 7, "cube": lambda x: x**3 + x, "exp": lambda x: torch.exp(x / 3)}[transform]
    for logits in (student, teacher, f(student), f(teacher)):
        gaps = logits.sort(-1).values.diff(dim=-1)
        assume(gaps.min() > 1e-3)
    plain = rlkd_ranking_loss(student, teacher, k=5, regularization_strength=1e-6)
    moved = rlkd_ranking_loss(f(student), f(teacher), k=5, regularization_strength=1e-6)
    assert moved.item() == pytest.approx(plain.item(), abs=1e-7)


def test_gradcheck_float64():
    student = random_logits(2, 3, 12, seed=8, dtype=torch.float64).requires_grad_()
    teacher = random_logits(2, 3, 12, seed=9, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for rank_on in ("logits", "probs"):
        assert torch.autograd.gradcheck(lambda s: rlkd_ranking_loss(s, teacher, mask, k=4, rank_on=rank_on), (student,))


def test_perfect_agreement_gives_zero_and_training_reduces_the_loss():
    teacher = random_logits(8, 40, seed=10)
    assert rlkd_ranking_loss(teacher * 2 + 1, teacher, k=5, regularization_strength=1e-4).item() == pytest.approx(0, abs=1e-6)
    # With well-separated scores the l2 soft rank is exact and flat; a larger eps gives gradients.
    student = random_logits(8, 40, seed=11).requires_grad_()
    optimizer = torch.optim.Adam([student], lr=0.1)
    start = rlkd_ranking_loss(student, teacher, k=5, regularization_strength=1e-3).item()
    for _ in range(100):
        optimizer.zero_grad()
        rlkd_ranking_loss(student, teacher, k=5, regularization_strength=10.0).backward()
        optimizer.step()
    assert rlkd_ranking_loss(student, teacher, k=5, regularization_strength=1e-3).item() < 0.5 * start


def test_sparse_teacher_with_full_vocabulary_equals_dense():
    student, teacher = random_logits(2, 5, 20, seed=12), random_logits(2, 5, 20, seed=13)
    dense = rlkd_ranking_loss(student, teacher, k=4)
    sparse = rlkd_ranking_loss(student, TopKTeacher.from_logits(teacher, 20), k=4)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)


def test_sparse_teacher_ranks_unseen_ids_below_stored_ones_all_tied():
    teacher = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]])
    student = torch.tensor([[-5.0, -4.0, -3.0, 3.0, 2.0, 1.0]])  # student top-3 = ids 3, 4, 5
    sparse = rlkd_ranking_loss(student, TopKTeacher.from_logits(teacher, 3), k=3, regularization_strength=1e-4)
    # The teacher's known ids rank 4..6, the three unseen ones tie at rank 2; the student ranks them
    # exactly opposite: the correlation is -1 within ties' resolution.
    ranks_t = np.array([6, 5, 4, 2, 2, 2.0])
    ranks_s = np.array([1, 2, 3, 6, 5, 4.0])
    assert sparse.item() == pytest.approx(1 - reference.pearson(ranks_s, ranks_t), abs=1e-4)


@pytest.mark.parametrize("stored,count", [(12, 20), (50, 20), (12, 2)],
                         ids=["vocabulary-table", "whole-vocabulary", "pair-table"])
@pytest.mark.parametrize("rank_on", ["logits", "probs"])
def test_a_sparse_teachers_scores_are_its_stored_logprobs_or_the_tails_share(rank_on, stored, count):
    from kdforge.losses.ranking import _teacher_scores

    vocab_size = 50
    teacher = TopKTeacher.from_logits(random_logits(6, vocab_size, seed=16), stored)
    ids = torch.stack([torch.randperm(vocab_size, generator=torch.Generator().manual_seed(row))[:count]
                       for row in range(6)])
    ids[:, :2] = torch.tensor([0, vocab_size - 1])  # the vocabulary's two ends
    want = torch.empty(6, count)
    for row in range(6):
        known = dict(zip(teacher.indices[row].tolist(), teacher.logprobs[row].tolist()))
        tail = teacher.tail_logprob[row].item() - math.log(max(vocab_size - stored, 1))
        want[row] = torch.tensor([known.get(i, tail) for i in ids[row].tolist()])
    got = _teacher_scores(teacher, ids, vocab_size, rank_on)
    torch.testing.assert_close(got, want.exp() if rank_on == "probs" else want)


def test_dynamic_weighting_scales_each_position_by_its_overlap():
    student, teacher = random_logits(2, 4, 15, seed=14), random_logits(2, 4, 15, seed=15)
    student[0] = teacher[0] + 0.1 * student[0]  # row 0 agrees with the teacher, row 1 does not
    overlap = topk_overlap(student, teacher, 5)
    assert overlap[0].mean() > 0.9 > overlap[1].mean() and overlap.unique().numel() > 1
    result = rlkd_loss(student, teacher, objective=forward_kl, k=5, dynamic=True, rank_weight=2.0)
    per_position = [reference.objective("kl", student[i:i + 1, j:j + 1], teacher[i:i + 1, j:j + 1]) for i in range(2) for j in range(4)]
    base = float(np.mean(np.array(per_position) * overlap.reshape(-1).numpy()))
    rank = reference.rlkd_ranking(student, teacher, k=5)
    assert result.base.item() == pytest.approx(base, rel=1e-5)
    assert result.rank.item() == pytest.approx(rank, rel=1e-5)
    assert result.total.item() == pytest.approx(base + 2.0 * rank, rel=1e-5)
    static = rlkd_loss(student, teacher, objective=forward_kl, k=5)
    assert static.base.item() == pytest.approx(float(np.mean(per_position)), rel=1e-5) and static.base > result.base
    plain = rlkd_loss(student, teacher, objective=forward_kl, k=5, rank_weight=0.0)
    assert plain.rank is None and plain.total.item() == pytest.approx(forward_kl(student, teacher).item())
    alone = rlkd_loss(student, teacher, objective=None, k=5)
    assert alone.base is None and alone.total.item() == pytest.approx(2.0 * rank, rel=1e-5)


def test_no_valid_position_gives_zero_with_gradient():
    student = random_logits(2, 3, 10, seed=16).requires_grad_()
    value = rlkd_ranking_loss(student, random_logits(2, 3, 10, seed=17), torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("kwargs", [{"k": 1}, {"rank_on": "ranks"}, {"regularization_strength": 0.0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        rlkd_ranking_loss(random_logits(2, 10), random_logits(2, 10), **kwargs)


@pytest.mark.parametrize("objective", [forward_kl, None])
def test_rlkd_through_a_sliced_view_gives_the_gradient_of_its_terms_taken_apart(objective):
    # An LM's logits[:, :-1]: with a base objective the ranking term's gradient is sparse and joins the
    # base's dense one in place; alone it is dense. Either way the gradient is that of the two terms apart.
    hidden = random_logits(2, 6, 40, seed=18).requires_grad_()
    teacher, mask = random_logits(2, 5, 40, seed=19), torch.tensor([[True] * 5, [True, True, False, True, False]])
    kl_options = dict(temperature=2.0, chunk_size=3)
    combined = rlkd_loss(hidden[:, :-1], teacher, mask, objective=objective, k=4, **kl_options).total
    (together,) = torch.autograd.grad(combined, hidden)
    apart = 2.0 * rlkd_ranking_loss(hidden[:, :-1], teacher, mask, k=4)
    if objective is not None:
        apart = apart + objective(hidden[:, :-1], teacher, mask, **kl_options)
    (expected,) = torch.autograd.grad(apart, hidden)
    assert together.layout == torch.strided and (together[:, -1] == 0).all()
    torch.testing.assert_close(combined, apart)
    torch.testing.assert_close(together, expected)


def test_each_rlkd_term_differentiated_alone_gives_its_own_dense_gradient():
    # what per-term gradient norms do: the ranking term's sparse gradient then meets no base gradient
    hidden = random_logits(2, 6, 40, seed=20).requires_grad_()
    teacher = random_logits(2, 5, 40, seed=21)
    result = rlkd_loss(hidden[:, :-1], teacher, objective=forward_kl, k=4, chunk_size=4)
    (rank,) = torch.autograd.grad(result.rank, hidden, retain_graph=True)
    (base,) = torch.autograd.grad(result.base, hidden)
    assert rank.layout == torch.strided
    torch.testing.assert_close(rank, torch.autograd.grad(rlkd_ranking_loss(hidden[:, :-1], teacher, k=4), hidden)[0])
    torch.testing.assert_close(base, torch.autograd.grad(forward_kl(hidden[:, :-1], teacher, chunk_size=4), hidden)[0])


def test_rlkd_refuses_a_teacher_or_mask_whose_positions_differ_before_flattening_them():
    student = random_logits(2, 3, 10)
    with pytest.raises(ValueError, match="teacher positions"):
        rlkd_loss(student, random_logits(3, 2, 10), objective=forward_kl, k=3)
    with pytest.raises(ValueError, match="mask has shape"):
        rlkd_loss(student, random_logits(2, 3, 10), torch.ones(3, 2, dtype=torch.bool), objective=forward_kl, k=3)
    with pytest.raises(ValueError, match="position_weights has shape"):
        rlkd_loss(student, random_logits(2, 3, 10), objective=forward_kl, k=3, position_weights=torch.ones(3, 2))
    weights = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])  # (2, 3) weights reach the flattened objective
    weighted = rlkd_loss(student, random_logits(2, 3, 10), objective=forward_kl, k=3, rank_weight=0.0,
                         position_weights=weights)
    assert weighted.total.item() == pytest.approx(forward_kl(student, random_logits(2, 3, 10),
                                                             position_weights=weights).item())


@pytest.mark.parametrize("vocab_size", [49_152, 51_864])  # SmolLM2's; Whisper's, not a multiple of the block
def test_block_topk_finds_the_same_ids_as_a_full_topk(vocab_size):
    logits = torch.randn(2, 3, vocab_size, generator=torch.Generator().manual_seed(8)) * 5
    logits[0, 0, -1] = 100.0  # the largest entry among the columns after the last whole block
    logits[0, 1, :64] = 50.0 + torch.arange(64.0)  # one block holding the whole top-k
    for k in (2, 5, 15):
        assert torch.equal(topk_indices(logits, k), logits.topk(k, dim=-1).indices)
    tied = torch.zeros(4, vocab_size)
    tied[:, ::1000] = 1.0
    assert torch.equal(tied.gather(-1, topk_indices(tied, 15)), tied.topk(15, dim=-1).values)


@pytest.mark.parametrize("teacher_kind", ["top-k bucket", "top-k renormalize", "dense"])
@pytest.mark.parametrize("rank_weight,dynamic,masked", [(0.0, False, True), (2.0, False, True), (2.0, True, True),
                                                        (2.0, False, False)])
def test_the_labels_term_inside_rlkd_equals_cross_entropy_beside_it(monkeypatch, teacher_kind, rank_weight, dynamic,
                                                                    masked):
    """Under a top-k teacher with the bucket rule the labels' cross-entropy shares the base objective's
    softmax; otherwise it is computed apart. Either way the total, its parts and the gradient are those
    of the cross-entropy added to the loss without labels."""
    from kdforge.losses.reduction import masked_mean, token_nll

    hidden = random_logits(2, 6, 40, seed=21).double().requires_grad_()
    dense = random_logits(2, 5, 40, seed=22).double()
    teacher = dense if teacher_kind == "dense" else TopKTeacher.from_logits(dense, 6)
    options = dict(temperature=2.0, tail=teacher_kind.split()[-1]) if teacher_kind != "dense" else dict(temperature=2.0)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]]) if masked else None
    options["dynamic"] = dynamic
    labels = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(6))
    labels[0, :2] = dense[0, :2].argmax(-1)  # among the teacher's ids
    if teacher_kind == "top-k bucket":  # no log-softmax of its own: the labels are read in the objective's pass
        monkeypatch.setattr(ranking, "token_nll", None)
    together = rlkd_loss(hidden[:, :-1], teacher, mask, objective=forward_kl, k=4, rank_weight=rank_weight,
                         labels=labels, label_weight=0.7, **options)
    (together_grad,) = torch.autograd.grad(together.total, hidden)
    monkeypatch.undo()
    without = rlkd_loss(hidden[:, :-1], teacher, mask, objective=forward_kl, k=4, rank_weight=rank_weight, **options)
    cross_entropy = masked_mean(token_nll(hidden[:, :-1], labels), mask)
    (apart_grad,) = torch.autograd.grad(without.total + 0.7 * cross_entropy, hidden)
    torch.testing.assert_close(together.task, cross_entropy)
    torch.testing.assert_close(together.base, without.base)
    torch.testing.assert_close(together.total, without.total + 0.7 * cross_entropy)
    torch.testing.assert_close(together_grad, apart_grad)
    with pytest.raises(ValueError, match="labels have shape"):
        rlkd_loss(hidden[:, :-1], teacher, mask, objective=forward_kl, labels=labels[:, :3], label_weight=1.0)
