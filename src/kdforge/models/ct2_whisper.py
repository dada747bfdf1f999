"""CTranslate2 (faster-whisper) Whisper checkpoints -> Hugging Face ``WhisperForConditionalGeneration``.

A CTranslate2 model directory holds ``model.bin`` (sometimes split into ``model.bin.part1``,
``model.bin.part2``, ... that concatenate to it), ``config.json`` (suppressed ids, alignment
heads) and ``tokenizer.json``. ``model.bin`` (binary version 6, little-endian) is::

    uint32 version | string spec_name | uint32 spec_revision | uint32 n_variables
    n_variables x (string name | uint8 rank | rank x uint32 dims | uint8 dtype | uint32 n_bytes | bytes)
    uint32 n_aliases | n_aliases x (string alias | string target)

where a string is ``uint16`` length (including a trailing NUL) then the bytes. The converter maps
the variables onto the Hugging Face layout: the fused ``q,k,v`` (self-attention) and ``k,v``
(cross-attention) projections are split, ``gamma``/``beta`` become LayerNorm weight/bias, and the
output projection stays tied to the token embedding. Only float weights are accepted: an
int8-quantised checkpoint has lost precision that no conversion can give back.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

from kdforge.errors import KdforgeError

SUPPORTED_BINARY_VERSION = 6
WHISPER_SPEC_NAME = "WhisperSpec"
# Type ids of CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# OpenAI's rule: the multilingual vocabularies have 51865 entries or more, English-only ones 51864.
MULTILINGUAL_MIN_VOCAB = 51865
TOKENIZER_FILE = "tokenizer.json"
REQUIRED_SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
                           "<|startofprev|>", "<|notimestamps|>")


@dataclass
class Ct2Checkpoint:
    """The variables of one CTranslate2 ``model.bin``.

    Attributes:
        spec_name: the model specification, e.g. ``"WhisperSpec"``.
        spec_revision: the specification's revision number.
        variables: name -> tensor in its stored dtype (weights keep their stored shape).
        aliases: alias name -> name of the variable it shares storage with.
    """

    spec_name: str
    spec_revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def get(self, name: str) -> torch.Tensor:
        """The tensor called ``name``, following an alias; a missing one is a malformed checkpoint."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KdforgeError(f"CTranslate2 checkpoint has no variable {name!r}: "
                               "not a Whisper model this converter knows")
        return self.variables[name]

    def has(self, name: str) -> bool:
        """Whether ``name`` is a variable or an alias of one."""
        return name in self.variables or name in self.aliases


# ---------------------------------------------------------------------------------------------
# Reading model.bin (possibly split into parts)
# ---------------------------------------------------------------------------------------------

