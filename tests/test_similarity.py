"""Linear CKA and `kdforge similarity`: how alike a student's encoder layers are to each teacher's."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kdforge.evaluation.similarity import linear_cka, representation_similarity


def gaussian(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_cka_is_one_up_to_an_orthogonal_map_a_scale_and_a_shift():
    x = gaussian(200, 6, seed=0)
    rotation, _ = torch.linalg.qr(gaussian(9, 6, seed=1))  # (9, 6), orthonormal columns: into a wider space
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation.T + 100.0) == pytest.approx(1.0)


def test_cka_of_unrelated_points_is_small_and_of_a_distorted_copy_in_between():
    x = gaussian(2000, 6, seed=0)
    assert linear_cka(x, gaussian(2000, 6, seed=2)) < 0.02
    stretched = x * torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # no orthogonal map and scale undo this
    assert 0.1 < linear_cka(x, stretched) < 0.9


def test_cka_refuses_unpaired_points():
    with pytest.raises(ValueError, match="same N"):
        linear_cka(gaussian(5, 2, seed=0), gaussian(6, 2, seed=0))


def test_a_student_compared_with_itself_pairs_every_layer_and_frame(tiny_whisper, tiny_ctc, speech):
    from kdforge.tasks.asr_distill import encoder_shape

    layers = list(range(1, encoder_shape(tiny_whisper)[0]))
    rows = representation_similarity([tiny_whisper], [tiny_whisper, tiny_ctc], speech)
    mirrored = [row for row in rows if row["teacher"] == str(tiny_whisper)]
    assert [row["student_layer"] for row in mirrored] == [row["teacher_layer"] for row in mirrored] == layers
    assert all(row["cka"] == pytest.approx(1.0) for row in mirrored)  # same layer, same frames
    ctc = [row for row in rows if row["teacher"] == str(tiny_ctc)]
    assert len(ctc) == len(layers) and all(0.0 < row["cka"] < 0.99 for row in ctc)
    assert {row["points"] for row in rows} == {mirrored[0]["points"]}  # every teacher resampled to the student's frames


def test_similarity_command_prints_and_keeps_the_rows(tiny_whisper, speech, tmp_path, capsys):
    from kdforge.cli import app, main

    out = tmp_path / "cka.json"
    result = CliRunner().invoke(app, ["similarity", "--student", str(tiny_whisper), "--teacher", str(tiny_whisper),
                                      "--data", str(speech), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert json.loads(result.output.strip().splitlines()[-1]) == rows
    assert rows and all(round(row["cka"], 6) == 1.0 for row in rows)
    with pytest.raises(SystemExit) as stopped:  # the console script's one-line error
        main(["similarity", "--student", str(tiny_whisper), "--teacher", str(tiny_whisper), "--data", str(speech),
              "--out", str(out)])
    assert stopped.value.code == 2 and "already exists" in capsys.readouterr().err
    assert json.loads(out.read_text()) == rows
