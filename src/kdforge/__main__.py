"""``python -m kdforge`` (what ``torchrun ... -m kdforge`` runs)."""

from kdforge.cli import main

main()
