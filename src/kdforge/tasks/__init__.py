"""Recipes: what a batch is, how the student and teachers see it, for each task (lm; asr to come)."""
