"""The real Whisper checkpoints, converted from CTranslate2, against CTranslate2 itself.

Each checkpoint is prepared once per session into a temporary ``KDFORGE_HOME``. The reference is
``ctranslate2.models.Whisper`` running the original ``model.bin`` in float32 on the same log-mel
features: the converted encoder must reproduce its output and greedy decoding its transcripts.
Speech is eSpeak NG reading ten sentences in several voices (``kdforge.data.synth``).
"""

from __future__ import annotations

import re
import shutil

import ctranslate2
import jiwer
import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers import AutoProcessor, AutoTokenizer, WhisperForConditionalGeneration, WhisperProcessor

from kdforge.data.synth import Utterance, render
from kdforge.models.ct2_whisper import decoder_prompt
from kdforge.models.loading import load_whisper
from kdforge.models.prepare import MANIFEST, is_complete, prepare
from kdforge.models.registry import get_checkpoint

THREADS = 2
ENCODER_TOLERANCE = 2e-3
MIN_IDENTICAL_TRANSCRIPTS = 9
SHORT_AUDIO_CTX = 400
MAX_WER = 0.6  # eSpeak speech: tiny.en ~0.5, base ~0.4 (../shared/MODELS.md); garbage scores ~1
UTTERANCES = [
    ("en-us", "the quick brown fox jumps over the lazy dog"),
    ("en-gb-x-rp", "she opened the window and let the cold air in"),
    ("en-us+f3", "please call stella and ask her to bring these things with her"),
    ("en-us+m3", "the train to london leaves at seven in the morning"),
    ("en-gb-scotland", "my brother bought a new bicycle last summer"),
    ("en-us+f2", "we will meet at the library after lunch"),
    ("en-gb-x-rp+m1", "the children played in the garden until it was dark"),
    ("en-us-nyc", "can you tell me the way to the station"),
    ("en+f4", "the weather was warm and the sky was clear"),
    ("en-us+m5", "he wrote a long letter to his old friend"),
]

torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def models_home(tmp_path_factory):
    """A fresh ``KDFORGE_HOME`` for this test session (never the user's cache)."""
    return tmp_path_factory.mktemp("kdforge-home")


@pytest.fixture(scope="session")
def speech() -> list[np.ndarray]:
    """Ten utterances, ``(samples,)`` float32 at 16 kHz each."""
    # positional: index, split, speaker, text, rate (words/min), pitch (0-100), SNR (none), seed
    return [render(Utterance(index, "test", voice, text, 160, 50, None, 0))
            for index, (voice, text) in enumerate(UTTERANCES)]


def _ct2_reference_dir(name: str, tmp_path_factory) -> str:
    """A folder CTranslate2 can load for a registry checkpoint: parts concatenated into one model.bin."""
    model_files, assets_dir = get_checkpoint(name).source_paths()
    if len(model_files) == 1:
        return str(assets_dir)
    folder = tmp_path_factory.mktemp(f"ct2-{name}")
    with open(folder / "model.bin", "wb") as joined:
        for part in model_files:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, joined)
    for asset in assets_dir.iterdir():
        if asset.suffix in (".json", ".txt"):
            shutil.copy(asset, folder / asset.name)
    return str(folder)


