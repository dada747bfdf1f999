"""The layer- and point-wise projection mapping (kdforge.alignment), against hand-computed values."""

import math

import pytest
import torch
from torch.nn import functional as F

from kdforge.alignment import (StudentProjection, TeacherProjection, infonce_loss, lppm_loss, pack_points, pool_points,
                               procrustes_map, resample_points, semi_orthogonal, shared_dimension, spherical_centroid,
                               uniform_layer_map)
from kdforge.errors import KdforgeError
from kdforge.losses import cosine_loss, geodesic_loss, mse_loss


def gaussian(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_uniform_layer_map_hand_computed():
    # l * 6 / 4 = 0, 1.5, 3, 4.5, 6: halves round up, not to even (which would give 2 and 4).
    assert uniform_layer_map([0, 1, 2, 3, 4], student_depth=5, teacher_depth=7) == [0, 2, 3, 5, 6]
    # l * 4 / 6 = 0, 0.67, 1.33, 2, 2.67, 3.33, 4.
    assert uniform_layer_map([0, 1, 2, 3, 4, 5, 6], student_depth=7, teacher_depth=5) == [0, 1, 1, 2, 3, 3, 4]
    # A student as deep as the teacher maps each layer to itself.
    assert uniform_layer_map([3, 0, 5], student_depth=6, teacher_depth=6) == [3, 0, 5]


@pytest.mark.parametrize("student_depth,teacher_depth", [(2, 7), (3, 13), (5, 5), (13, 3), (4, 33)])
def test_uniform_layer_map_sends_endpoints_to_endpoints(student_depth, teacher_depth):
    assert uniform_layer_map([0, student_depth - 1], student_depth, teacher_depth) == [0, teacher_depth - 1]


@pytest.mark.parametrize("layer", [-1, 5])
def test_uniform_layer_map_rejects_layers_outside_the_student(layer):
    with pytest.raises(KdforgeError, match=f"student layer {layer} is outside"):
        uniform_layer_map([0, layer], student_depth=5, teacher_depth=7)


def test_shared_dimension_rounds_the_largest_width_up():
    assert shared_dimension([384, 512, 256]) == 512
    assert shared_dimension([384, 513]) == 576
    assert shared_dimension([1]) == 64
    assert shared_dimension([100], multiple=32) == 128


def test_semi_orthogonal_is_an_isometry_and_deterministic_per_seed():
    q = semi_orthogonal(24, 40, seed=3)
    assert q.shape == (40, 24) and q.dtype == torch.float32
    assert torch.allclose(q.T @ q, torch.eye(24), atol=1e-5)
    x = gaussian(10, 24, seed=0)
    assert torch.allclose((x @ q.T).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.equal(q, semi_orthogonal(24, 40, seed=3))
    assert not torch.allclose(q, semi_orthogonal(24, 40, seed=4), atol=1e-2)
    with pytest.raises(KdforgeError, match="out_dim >= in_dim"):
        semi_orthogonal(40, 24, seed=3)


def test_procrustes_recovers_the_isometry_that_carried_the_points_and_beats_any_other_on_noisy_ones():
    rotation = semi_orthogonal(6, 10, seed=5)
    points = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    targets = points @ rotation.T
    torch.testing.assert_close(procrustes_map(targets.T @ points), rotation, atol=1e-5, rtol=1e-5)
    noisy = targets + 0.5 * torch.randn(200, 10, generator=torch.Generator().manual_seed(1))
    fitted = procrustes_map(torch.stack([noisy.T @ points, targets.T @ points]))  # a batch: one map per layer
    torch.testing.assert_close(fitted[1], rotation, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fitted[0].T @ fitted[0], torch.eye(6), atol=1e-5, rtol=1e-5)
    error = lambda q: ((points @ q.T - noisy) ** 2).sum()  # noqa: E731
    assert error(fitted[0]) < error(rotation)
    assert all(error(fitted[0]) < error(semi_orthogonal(6, 10, seed)) for seed in range(5))
    with pytest.raises(KdforgeError, match="needs D >= d"):
        procrustes_map(torch.zeros(4, 6))


def test_fixed_teacher_projection_has_no_trainable_parameters_and_keeps_norms():
    projection = TeacherProjection(width=16, dim=64, num_layers=3, seed=7)
    assert list(projection.parameters()) == []
    assert "maps" in projection.state_dict()
    hidden = gaussian(2, 5, 16, seed=1)
    outputs = [projection(hidden, slot) for slot in range(3)]
    for output in outputs:
        assert output.shape == (2, 5, 64)
        assert torch.allclose(output.norm(dim=-1), hidden.norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-2)
    rebuilt = TeacherProjection(width=16, dim=64, num_layers=3, seed=7)
    assert torch.equal(rebuilt(hidden, 2), outputs[2])
    # Teacher seeds 7 and 8 must not share maps between slots (as seed + slot would).
    assert not torch.allclose(TeacherProjection(16, 64, 3, seed=8)(hidden, 0), outputs[1], atol=1e-2)
    with pytest.raises(IndexError):
        projection(hidden, -1)


def test_learned_teacher_projection_is_trainable_and_starts_at_the_fixed_maps():
    fixed = TeacherProjection(16, 64, 2, seed=5)
    learned = TeacherProjection(16, 64, 2, seed=5, kind="learned")
    parameters = list(learned.parameters())
    assert len(parameters) == 2 and all(p.requires_grad for p in parameters)
    assert all(p.shape == (64, 16) for p in parameters)  # no bias
    hidden = gaussian(2, 3, 16, seed=2)
    assert torch.allclose(learned(hidden, 1), fixed(hidden, 1), atol=1e-6)


@pytest.mark.parametrize("kind", ["fixed", "learned", "identity"])
def test_mapping_every_layer_at_once_is_each_layer_through_its_own_map(kind):
    projection = TeacherProjection(16, 16 if kind == "identity" else 64, 3, seed=9, kind=kind)
    points = gaussian(3, 7, 16, seed=10)
    together = projection.map_layers(points)
    torch.testing.assert_close(together, torch.stack([projection(points[slot], slot) for slot in range(3)]))
    with pytest.raises(ValueError, match=r"expected \(3, N, width\) points"):
        projection.map_layers(points[:2])


def test_identity_teacher_projection_needs_equal_widths():
    hidden = gaussian(2, 3, 8, seed=3)
    assert torch.equal(TeacherProjection(8, 8, 2, seed=0, kind="identity")(hidden, 1), hidden)
    with pytest.raises(KdforgeError, match="width == dim"):
        TeacherProjection(8, 16, 2, seed=0, kind="identity")


@pytest.mark.parametrize("kind,per_layer", [("linear", 6 * 12 + 12), ("mlp", 6 * 12 + 12 + 12 * 12 + 12)])
def test_student_projection_shapes_and_parameters(kind, per_layer):
    projection = StudentProjection(width=6, dim=12, num_layers=2, kind=kind)
    assert sum(p.numel() for p in projection.parameters()) == 2 * per_layer
    hidden = gaussian(3, 4, 6, seed=4)
    assert projection(hidden, 1).shape == (3, 4, 12)
    assert not torch.allclose(projection(hidden, 0), projection(hidden, 1))


def test_a_fixed_student_projection_is_an_untrained_isometry_per_layer():
    projection = StudentProjection(width=6, dim=12, num_layers=2, kind="fixed", seed=3)
    assert list(projection.parameters()) == []
    hidden = gaussian(3, 4, 6, seed=4)
    mapped = projection(hidden, 1)
    torch.testing.assert_close(mapped.norm(dim=-1), hidden.norm(dim=-1))
    points = hidden[:2].reshape(2, 4, 6)  # (layers, N, width)
    torch.testing.assert_close(projection.map_layers(points), torch.stack([projection(points[slot], slot) for slot in range(2)]))
    assert not torch.allclose(mapped, StudentProjection(6, 12, 2, kind="fixed", seed=4)(hidden, 1))
    with pytest.raises(IndexError):
        projection(hidden, 2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projecting_every_student_layer_at_once_is_each_layer_through_its_own_projection(kind):
    projection = StudentProjection(width=6, dim=12, num_layers=3, kind=kind)
    points = gaussian(3, 5, 6, seed=11).requires_grad_()
    together = projection.map_layers(points)
    one_by_one = torch.stack([projection(points[slot], slot) for slot in range(3)])
    torch.testing.assert_close(together, one_by_one)
    upstream = gaussian(3, 5, 12, seed=12)
    gradients = torch.autograd.grad((together * upstream).sum(), [points, *projection.parameters()])
    expected = torch.autograd.grad((one_by_one * upstream).sum(), [points, *projection.parameters()])
    for got, want in zip(gradients, expected):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"expected \(3, N, width\) points"):
        projection.map_layers(points[:2])


def test_resample_linear_places_a_ramp_at_the_new_centres():
    ramp = torch.arange(6.0).reshape(6, 1)
    # Output centre i of 4 sits at input position (i + 1/2) * 6/4 - 1/2.
    assert resample_points(ramp, 4).squeeze().tolist() == pytest.approx([0.25, 1.75, 3.25, 4.75])
    # Upsampling 2 -> 4: positions -0.25, 0.25, 0.75, 1.25, the outer two held at the edge frames.
    assert resample_points(torch.tensor([[0.0], [1.0]]), 4).squeeze().tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_resample_pool_averages_the_covered_frames():
    ramp = torch.arange(6.0).reshape(6, 1)
    assert resample_points(ramp, 4, mode="pool").squeeze().tolist() == pytest.approx([0.5, 1.5, 3.5, 4.5])


@pytest.mark.parametrize("mode", ["linear", "pool"])
def test_packed_points_pair_with_the_students_masked_points_one_by_one(mode):
    sequences = [gaussian(8, 4, seed=5).half(), gaussian(5, 4, seed=6).half(), gaussian(3, 4, seed=7).half()]
    counts = [6, 5, 2]  # the second utterance's rate is the student's: copied as it is
    packed = pack_points(sequences, counts, mode)
    assert packed.shape == (13, 4) and packed.dtype == torch.float32
    torch.testing.assert_close(packed[6:11], sequences[1].float())
    for part, points, count in zip(packed.split(counts), sequences, counts):  # no leakage across utterances
        torch.testing.assert_close(part, resample_points(points.float(), count, mode))
    # the order of states[mask]: utterance by utterance, each one's points in time order
    mask = torch.arange(7) < torch.tensor(counts)[:, None]
    grid = torch.zeros(3, 7, 4)
    grid[mask] = packed
    torch.testing.assert_close(grid[1, :5], sequences[1].float())
    assert grid[2, 2:].abs().sum() == 0


def test_resampling_nothing_into_something_is_refused():
    with pytest.raises(ValueError, match="cannot resample 0 frames to 3"):
        resample_points(torch.zeros(0, 2), 3)
    with pytest.raises(ValueError, match="linear or pool"):
        resample_points(torch.zeros(2, 2), 3, mode="nearest")


def test_pool_points_averages_each_utterances_points():
    points = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).expand(2, 3, 2)  # a leading layer axis
    assert pool_points(points, [2, 1, 0]).tolist() == [[[2.0, 3.0], [5.0, 6.0], [0.0, 0.0]]] * 2
    with pytest.raises(ValueError, match="counts sum to 2"):
        pool_points(points, [1, 1])


def test_spherical_centroid():
    point = gaussian(3, 8, seed=7)
    # Identical directions, whatever their norms and weights, give that direction.
    copies = torch.stack([point, 2.5 * point, 0.1 * point])
    assert torch.allclose(spherical_centroid(copies, torch.tensor([0.2, 0.3, 0.5])), unit(point), atol=1e-6)
    # Two orthogonal unit vectors, weights 3:1: direction (3, 1) / sqrt(10), norms ignored.
    pair = torch.tensor([[10.0, 0.0], [0.0, 0.5]])
    expected = torch.tensor([3.0, 1.0]) / math.sqrt(10)
    centroid = spherical_centroid(pair, torch.tensor([3.0, 1.0]))
    assert torch.allclose(centroid, expected, atol=1e-6)
    assert centroid.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_infonce_prefers_matched_pairs_and_is_log_n_for_constant_points():
    teacher = gaussian(16, 32, seed=8)
    student = teacher + 0.1 * gaussian(16, 32, seed=9)
    shuffled = student[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert infonce_loss(student, teacher) < infonce_loss(shuffled, teacher) - 1.0
    constant = torch.ones(16, 32)
    assert infonce_loss(student, constant).item() == pytest.approx(math.log(16), abs=1e-5)
    # Against a hand-computed 2-point case: cosines [[1, 0], [0, 1]] at temperature 1.
    eye = torch.eye(2)
    expected = -math.log(math.e / (math.e + 1))
    assert infonce_loss(eye, eye, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


def lppm_inputs(layers=2, batch=2, length=4, dim=8, teachers=3, seed=10):
    student = gaussian(layers, batch, length, dim, seed=seed)
    teacher = gaussian(teachers, layers, batch, length, dim, seed=seed + 1)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])[:batch, :length]
    return student, teacher, mask


@pytest.mark.parametrize("target", ["sum", "centroid"])
@pytest.mark.parametrize("point_loss,tolerance", [("geodesic", 2e-3), ("cosine", 1e-6), ("mse", 1e-6)])
def test_lppm_is_zero_for_identical_points(target, point_loss, tolerance):
    student, _, mask = lppm_inputs()
    teachers = torch.stack([student, 3.0 * student])  # same directions, different norms
    value = lppm_loss(student, teachers, mask, torch.tensor([0.4, 0.6]), target, point_loss)
    assert value.item() == pytest.approx(0.0, abs=tolerance)


def test_lppm_geodesic_of_orthogonal_unit_points_is_a_right_angle():
    student = torch.zeros(2, 2, 3, 4)
    student[..., 0] = 1.0
    teacher = torch.zeros(1, 2, 2, 3, 4)
    teacher[..., 2] = 1.0
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert lppm_loss(student, teacher, mask, torch.ones(1)).item() == pytest.approx(math.pi / 2, abs=1e-6)


@pytest.mark.parametrize("target", ["sum", "centroid"])
def test_lppm_ignores_masked_out_points(target):
    student, teacher, mask = lppm_inputs()
    weights = torch.tensor([1.0, 2.0, 3.0])
    value = lppm_loss(student, teacher, mask, weights, target)
    student, teacher = student.clone(), teacher.clone()
    student[:, ~mask] = gaussian(2, int((~mask).sum()), 8, seed=20)
    teacher[:, :, ~mask] = 1e3
    assert lppm_loss(student, teacher, mask, weights, target).item() == pytest.approx(value.item(), rel=1e-6)
    assert value.item() > 0.5


@pytest.mark.parametrize("apart", [False, True])  # the teachers stacked, or as a list (no stacked copy)
@pytest.mark.parametrize("point_loss,function", [("geodesic", geodesic_loss), ("cosine", cosine_loss),
                                                 ("mse", mse_loss)])
def test_lppm_sum_is_the_weighted_average_of_per_teacher_losses(point_loss, function, apart):
    student, teacher, mask = lppm_inputs()
    student.requires_grad_()
    per_teacher = []
    for m in range(3):
        # Mean over layers of each layer's mean over valid points (every layer has the same count).
        per_layer = [function(unit(student[layer]), unit(teacher[m, layer]), mask) for layer in range(2)]
        per_teacher.append(sum(per_layer) / 2)
    expected = (1 * per_teacher[0] + 2 * per_teacher[1] + 5 * per_teacher[2]) / 8
    value = lppm_loss(student, list(teacher) if apart else teacher, mask, torch.tensor([1.0, 2.0, 5.0]), "sum", point_loss)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # the angular losses' one-pass cosines have the gradient of normalising first
    (got,), (want,) = (torch.autograd.grad(loss, student) for loss in (value, expected))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lppm_centroid_targets_the_normalised_weighted_mean():
    student, teacher, mask = lppm_inputs()
    weights = torch.tensor([1.0, 2.0, 5.0])
    centroid = (weights.reshape(3, 1, 1, 1, 1) * unit(teacher)).sum(0)
    expected = geodesic_loss(student, centroid, mask.expand(2, 2, 4))
    value = lppm_loss(student, teacher, mask, weights, "centroid")
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lppm_centroid_and_sum_differ_between_two_teachers():
    # Teachers at angles 0 and pi/2, the student halfway: on their centroid, pi/4 from each.
    student = torch.tensor([1.0, 1.0]).reshape(1, 1, 1, 2)
    teachers = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 1, 2)
    mask, weights = torch.ones(1, 1, dtype=torch.bool), torch.ones(2)
    assert lppm_loss(student, teachers, mask, weights, "centroid").item() == pytest.approx(0.0, abs=2e-3)
    assert lppm_loss(student, teachers, mask, weights, "sum").item() == pytest.approx(math.pi / 4, abs=1e-6)


