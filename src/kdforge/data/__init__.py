"""Data kdforge makes or reads: real sentences, eSpeak NG speech, audio and audiofolders,
SpecAugment, and LM text (JSONL and the built-in corpus and arithmetic task)."""
