"""``kdforge import ct2-whisper|gguf``: convert a checkpoint file into a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import typer

from kdforge.models.prepare import import_ct2_whisper, import_gguf

app = typer.Typer(no_args_is_help=True, help="Convert foreign checkpoints into Hugging Face model folders.")

OUT_OPTION = typer.Option(..., "--out", help="New or empty folder for the Hugging Face model (never overwritten).")


@app.command("ct2-whisper")
def ct2_whisper_command(
    src: Path = typer.Argument(..., help="CTranslate2 / faster-whisper folder: model.bin (or model.bin.partN), "
                                         "config.json, tokenizer.json."),
    out: Path = OUT_OPTION,
) -> None:
    """A CTranslate2 Whisper checkpoint (float16/bfloat16/float32) -> WhisperForConditionalGeneration folder."""
    print(f"wrote {import_ct2_whisper(src, out)}")


@app.command("gguf")
def gguf_command(
    file: Path = typer.Argument(..., help="A GGUF causal language model file."),
    out: Path = OUT_OPTION,
) -> None:
    """A GGUF causal LM, dequantised -> float32 safetensors folder with tokenizer and chat template."""
    print(f"wrote {import_gguf(file, out)}")
