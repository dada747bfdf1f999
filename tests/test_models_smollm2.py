"""SmolLM2-135M-Instruct: the prepared safetensors folder generates exactly what the GGUF file does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdforge.models.gguf_import import load_gguf_causal_lm, save_dequantised
from kdforge.models.registry import get_checkpoint

NEW_TOKENS = 10
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gguf_and_folder(tmp_path_factory):
    """The GGUF file loaded directly (model, tokenizer) and the folder written from that load.

    The folder is what ``prepare("smollm2-135m-instruct")`` writes (the same two steps: load the
    GGUF file, save it dequantised); sharing the load halves the test's time (~18 s per load).
    """
    gguf_file = get_checkpoint("smollm2-135m-instruct").source_paths()[0][0]
    model, tokenizer = load_gguf_causal_lm(gguf_file)
    folder = tmp_path_factory.mktemp("smollm2")
    save_dequantised(model, tokenizer, folder)
    return model, tokenizer, folder


def _greedy(model, input_ids: torch.Tensor) -> list[int]:
    """``NEW_TOKENS`` greedy continuation ids of ``input_ids`` ``(1, prompt_length)``."""
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, input_ids.shape[1]:].tolist()


def test_prepared_folder_generates_like_the_gguf_file(gguf_and_folder):
    reference, reference_tokenizer, folder = gguf_and_folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(reference, "hf_quantizer", None) is not None  # the reference really is the GGUF load

    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")["input_ids"]
    reference_prompt = reference_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True,
                                                               return_tensors="pt")["input_ids"]
    assert prompt.tolist() == reference_prompt.tolist()  # same chat template and vocabulary
    ours, theirs = _greedy(model, prompt), _greedy(reference, prompt)
    print(f"smollm2 greedy: {tokenizer.decode(ours)!r}")
    assert ours == theirs
    assert "Paris" in tokenizer.decode(ours)


def test_prepared_folder_is_plain_float(gguf_and_folder):
    prepared = gguf_and_folder[2]
    config = AutoModelForCausalLM.from_pretrained(prepared).config
    assert getattr(config, "quantization_config", None) is None
    assert config.tie_word_embeddings and config.vocab_size == 49152 and config.num_hidden_layers == 30
    assert (prepared / "model.safetensors").is_file()
    assert not list(prepared.glob("*.gguf")) and not list(prepared.glob("*.bin"))
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(prepared).chat_template