def _normalise(text: str) -> str:
    """Lower case letters, apostrophes and single spaces: how a transcript is scored."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


class Comparison:
    """One checkpoint converted and run on the same features by both implementations.

    The ten utterances are compared at ``audio_ctx`` 400 (8 s windows, 800 mel frames; CTranslate2
    slices its position table the same way), which costs a quarter of the 30 s window; the first
    two utterances are also compared at the full 30 s window.
    """

    def __init__(self, name: str, home, speech: list[np.ndarray], tmp_path_factory):
        self.result = prepare(name, home=home)[0]
        reference = ctranslate2.models.Whisper(_ct2_reference_dir(name, tmp_path_factory), device="cpu",
                                               compute_type="float32", intra_threads=THREADS)
        self.full_model = WhisperForConditionalGeneration.from_pretrained(self.result.path).eval()
        self.full_processor = WhisperProcessor.from_pretrained(self.result.path)
        full_features = self.full_processor.feature_extractor(speech[:2], sampling_rate=16_000,
                                                              return_tensors="pt").input_features  # (2, n_mels, 3000)
        with torch.no_grad():
            self.full_encoded = self.full_model.get_encoder()(full_features).last_hidden_state  # (2, 1500, d_model)
        self.full_reference_encoded = _ct2_encode(reference, full_features)

        self.model, self.processor = load_whisper(self.result.path, audio_ctx=SHORT_AUDIO_CTX)
        features = self.processor.feature_extractor(speech, sampling_rate=16_000,
                                                    return_tensors="pt").input_features  # (10, n_mels, 800)
        with torch.no_grad():
            self.encoded = self.model.get_encoder()(features).last_hidden_state  # (10, 400, d_model)
            generated = self.model.generate(features, encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded))
        self.transcripts = self.processor.batch_decode(generated, skip_special_tokens=True)
        self.reference_encoded = _ct2_encode(reference, features)
        prompt = decoder_prompt(self.model.generation_config)
        results = reference.generate(ctranslate2.StorageView.from_array(self.reference_encoded.numpy()),
                                     [prompt] * len(speech), beam_size=1)
        self.reference_transcripts = [self.processor.tokenizer.decode(result.sequences_ids[0], skip_special_tokens=True)
                                      for result in results]


def _ct2_encode(reference: ctranslate2.models.Whisper, features: torch.Tensor) -> torch.Tensor:
    """CTranslate2's encoder output ``(batch, frames // 2, d_model)`` for ``(batch, n_mels, frames)``."""
    encoded = reference.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy())), to_cpu=True)
    return torch.from_numpy(np.array(encoded))


@pytest.fixture(scope="session")
def tiny(models_home, speech, tmp_path_factory) -> Comparison:
    return Comparison("whisper-tiny.en", models_home, speech, tmp_path_factory)


@pytest.fixture(scope="session")
def base(models_home, speech, tmp_path_factory) -> Comparison:
    return Comparison("whisper-base", models_home, speech, tmp_path_factory)


@pytest.fixture(params=["tiny", "base"])
def comparison(request) -> Comparison:
    return request.getfixturevalue(request.param)


def test_encoder_matches_ctranslate2(comparison):
    for ours, theirs in [(comparison.full_encoded, comparison.full_reference_encoded),
                         (comparison.encoded, comparison.reference_encoded)]:
        assert ours.shape == theirs.shape
        max_abs = (ours - theirs).abs().max().item()
        print(f"{comparison.result.name} encoder {tuple(ours.shape)}: max abs difference {max_abs:.2e}")
        assert max_abs < ENCODER_TOLERANCE


def test_greedy_transcripts_match_ctranslate2(comparison):
    identical = sum(ours == theirs for ours, theirs in zip(comparison.transcripts, comparison.reference_transcripts))
    print(f"{comparison.result.name}: {identical} of {len(UTTERANCES)} greedy transcripts identical")
    assert identical >= MIN_IDENTICAL_TRANSCRIPTS, list(zip(comparison.transcripts, comparison.reference_transcripts))
    # agreement on speech, not on garbage: the transcripts are mostly right
    references = [_normalise(text) for _, text in UTTERANCES]
    assert jiwer.wer(references, [_normalise(text) for text in comparison.transcripts]) < MAX_WER


def test_plain_generate_uses_the_english_prompt(tiny, base):
    assert decoder_prompt(tiny.model.generation_config) == [50257, 50362]
    assert decoder_prompt(base.model.generation_config) == [50258, 50259, 50359, 50363]
    # the fields transformers' Whisper generate builds its prompt from (no language detection)
    generation = base.model.generation_config
    assert (generation.language, generation.task, generation.is_multilingual) == ("<|en|>", "transcribe", True)
    assert generation.lang_to_id["<|en|>"] == 50259 and generation.task_to_id["transcribe"] == 50359
    assert not tiny.model.generation_config.is_multilingual
    assert not hasattr(tiny.model.generation_config, "lang_to_id")
    assert tiny.model.generation_config.eos_token_id == 50256 == tiny.model.generation_config.pad_token_id
    assert base.model.generation_config.eos_token_id == 50257 == base.model.generation_config.pad_token_id


def test_config_dimensions_come_from_the_weights(tiny, base):
    assert (tiny.model.config.vocab_size, tiny.model.config.d_model, tiny.model.config.encoder_layers,
            tiny.model.config.encoder_attention_heads) == (51864, 384, 4, 6)
    assert (base.model.config.vocab_size, base.model.config.d_model, base.model.config.decoder_layers,
            base.model.config.decoder_attention_heads) == (51865, 512, 6, 8)
    for comparison in (tiny, base):
        model = comparison.model
        assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
        assert len(comparison.processor.tokenizer) == model.config.vocab_size


def test_prepared_dir_loads_with_auto_classes_only(tiny):
    path = tiny.result.path
    assert type(AutoProcessor.from_pretrained(path)).__name__ == "WhisperProcessor"
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]) == \
        [50256, 50257, 50362]
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == 50363


def test_tokenizers_label_text_with_the_decoder_prompt(tiny, base):
    """Training labels start with the same prompt generation uses and end with eos."""
    for comparison in (tiny, base):
        labels = comparison.processor.tokenizer("hello world").input_ids
        prompt = decoder_prompt(comparison.model.generation_config)
        assert labels[:len(prompt)] == prompt
        assert labels[-1] == comparison.model.generation_config.eos_token_id


def test_prepare_is_idempotent_and_checksummed(tiny, models_home):
    path = tiny.result.path
    assert tiny.result.created
    stamps = {entry.name: entry.stat().st_mtime_ns for entry in path.iterdir()}
    again = prepare("whisper-tiny.en", home=models_home)[0]
    assert not again.created and again.path == path
    assert {entry.name: entry.stat().st_mtime_ns for entry in path.iterdir()} == stamps
    assert is_complete(path, verify_checksums=True)
    assert (path / MANIFEST).is_file()
    assert not [entry for entry in path.parent.iterdir() if entry.name.startswith(".")], "staging folder left behind"


def test_audio_ctx_keeps_the_first_positions(tiny):
    encoder = tiny.model.get_encoder()
    assert tiny.model.config.max_source_positions == encoder.max_source_positions == SHORT_AUDIO_CTX
    assert torch.equal(encoder.embed_positions.weight,
                       tiny.full_model.get_encoder().embed_positions.weight[:SHORT_AUDIO_CTX])
    assert tiny.processor.feature_extractor.nb_max_frames == 2 * SHORT_AUDIO_CTX
    assert tiny.encoded.shape == (len(UTTERANCES), SHORT_AUDIO_CTX, 384)  # the encoder took 800 mel frames


def test_registry_finds_files_without_importing_packages():
    model_files, assets_dir = get_checkpoint("whisper-base").source_paths()
    assert [path.name for path in model_files] == ["model.bin.part1", "model.bin.part2"]
    assert model_files[0].parent != model_files[1].parent  # two packages
    assert (assets_dir / "tokenizer.json").is_file()


def test_only_safetensors_and_no_shipped_code_are_ever_loaded(tiny_whisper, tmp_path):
    """A pickled .bin checkpoint, model code in the folder (auto_map), a broken or absent config:
    each is refused by name, before transformers reads anything, with one line and exit 2."""
    import json
    import shutil
    import subprocess
    import sys

    from kdforge.errors import KdforgeError
    from kdforge.models.loading import model_type_of

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_whisper, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    remote = tmp_path / "remote"
    shutil.copytree(tiny_whisper, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.Model"}}))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_whisper, broken)
    (broken / "config.json").write_text("{not json")
    expected = {pickled: "holds no *.safetensors weights; kdforge never loads pickled (.bin) weights",
                remote: "needs code shipped with the model (auto_map in config.json); kdforge never runs it",
                broken: "cannot read", tmp_path / "absent": "is not a model directory (no config.json)"}
    for folder, message in expected.items():
        with pytest.raises(KdforgeError, match=re.escape(message)):
            model_type_of(folder)
    import numpy as np
    import soundfile

    (tmp_path / "data").mkdir()
    soundfile.write(tmp_path / "data" / "a.wav", np.zeros(8000, dtype=np.float32), 16_000)
    (tmp_path / "data" / "metadata.csv").write_text("file_name,transcription\na.wav,hello\n")
    done = subprocess.run([sys.executable, "-m", "kdforge", "eval", "--model", str(pickled),
                           "--data", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"kdforge: error: {pickled} {expected[pickled]}"]
