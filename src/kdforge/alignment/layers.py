"""The layer-wise half of the projection mapping: which teacher layer each student layer learns from.

Layers are counted as hidden states: index 0 is the embedding output and a model with ``n`` blocks
has depth ``n + 1`` (METHODS.md section 1, "Layer-wise map").
"""

from __future__ import annotations

from kdforge.errors import KdforgeError


def uniform_layer_map(student_layers: list[int], student_depth: int, teacher_depth: int) -> list[int]:
    """``t(l) = round(l * (teacher_depth - 1) / (student_depth - 1))`` for each student layer ``l``.

    Halves round up (``floor(x + 0.5)``, not Python's round-half-even), so the map does not depend on
    whether the integer part happens to be even. The rounding is done in integer arithmetic, so an
    exact half is never misread through float error. Endpoints map to endpoints: the embedding
    output to the teacher's, the last student state to the teacher's last.

    Args:
        student_layers: student hidden-state indices, each in ``[0, student_depth - 1]``.
        student_depth: number of student hidden states, at least 2.
        teacher_depth: number of teacher hidden states, at least 1.

    Returns:
        The teacher hidden-state index paired with each student layer, in the same order.
    """
    if student_depth < 2 or teacher_depth < 1:
        raise KdforgeError(f"uniform layer map needs a student depth >= 2 and a teacher depth >= 1, "
                           f"got {student_depth} and {teacher_depth}")
    for layer in student_layers:
        if not 0 <= layer < student_depth:
            raise KdforgeError(f"student layer {layer} is outside [0, {student_depth - 1}] "
                               f"(hidden states of a depth-{student_depth} student)")
    numerator_scale, denominator = teacher_depth - 1, student_depth - 1
    # floor(l * a / b + 1/2) == floor((2 * l * a + b) / (2 * b)) for positive b.
    return [(2 * layer * numerator_scale + denominator) // (2 * denominator) for layer in student_layers]