def find_model_files(src_dir: Path) -> list[Path]:
    """``model.bin`` in ``src_dir``, or its parts ``model.bin.part1..N`` in numeric order.

    Raises:
        KdforgeError: neither exists, or the part numbers have a gap.
    """
    single = src_dir / "model.bin"
    if single.is_file():
        return [single]
    numbered = {}
    for path in src_dir.glob("model.bin.part*"):
        match = re.fullmatch(r"model\.bin\.part(\d+)", path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise KdforgeError(f"{src_dir} holds no model.bin nor model.bin.partN files")
    expected = list(range(1, len(numbered) + 1))
    if sorted(numbered) != expected:
        raise KdforgeError(f"{src_dir}: model.bin parts {sorted(numbered)} are not numbered 1..{len(numbered)}")
    return [numbered[number] for number in expected]


class ConcatenatedReader:
    """Reads several files as one stream, opening each only when the previous one is used up.

    Split checkpoints are read where they lie, with no concatenated copy on disk.
    """

    def __init__(self, paths: Sequence[Path]):
        self._pending = list(paths)
        self._current: BinaryIO | None = None

    def read_exact(self, n_bytes: int) -> bytes:
        """Exactly ``n_bytes`` bytes; running out means the checkpoint is cut short."""
        chunks = []
        missing = n_bytes
        while missing > 0:
            if self._current is None:
                if not self._pending:
                    raise KdforgeError("model.bin ends early: the file is truncated or a model.bin.partN is missing")
                self._current = open(self._pending.pop(0), "rb")
            chunk = self._current.read(missing)
            if len(chunk) < missing:
                self._current.close()
                self._current = None
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def at_end(self) -> bool:
        """Whether every byte of every file has been read."""
        while self._current is not None or self._pending:
            if self._current is None:
                self._current = open(self._pending.pop(0), "rb")
            if self._current.read(1):
                return False
            self._current.close()
            self._current = None
        return True

    def close(self) -> None:
        """Close the file being read, if any."""
        if self._current is not None:
            self._current.close()
            self._current = None


def _read_uint(reader: ConcatenatedReader, fmt: str) -> int:
    """One little-endian unsigned integer of ``struct`` format ``fmt`` (``B``, ``H`` or ``I``)."""
    return struct.unpack("<" + fmt, reader.read_exact(struct.calcsize(fmt)))[0]


def _read_string(reader: ConcatenatedReader) -> str:
    """A CTranslate2 string: uint16 length including the trailing NUL, then the bytes."""
    length = _read_uint(reader, "H")
    return reader.read_exact(length)[:-1].decode("utf-8")


def _read_variable(reader: ConcatenatedReader) -> tuple[str, torch.Tensor]:
    """One (name, tensor) record; the tensor owns a copy of its bytes."""
    name = _read_string(reader)
    rank = _read_uint(reader, "B")
    shape = [_read_uint(reader, "I") for _ in range(rank)]
    type_id = _read_uint(reader, "B")
    if type_id not in CT2_DTYPES:
        raise KdforgeError(f"variable {name!r} has unknown CTranslate2 dtype id {type_id}")
    n_bytes = _read_uint(reader, "I")
    data = bytearray(reader.read_exact(n_bytes))  # writable, so torch owns mutable memory
    dtype = CT2_DTYPES[type_id]
    tensor = torch.frombuffer(data, dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
    return name, tensor.reshape(shape)


def read_ct2_checkpoint(model_files: Sequence[Path]) -> Ct2Checkpoint:
    """Parse ``model.bin`` (or its parts, concatenated in the given order) into tensors.

    Raises:
        KdforgeError: unsupported binary version, unknown dtype, truncated or overlong data.
    """
    reader = ConcatenatedReader(model_files)
    try:
        version = _read_uint(reader, "I")
        if version != SUPPORTED_BINARY_VERSION:
            raise KdforgeError(f"CTranslate2 model.bin binary version {version} is not supported "
                               f"(this reader knows version {SUPPORTED_BINARY_VERSION})")
        spec_name = _read_string(reader)
        spec_revision = _read_uint(reader, "I")
        variables = dict(_read_variable(reader) for _ in range(_read_uint(reader, "I")))
        aliases = {}
        for _ in range(_read_uint(reader, "I")):
            alias = _read_string(reader)
            aliases[alias] = _read_string(reader)
        if not reader.at_end():
            raise KdforgeError("model.bin has bytes after its last record: parts in the wrong order or a foreign file")
    finally:
        reader.close()
    return Ct2Checkpoint(spec_name, spec_revision, variables, aliases)


# ---------------------------------------------------------------------------------------------
# Checking and mapping the variables onto the Hugging Face layout
# ---------------------------------------------------------------------------------------------

def check_convertible(checkpoint: Ct2Checkpoint) -> None:
    """Refuse anything but a float Whisper checkpoint, saying why.

    Raises:
        KdforgeError: the spec is not Whisper, or weights are integer-quantised.
    """
    if checkpoint.spec_name != WHISPER_SPEC_NAME:
        raise KdforgeError(f"unknown CTranslate2 spec {checkpoint.spec_name!r}: only {WHISPER_SPEC_NAME} "
                           "(Whisper speech recognition) checkpoints can be converted")
    quantised = [name for name, tensor in checkpoint.variables.items()
                 if name.endswith("weight_scale") or (name.endswith("weight") and tensor.dtype not in FLOAT_DTYPES)]
    if quantised:
        raise KdforgeError(f"this CTranslate2 checkpoint is integer-quantised ({quantised[0]} and "
                           f"{len(quantised) - 1} more): int8 weights cannot be turned back into the model; "
                           "convert a float16, bfloat16 or float32 export instead")


def _count_layers(checkpoint: Ct2Checkpoint, stack: str) -> int:
    """Number of ``{stack}/layer_i`` blocks (``stack`` is ``encoder`` or ``decoder``)."""
    indices = {int(match.group(1)) for name in checkpoint.variables
               if (match := re.match(rf"{stack}/layer_(\d+)/", name))}
    if indices != set(range(len(indices))) or not indices:
        raise KdforgeError(f"CTranslate2 checkpoint has no contiguous {stack} layers: {sorted(indices)}")
    return len(indices)


def whisper_config_from_checkpoint(checkpoint: Ct2Checkpoint, special_ids: dict[str, int],
                                   ct2_config: dict) -> WhisperConfig:
    """The ``WhisperConfig`` whose dimensions are those of the stored variables.

    Args:
        checkpoint: a checked Whisper checkpoint.
        special_ids: token -> id of the special tokens (see :func:`special_token_ids`).
        ct2_config: CTranslate2's ``config.json`` (suppressed token ids).
    """
    embeddings = checkpoint.get("decoder/embeddings/weight")  # (vocab_size, d_model)
    conv1 = checkpoint.get("encoder/conv1/weight")  # (d_model, num_mel_bins, 3)
    vocab_size, d_model = embeddings.shape
    eos = special_ids["<|endoftext|>"]
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=conv1.shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(checkpoint, "encoder"),
        decoder_layers=_count_layers(checkpoint, "decoder"),
        encoder_attention_heads=int(checkpoint.get("encoder/num_heads").item()),
        decoder_attention_heads=int(checkpoint.get("decoder/num_heads").item()),
        encoder_ffn_dim=checkpoint.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=checkpoint.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=checkpoint.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=checkpoint.get("decoder/position_encodings/encodings").shape[0],
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=special_ids["<|startoftranscript|>"],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=True,
    )


def _layer_norm(checkpoint: Ct2Checkpoint, src: str, dst: str) -> dict[str, torch.Tensor]:
    """LayerNorm ``gamma``/``beta`` at ``src`` as ``{dst}.weight`` / ``{dst}.bias``."""
    return {f"{dst}.weight": checkpoint.get(f"{src}/gamma"), f"{dst}.bias": checkpoint.get(f"{src}/beta")}


def _linear(checkpoint: Ct2Checkpoint, src: str, dst: str) -> dict[str, torch.Tensor]:
    """A linear layer at ``src`` as ``{dst}.weight`` / ``{dst}.bias`` (bias only if stored)."""
    tensors = {f"{dst}.weight": checkpoint.get(f"{src}/weight")}
    if checkpoint.has(f"{src}/bias"):
        tensors[f"{dst}.bias"] = checkpoint.get(f"{src}/bias")
    return tensors


def _split_fused(checkpoint: Ct2Checkpoint, src: str, dst_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Split a fused projection (rows stacked in ``dst_names`` order) into separate linears.

    Whisper's key projection has no bias (CTranslate2 stores zeros for it), so no ``k_proj.bias``
    is emitted.

    Args:
        src: the fused layer, weight (len(dst_names) * d, d) and bias (len(dst_names) * d,).
        dst_names: Hugging Face module names, e.g. ``[..q_proj, ..k_proj, ..v_proj]``.
    """
    weights = checkpoint.get(f"{src}/weight").chunk(len(dst_names), dim=0)
    biases = checkpoint.get(f"{src}/bias").chunk(len(dst_names), dim=0)
    tensors = {}
    for name, weight, bias in zip(dst_names, weights, biases):
        tensors[f"{name}.weight"] = weight
        if not name.endswith("k_proj"):
            tensors[f"{name}.bias"] = bias
    return tensors


def _attention(checkpoint: Ct2Checkpoint, src: str, dst: str, cross: bool) -> dict[str, torch.Tensor]:
    """Self-attention (fused q,k,v) or cross-attention (q, fused k,v) plus its output projection."""
    if cross:
        tensors = _linear(checkpoint, f"{src}/linear_0", f"{dst}.q_proj")
        tensors |= _split_fused(checkpoint, f"{src}/linear_1", [f"{dst}.k_proj", f"{dst}.v_proj"])
        tensors |= _linear(checkpoint, f"{src}/linear_2", f"{dst}.out_proj")
    else:
        tensors = _split_fused(checkpoint, f"{src}/linear_0", [f"{dst}.q_proj", f"{dst}.k_proj", f"{dst}.v_proj"])
        tensors |= _linear(checkpoint, f"{src}/linear_1", f"{dst}.out_proj")
    return tensors


def _layer(checkpoint: Ct2Checkpoint, stack: str, index: int) -> dict[str, torch.Tensor]:
    """All tensors of ``model.{stack}.layers.{index}`` (an encoder or decoder block)."""
    src, dst = f"{stack}/layer_{index}", f"model.{stack}.layers.{index}"
    tensors = _attention(checkpoint, f"{src}/self_attention", f"{dst}.self_attn", cross=False)
    tensors |= _layer_norm(checkpoint, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    if stack == "decoder":
        tensors |= _attention(checkpoint, f"{src}/attention", f"{dst}.encoder_attn", cross=True)
        tensors |= _layer_norm(checkpoint, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    tensors |= _linear(checkpoint, f"{src}/ffn/linear_0", f"{dst}.fc1")
    tensors |= _linear(checkpoint, f"{src}/ffn/linear_1", f"{dst}.fc2")
    tensors |= _layer_norm(checkpoint, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return tensors


def hf_state_dict(checkpoint: Ct2Checkpoint, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """The ``WhisperForConditionalGeneration`` state dict (float32, one storage per tensor) of ``checkpoint``.

    ``proj_out.weight`` is left out: it is tied to ``model.decoder.embed_tokens.weight``.

    Raises:
        KdforgeError: the output projection is not the token embedding (not a tied Whisper).
    """
    projection = checkpoint.get("decoder/projection/weight")
    if not torch.equal(projection, checkpoint.get("decoder/embeddings/weight")):
        raise KdforgeError("decoder/projection/weight differs from decoder/embeddings/weight: "
                           "Whisper ties them, so this is not a Whisper checkpoint")
    tensors = {
        "model.encoder.conv1.weight": checkpoint.get("encoder/conv1/weight"),
        "model.encoder.conv1.bias": checkpoint.get("encoder/conv1/bias"),
        "model.encoder.conv2.weight": checkpoint.get("encoder/conv2/weight"),
        "model.encoder.conv2.bias": checkpoint.get("encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": checkpoint.get("encoder/position_encodings/encodings"),
        "model.decoder.embed_tokens.weight": checkpoint.get("decoder/embeddings/weight"),
        "model.decoder.embed_positions.weight": checkpoint.get("decoder/position_encodings/encodings"),
    }
    tensors |= _layer_norm(checkpoint, "encoder/layer_norm", "model.encoder.layer_norm")
    tensors |= _layer_norm(checkpoint, "decoder/layer_norm", "model.decoder.layer_norm")
    for index in range(config.encoder_layers):
        tensors |= _layer(checkpoint, "encoder", index)
    for index in range(config.decoder_layers):
        tensors |= _layer(checkpoint, "decoder", index)
    # A copy each: CTranslate2 stores identical variables once (as aliases) and the fused splits are
    # views, but safetensors refuses tensors that share memory.
    return {name: tensor.to(torch.float32, copy=True).contiguous() for name, tensor in tensors.items()}


# ---------------------------------------------------------------------------------------------
# Tokenizer, processor and generation config
# ---------------------------------------------------------------------------------------------

def special_token_ids(tokenizer_json: Path) -> dict[str, int]:
    """Token -> id of every added token in a Whisper ``tokenizer.json``.

    Raises:
        KdforgeError: one of Whisper's control tokens is missing.
    """
    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
    ids = {token["content"]: token["id"] for token in added}
    missing = [token for token in REQUIRED_SPECIAL_TOKENS if token not in ids]
    if missing:
        raise KdforgeError(f"{tokenizer_json} lacks Whisper's special tokens {missing}: not a Whisper tokenizer")
    return ids


def _timestamp_tokens(first_id: int, vocab_size: int) -> list[str]:
    """``<|0.00|>``, ``<|0.02|>``, ... for the ids ``first_id .. vocab_size - 1`` (20 ms steps)."""
    return [f"<|{step * 0.02:.2f}|>" for step in range(vocab_size - first_id)]


def build_tokenizer(tokenizer_json: Path, vocab_size: int, multilingual: bool) -> WhisperTokenizer:
    """A Whisper tokenizer from CTranslate2's ``tokenizer.json``, covering the whole model vocabulary.

    Some exports leave out the 1501 timestamp tokens (``<|0.00|>`` .. ``<|30.00|>``) that follow
    ``<|notimestamps|>``; they are added back so that every id the model can emit decodes.
    The multilingual tokenizer's default prefix is English transcription.
    """
    with tempfile.TemporaryDirectory() as staging:
        shutil.copyfile(tokenizer_json, Path(staging) / TOKENIZER_FILE)
        tokenizer = WhisperTokenizer.from_pretrained(
            staging, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            **({"language": "english", "task": "transcribe"} if multilingual else {}))
    first_timestamp = tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1
    if len(tokenizer) == first_timestamp:
        tokenizer.add_tokens(_timestamp_tokens(first_timestamp, vocab_size))
    if len(tokenizer) != vocab_size:
        raise KdforgeError(f"{tokenizer_json} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}")
    return tokenizer


def build_generation_config(config: WhisperConfig, special_ids: dict[str, int], ct2_config: dict) -> GenerationConfig:
    """Greedy English transcription without timestamps as what plain ``generate`` does.

    English-only models are prompted ``<|startoftranscript|> <|notimestamps|>``; multilingual
    ones ``<|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>``. Suppressed tokens and
    alignment heads come from CTranslate2's ``config.json``.
    """
    multilingual = config.vocab_size >= MULTILINGUAL_MIN_VOCAB
    generation = GenerationConfig(
        decoder_start_token_id=special_ids["<|startoftranscript|>"],
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        max_length=config.max_target_positions,
        no_timestamps_token_id=special_ids["<|notimestamps|>"],
        prev_sot_token_id=special_ids["<|startofprev|>"],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        alignment_heads=ct2_config.get("alignment_heads"),
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    if multilingual:
        language_ids = ct2_config.get("lang_ids") or []
        id_to_token = {token_id: token for token, token_id in special_ids.items()}
        generation.lang_to_id = {id_to_token[token_id]: token_id for token_id in language_ids}
        generation.task_to_id = {"transcribe": special_ids["<|transcribe|>"], "translate": special_ids["<|translate|>"]}
        generation.language = "<|en|>"
        generation.task = "transcribe"
    return generation


def decoder_prompt(generation: GenerationConfig) -> list[int]:
    """The token ids that ``generate`` starts every transcript with under ``generation``."""
    prompt = [generation.decoder_start_token_id]
    if getattr(generation, "is_multilingual", False):
        prompt += [generation.lang_to_id[generation.language], generation.task_to_id[generation.task]]
    return prompt + [generation.no_timestamps_token_id]


# ---------------------------------------------------------------------------------------------
# The converter
# ---------------------------------------------------------------------------------------------

def convert_ct2_whisper(model_files: Sequence[Path], assets_dir: Path, out_dir: Path) -> Path:
    """Write a Hugging Face Whisper directory converted from a CTranslate2 checkpoint.

    Args:
        model_files: ``model.bin``, or its parts in order (they may lie in different folders).
        assets_dir: folder with CTranslate2's ``config.json`` and ``tokenizer.json``.
        out_dir: an empty or new directory; gets ``config.json``, ``model.safetensors``,
            ``generation_config.json``, the tokenizer files and ``processor_config.json``
            (the feature extractor).

    Returns:
        ``out_dir``.

    Raises:
        KdforgeError: unknown spec, quantised weights, truncated or malformed files.
    """
    tokenizer_json, ct2_config_json = assets_dir / TOKENIZER_FILE, assets_dir / "config.json"
    for required in (tokenizer_json, ct2_config_json):
        if not required.is_file():
            raise KdforgeError(f"{required} is missing: a CTranslate2 Whisper directory has "
                               "config.json and tokenizer.json")
    checkpoint = read_ct2_checkpoint(model_files)
    check_convertible(checkpoint)
    special_ids = special_token_ids(tokenizer_json)
    ct2_config = json.loads(ct2_config_json.read_text(encoding="utf-8"))
    config = whisper_config_from_checkpoint(checkpoint, special_ids, ct2_config)
    multilingual = config.vocab_size >= MULTILINGUAL_MIN_VOCAB
    tokenizer = build_tokenizer(tokenizer_json, config.vocab_size, multilingual)
    generation = build_generation_config(config, special_ids, ct2_config)
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    generation.save_pretrained(out_dir)
    save_file(hf_state_dict(checkpoint, config), out_dir / "model.safetensors", metadata={"format": "pt"})
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir

