"""The base objectives against independent references, plus their properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.losses import OBJECTIVES, TopKTeacher, adaptive_kl, forward_kl, generalized_jsd, reverse_kl, sparse
from kdforge.losses.divergences import akl_weights, forward_kl_divergence, reverse_kl_divergence
from kdforge.losses.sparse import category_logprobs

from reference import divergence, objective, random_logits, sparse_distributions

NAMES = sorted(OBJECTIVES)
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "akl": {"mu": 0.6}}


def loss(name, student, teacher, mask=None, **kwargs):
    return OBJECTIVES[name](student, teacher, mask, **{**PARAMS.get(name, {}), **kwargs})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_loop_reference(name, temperature):
    student, teacher = random_logits(3, 7, 40, seed=1), random_logits(3, 7, 40, seed=2)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    got = loss(name, student, teacher, mask, temperature=temperature)
    want = objective(name, student, teacher, mask, temperature, **PARAMS.get(name, {}))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "akl"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(name, sparse):
    student = random_logits(2, 3, 6, seed=4, dtype=torch.float64).requires_grad_()
    teacher = random_logits(2, 3, 6, seed=5, dtype=torch.float64)
    if sparse:
        teacher = TopKTeacher.from_logits(teacher, 3)
        teacher = TopKTeacher(teacher.indices, teacher.logprobs.double(), teacher.tail_logprob.double())
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda s: loss(name, s, teacher, mask, temperature=1.5), (student,))


def test_adaptive_kl_gradient_treats_weights_as_constants():
    student = random_logits(4, 9, seed=6, dtype=torch.float64).requires_grad_()
    teacher = random_logits(4, 9, seed=7, dtype=torch.float64)
    (got,) = torch.autograd.grad(adaptive_kl(student, teacher, mu=0.5), student)
    s_logp, t_logp = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    w_head, w_tail = akl_weights(s_logp, t_logp, 0.5)
    mixed = (w_head * forward_kl_divergence(s_logp, t_logp) + w_tail * reverse_kl_divergence(s_logp, t_logp)).mean()
    (want,) = torch.autograd.grad(mixed, student)
    torch.testing.assert_close(got, want)
    assert 0 < w_head.min() and w_head.max() < 1  # both terms really take part


logit_arrays = st.integers(0, 10_000).map(lambda seed: (random_logits(2, 4, 12, seed=seed),
                                                         random_logits(2, 4, 12, seed=seed + 1)))


@settings(max_examples=25, deadline=None)
@given(pair=logit_arrays, name=st.sampled_from(NAMES), temperature=st.floats(0.5, 4.0))
def test_nonnegative_and_zero_iff_equal(pair, name, temperature):
    student, teacher = pair
    assert loss(name, student, teacher, temperature=temperature).item() > 1e-4
    # float32 rounding of the divergence, scaled by T^2 like the loss itself
    assert loss(name, teacher + 5.0, teacher, temperature=temperature).item() == pytest.approx(0.0, abs=1e-6 * temperature**2)


@settings(max_examples=20, deadline=None)
@given(pair=logit_arrays, name=st.sampled_from(NAMES), mask_seed=st.integers(0, 1000))
def test_masked_positions_do_not_matter(pair, name, mask_seed):
    student, teacher = pair
    mask = torch.rand(2, 4, generator=torch.Generator().manual_seed(mask_seed)) > 0.5
    mask[0, 0] = True
    scrambled = torch.where(mask.unsqueeze(-1), student, torch.full_like(student, 1e4))
    assert loss(name, scrambled, teacher, mask).item() == pytest.approx(loss(name, student, teacher, mask).item(), rel=1e-6)
    assert loss(name, student, teacher, torch.ones(2, 4, dtype=torch.bool)).item() == pytest.approx(
        loss(name, student, teacher).item(), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_no_valid_position_gives_zero_with_gradient(name, chunk_size):
    student = random_logits(2, 3, 8, seed=8).requires_grad_()
    value = loss(name, student, random_logits(2, 3, 8, seed=9), torch.zeros(2, 3, dtype=torch.bool), chunk_size=chunk_size)
    assert value.item() == 0.0
    value.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_equals_unchunked(name, chunk_size, sparse):
    base = random_logits(3, 5, 30, seed=10)
    teacher = random_logits(3, 5, 30, seed=11)
    if sparse:
        teacher = TopKTeacher.from_logits(teacher, 7)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(12)) > 0.4
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(13))
    results = []
    for chunk in (None, chunk_size):
        student = base.clone().requires_grad_()
        value = loss(name, student, teacher, mask, temperature=2.0, chunk_size=chunk, position_weights=weights)
        value.backward()
        results.append((value.detach(), student.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_with_full_vocabulary_equals_dense(name, tail, temperature):
    base, teacher = random_logits(2, 4, 25, seed=14), random_logits(2, 4, 25, seed=15)
    grads = []
    for t in (teacher, TopKTeacher.from_logits(teacher, 25)):
        student = base.clone().requires_grad_()
        value = loss(name, student, t, temperature=temperature, tail=tail)
        value.backward()
        grads.append((value.detach(), student.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_rules_match_their_definition(name, tail):
    student, teacher = random_logits(6, 20, seed=16), random_logits(6, 20, seed=17)
    sparse = TopKTeacher.from_logits(teacher, 4)
    got = loss(name, student, sparse, temperature=1.5, tail=tail)
    per_position = []
    for i in range(6):
        p, q = sparse_distributions(student[i].double().numpy(), sparse.indices[i].tolist(),
                                    sparse.logprobs[i].double().numpy(), float(sparse.tail_logprob[i]), 1.5, tail)
        per_position.append(1.5**2 * divergence(name, p, q, **PARAMS.get(name, {})))
    assert got.item() == pytest.approx(float(np.mean(per_position)), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_a_student_equal_to_its_cached_teacher_scores_zero_at_every_temperature(name, temperature):
    """With a long, flat tail (as in a real vocabulary) a bucket tempered on one side only is far from 0."""
    logits = random_logits(3, 5000, seed=21)
    logits[..., :5] += torch.tensor([14.0, 11.0, 10.0, 9.0, 8.0])
    cached = TopKTeacher.from_logits(logits, 32)
    assert loss(name, logits, cached, temperature=temperature, tail="bucket").item() == pytest.approx(0.0, abs=1e-5)


def test_sparse_tail_mass_is_exact():
    teacher = random_logits(3, 50, seed=18)
    sparse = TopKTeacher.from_logits(teacher, 5)
    probs = torch.softmax(teacher.double(), -1)
    outside = probs.sum(-1) - probs.gather(-1, sparse.indices).sum(-1)
    torch.testing.assert_close(sparse.tail_logprob.exp().double(), outside, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs_are_computed_in_float32(name):
    student, teacher = random_logits(4, 3, 64, seed=19), random_logits(4, 3, 64, seed=20)
    low = loss(name, student.bfloat16(), teacher.bfloat16(), temperature=2.0)
    assert low.dtype == torch.float32
    want = objective(name, student.bfloat16().float(), teacher.bfloat16().float(), None, 2.0, **PARAMS.get(name, {}))
    assert low.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_jsd_end_points_are_forward_and_reverse_kl():
    student, teacher = random_logits(3, 10, seed=21), random_logits(3, 10, seed=22)
    assert generalized_jsd(student, teacher, beta=0.0).item() == forward_kl(student, teacher).item()
    assert generalized_jsd(student, teacher, beta=1.0).item() == reverse_kl(student, teacher).item()
    # beta = 1/2 is the symmetric Jensen-Shannon divergence, bounded by log 2
    half = generalized_jsd(student, teacher, beta=0.5).item()
    assert half == pytest.approx(generalized_jsd(teacher, student, beta=0.5).item(), rel=1e-6)
    assert 0 < half < math.log(2)


@pytest.mark.parametrize("name", NAMES)
def test_impossible_teacher_tokens_stay_finite(name):
    """A teacher with -inf logits (a suppressed token) gives finite values and gradients.

    Where the exact value is finite it is reproduced; reverse KL (and AKL's reverse part) is
    infinite in exact arithmetic, and the log-probability floor turns it into a large finite penalty.
    """
    student = random_logits(2, 12, seed=23).requires_grad_()
    teacher = random_logits(2, 12, seed=24)
    teacher[:, :3] = float("-inf")
    value = loss(name, student, teacher)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    want = objective(name, student, teacher, None, 1.0, **PARAMS.get(name, {}))
    if math.isfinite(want):
        assert value.item() == pytest.approx(want, rel=1e-5)
    else:
        assert value.item() > 100


def test_vocabulary_mismatch_is_refused_with_both_sizes():
    with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 12\)"):
        forward_kl(random_logits(2, 12), random_logits(2, 10))


@pytest.mark.parametrize("call", [
    lambda s, t: generalized_jsd(s, t, beta=1.5),
    lambda s, t: OBJECTIVES["skl"](s, t, alpha=1.0),
    lambda s, t: adaptive_kl(s, t, mu=0.0),
    lambda s, t: forward_kl(s, t, temperature=0.0),
    lambda s, t: forward_kl(s, t, torch.ones(3, dtype=torch.bool)),
    lambda s, t: forward_kl(s, t, chunk_size=0),
    lambda s, t: forward_kl(s, t, position_weights=torch.ones(3)),
    lambda s, t: category_logprobs(s, TopKTeacher.from_logits(t, 2), 1.0, "drop"),
])
def test_bad_arguments_are_refused(call):
    with pytest.raises((ValueError, TypeError)):
        call(random_logits(2, 6), random_logits(2, 6))


def test_skew_with_no_skew_is_plain_kl():
    from kdforge.losses import skew_forward_kl, skew_reverse_kl

    student, teacher = random_logits(3, 9, seed=25), random_logits(3, 9, seed=26)
    assert skew_forward_kl(student, teacher, alpha=0.0).item() == forward_kl(student, teacher).item()
    assert skew_reverse_kl(student, teacher, alpha=0.0).item() == reverse_kl(student, teacher).item()


def _tail_reference(logits, indices):
    """The student's k + 1 categories by autograd through a log-softmax, a scatter and a log-sum-exp."""
    full = torch.log_softmax(logits, -1)
    outside = full.scatter(-1, indices, float("-inf"))
    return torch.cat([full.gather(-1, indices), torch.logsumexp(outside, -1, keepdim=True)], -1)


@pytest.mark.parametrize("block_elements", [2**20, 40])  # one block; one row per block
def test_student_top_and_tail_logprobs_match_autograd_even_for_tiny_tails(monkeypatch, block_elements):
    monkeypatch.setattr(sparse, "ROW_BLOCK_ELEMENTS", block_elements)
    logits = random_logits(5, 40, seed=31).double() * 4
    logits[0, :3] += 80.0  # the top 3 hold all but < 1e-16 of the mass: a tail 1 - sum would lose it
    indices = logits.topk(3, dim=-1).indices
    logits.requires_grad_(True)
    got, want = sparse.topk_and_tail_logprobs(logits, indices), _tail_reference(logits, indices)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[0, -1].item() < -40  # log of a tail below 1e-16, exact
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (got_grad,) = torch.autograd.grad(got, logits, upstream, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want, logits, upstream)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    # the first backward consumed the forward's exponentials as its gradient: a second recomputes them
    (again,) = torch.autograd.grad(got, logits, upstream)
    torch.testing.assert_close(again, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block_elements", [2**20, 40])
def test_student_top_and_tail_logprobs_of_selected_rows_read_in_place(monkeypatch, block_elements):
    """With ``rows`` the function equals itself on those rows copied out, and its gradient is the whole
    logits' (zero on the rows not read), in the first backward and in a recomputing second one."""
    monkeypatch.setattr(sparse, "ROW_BLOCK_ELEMENTS", block_elements)
    logits = (random_logits(6, 40, seed=33).double() * 4).requires_grad_(True)
    rows = torch.tensor([4, 0, 2])
    indices = logits.detach()[rows].topk(3, dim=-1).indices
    got, want = sparse.topk_and_tail_logprobs(logits, indices, rows), _tail_reference(logits[rows], indices)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (want_grad,) = torch.autograd.grad(want, logits, upstream)
    assert want_grad[[1, 3, 5]].abs().sum() == 0 and want_grad[rows].abs().sum() > 0
    for _ in range(2):
        (got_grad,) = torch.autograd.grad(got, logits, upstream, retain_graph=True)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rows", [None, [4, 0, 2]])
def test_label_logprobs_come_from_the_same_pass_with_the_gradient_of_both_outputs(rows):
    """The labels' log-probabilities beside the k + 1 categories equal a log-softmax's, and one backward
    gives the gradient of both outputs together, for a label among the ids (rows 0, 4) and outside them."""
    logits = (random_logits(6, 40, seed=36).double() * 4).requires_grad_(True)
    rows = None if rows is None else torch.tensor(rows)
    read = logits.detach() if rows is None else logits.detach()[rows]
    indices = read.topk(3, dim=-1).indices
    labels = read.argsort(-1)[:, 0]  # the least probable token: never among the ids
    labels[0] = indices[0, 1]
    if rows is not None:
        labels[1] = indices[1, 0]
    got_categories, got_labels = sparse.topk_tail_and_label_logprobs(logits, indices, labels, rows)
    selected = logits if rows is None else logits[rows]
    want_categories = _tail_reference(selected, indices)
    want_labels = torch.log_softmax(selected, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got_categories, want_categories, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_labels, want_labels, rtol=1e-10, atol=1e-10)
    generator = torch.Generator().manual_seed(5)
    upstream = torch.randn(got_categories.shape, dtype=torch.float64, generator=generator)
    label_upstream = torch.randn(got_labels.shape, dtype=torch.float64, generator=generator)
    (want_grad,) = torch.autograd.grad((want_categories * upstream).sum() + (want_labels * label_upstream).sum(), logits)
    for _ in range(2):  # the second backward recomputes the exponentials the first consumed
        (got_grad,) = torch.autograd.grad((got_categories * upstream).sum() + (got_labels * label_upstream).sum(),
                                          logits, retain_graph=True)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_categories_computed_in_advance_need_a_sparse_teacher_under_the_bucket_rule():
    logits, dense_teacher = random_logits(3, 12, seed=37), random_logits(3, 12, seed=38)
    categories = sparse.topk_and_tail_logprobs(logits, TopKTeacher.from_logits(dense_teacher, 4).indices)
    for teacher, tail in ((dense_teacher, "bucket"), (TopKTeacher.from_logits(dense_teacher, 4), "renormalize")):
        with pytest.raises(ValueError, match="bucket rule"):
            forward_kl(logits, teacher, tail=tail, student_categories=categories)
    with pytest.raises(ValueError, match=r"shape \(2, 5\), expected \(3, 5\)"):  # another mask's rows
        forward_kl(logits, TopKTeacher.from_logits(dense_teacher, 4), student_categories=categories[:2])


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "dense"])
def test_category_logprobs_of_selected_rows_equal_those_of_the_rows_copied_out(tail):
    logits = random_logits(6, 12, seed=34).double()
    rows = torch.tensor([5, 1, 2])
    dense_teacher = random_logits(3, 12, seed=35).double()
    teacher = dense_teacher if tail == "dense" else TopKTeacher.from_logits(dense_teacher, 4)
    rule = "bucket" if tail == "dense" else tail
    got = sparse.category_logprobs(logits, teacher, 2.0, rule, rows)
    want = sparse.category_logprobs(logits[rows], teacher, 2.0, rule)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_an_empty_student_tail_is_floored_and_passes_no_gradient():
    logits = random_logits(2, 6, seed=32).double().requires_grad_(True)
    indices = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    got = sparse.topk_and_tail_logprobs(logits, indices)
    assert (got[:, -1] == sparse.LOG_FLOOR).all()
    (grad,) = torch.autograd.grad(got[:, -1].sum() + got[:, :-1].sum(), logits)
    (top_only,) = torch.autograd.grad(torch.log_softmax(logits, -1).sum(), logits)
    torch.testing.assert_close(grad, top_only)
