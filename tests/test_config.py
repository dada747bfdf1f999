"""The run config: validation on load, one-line errors naming the key."""

import subprocess
import sys

import pytest
import yaml

from kdforge.config import load_config, parse_config
from kdforge.errors import KdforgeError

BASE = {"task": "lm", "teachers": [{"path": "teacher"}], "student": {"init_from": "teacher", "num_layers": 2},
        "data": {"train": "builtin:arithmetic"}}


def with_change(change):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    change(raw)
    return raw


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(training={"stpes": 3}), "unknown config key 'training.stpes' (did you mean 'steps'?)"),
    (lambda r: r.update(traning={}), "unknown config key 'traning' (did you mean 'training'?)"),
    (lambda r: r["teachers"][0].update(wieght=2), "unknown config key 'teachers.0.wieght' (did you mean 'weight'?)"),
    (lambda r: r.update(training={"lr": -1}), "config key 'training.lr': Input should be greater than 0"),
    (lambda r: r.update(training={"steps": "many"}), "config key 'training.steps': Input should be a valid integer"),
    (lambda r: r.update(training={"batch_size": 6, "grad_accum": 4}), "batch_size 6 is not divisible by grad_accum 4"),
    (lambda r: r["student"].update(path="x"), "config key 'student': give exactly one of 'path' and 'init_from'"),
    (lambda r: r.pop("data"), "config key 'data' is required"),
    (lambda r: r.update(objective={"rlkd": {"k": 1}}), "config key 'objective.rlkd.k': Input should be greater than or equal to 2"),
    (lambda r: r.update(teachers=[]), "the objective distils from teachers, but 'teachers' is empty"),
    (lambda r: r.update(objective={"name": "none"}), "no loss term is active"),
    (lambda r: r.update(objective={"name": "none", "rlkd": {"weight": 0}}), "no loss term is active"),
])
def test_problems_are_one_line_naming_the_key(change, message):
    with pytest.raises(KdforgeError) as error:
        parse_config(with_change(change))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_overrides_and_defaults():
    config = parse_config(with_change(lambda r: None), ["training.steps=7", "objective.rlkd={k: 15, dynamic: true}"])
    assert config.training.steps == 7 and config.objective.rlkd.k == 15 and config.objective.rlkd.dynamic
    assert config.objective.rlkd.weight == 2.0 and config.objective.name == "kl"
    with pytest.raises(KdforgeError, match="--set expects key=value"):
        parse_config(with_change(lambda r: None), ["training.steps"])
    with pytest.raises(KdforgeError, match="--set objective: the value is not valid YAML"):
        parse_config(with_change(lambda r: None), ["objective=[1"])


def test_an_override_reaches_a_list_item_by_its_index():
    config = parse_config(with_change(lambda r: None), ["teachers.0.weight=3", "teachers.0.layers=[1, 2]"])
    assert config.teachers[0].weight == 3 and config.teachers[0].layers == [1, 2]
    with pytest.raises(KdforgeError, match=r"--set teachers.1.weight: the list has items 0..0, not '1'"):
        parse_config(with_change(lambda r: None), ["teachers.1.weight=3"])
    with pytest.raises(KdforgeError, match=r"--set teachers.0: set a whole list \(teachers=\[...\]\)"):
        parse_config(with_change(lambda r: None), ["teachers.0={path: t}"])


def test_paths_expand_home_and_kdforge_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KDFORGE_HOME", str(tmp_path))
    config = parse_config(with_change(lambda r: r["teachers"][0].update(path="$KDFORGE_HOME/models/t")))
    assert config.teachers[0].path == tmp_path / "models" / "t"


def test_cli_rejects_a_bad_config_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(with_change(lambda r: r.update(objectiv={}))))
    done = subprocess.run([sys.executable, "-m", "kdforge", "train", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "kdforge: error: unknown config key 'objectiv' (did you mean 'objective'?)"
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken.yaml").write_text("task: [lm\n")
    with pytest.raises(KdforgeError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_every_shipped_config_is_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        load_config(path)