def test_lppm_mse_without_normalisation_sees_the_norms():
    student, _, mask = lppm_inputs(teachers=1)
    teacher = (2.0 * student).unsqueeze(0)
    assert lppm_loss(student, teacher, mask, torch.ones(1), point_loss="mse").item() == pytest.approx(0.0, abs=1e-6)
    raw = lppm_loss(student, teacher, mask, torch.ones(1), point_loss="mse", normalize=False)
    assert raw.item() == pytest.approx(mse_loss(student, 2.0 * student, mask.expand(2, 2, 4)).item(), rel=1e-6)


@pytest.mark.parametrize("target", ["sum", "centroid"])
def test_lppm_gradient_reaches_valid_student_points_only(target):
    student, teacher, mask = lppm_inputs()
    student.requires_grad_()
    lppm_loss(student, teacher, mask, torch.tensor([1.0, 1.0, 2.0]), target).backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[:, mask].abs().sum(-1) > 0).all()
    assert torch.equal(student.grad[:, ~mask], torch.zeros_like(student.grad[:, ~mask]))


def test_lppm_leaves_a_learned_teacher_map_attached():
    student, teacher, mask = lppm_inputs()
    teacher.requires_grad_()
    lppm_loss(student, teacher, mask, torch.ones(3)).backward()
    assert teacher.grad is not None and teacher.grad[:, :, mask].abs().sum() > 0


def test_point_cosines_have_the_gradient_of_normalising_first_for_student_and_teachers():
    from kdforge.alignment.loss import point_cosines

    generator = torch.Generator().manual_seed(40)
    student = torch.randn(2, 5, 6, dtype=torch.float64, generator=generator)
    teachers = [torch.randn(2, 5, 6, dtype=torch.float64, generator=generator) for _ in range(3)]
    student[0, 1] = 0.0  # a zero point: cosine 0, as F.normalize's floor makes it
    teachers[1][1, 2] = 0.0
    student.requires_grad_()
    teachers[2].requires_grad_()  # a learned teacher map's points receive their gradient too
    got = point_cosines(student, teachers)
    want = torch.stack([(F.normalize(student, dim=-1) * F.normalize(t, dim=-1)).sum(-1) for t in teachers])
    torch.testing.assert_close(got, want)
    assert got[:, 0, 1].abs().max() == 0 and got[1, 1, 2] == 0
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=generator)
    got_grads = torch.autograd.grad(got, [student, teachers[2]], upstream)
    want_grads = torch.autograd.grad(want, [student, teachers[2]], upstream)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad)
    assert got_grads[0][0, 1].abs().sum() > 0  # a zero student point still gets the clamped norm's gradient


def test_lppm_rejects_mismatched_shapes():
    student, teacher, mask = lppm_inputs()
    with pytest.raises(ValueError, match="do not match"):
        lppm_loss(student, teacher[:, :, :, :3], mask, torch.ones(3))
    with pytest.raises(ValueError, match="teacher weights"):
        lppm_loss(student, teacher, mask, torch.ones(2))


