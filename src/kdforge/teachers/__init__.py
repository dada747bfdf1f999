"""Teachers: the ensemble's combined distribution (and, with the ASR work, the offline cache)."""
