"""Real checkpoints as Hugging Face models: loading options, preparation and importers."""