def test_linear_resampling_is_torchs_interpolation_without_aligned_corners():
    sequences = [gaussian(n, 3, seed=n) for n in (7, 1, 0, 12, 5, 9)]
    counts = [3, 4, 0, 12, 11, 0]  # down, up from one frame, empty, unchanged, up, nothing
    packed = pack_points(sequences, counts)
    assert torch.equal(packed.split(counts)[3], sequences[3])  # copied exactly
    for part, points, count in zip(packed.split(counts), sequences, counts):
        if count:
            reference = F.interpolate(points.T.unsqueeze(0), size=count, mode="linear", align_corners=False)
            torch.testing.assert_close(part, reference.squeeze(0).T)


def test_pool_resampling_keeps_empty_and_unchanged_sequences():
    sequences = [torch.zeros(0, 2), gaussian(4, 2, seed=1), gaussian(6, 2, seed=2)]
    packed = pack_points(sequences, [0, 4, 3], "pool")
    assert packed.shape == (7, 2)
    assert torch.equal(packed[:4], sequences[1])
    torch.testing.assert_close(packed[4:], sequences[2].reshape(3, 2, 2).mean(1))


def test_a_linear_student_projection_draws_each_layer_as_nn_linear_does():
    # seeded runs keep the heads they started from before the layers were held stacked
    torch.manual_seed(5)
    projection = StudentProjection(width=6, dim=12, num_layers=3, kind="linear")
    torch.manual_seed(5)
    reference = [torch.nn.Linear(6, 12) for _ in range(3)]
    hidden = gaussian(2, 4, 6, seed=9)
    for slot, layer in enumerate(reference):
        torch.testing.assert_close(projection(hidden, slot), layer(hidden))
    with pytest.raises(IndexError):
        projection(hidden, 3)


def test_lppm_computes_in_float32_under_mixed_precision():
    # nearly parallel points: a bfloat16 contraction over D would round their small angles away
    student = gaussian(2, 3, 5, 64, seed=0)
    teachers = [student + 1e-3 * gaussian(2, 3, 5, 64, seed=seed) for seed in (1, 2)]
    mask, weights = torch.ones(3, 5, dtype=torch.bool), torch.tensor([1.0, 2.0])
    plain = lppm_loss(student, teachers, mask, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = lppm_loss(student, teachers, mask, weights)
        rounded = torch.einsum("...d,...d->...", student, teachers[0])  # what autocast does to a contraction
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    assert rounded.dtype == torch.bfloat16


def test_infonce_computes_in_float32_under_mixed_precision():
    student, teacher = gaussian(16, 32, seed=3), gaussian(16, 32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = infonce_loss(student, teacher)
    assert torch.equal(mixed, infonce_loss(student, teacher))
