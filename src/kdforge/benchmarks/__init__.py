"""Benchmarks behind ``kdforge bench ...``: each writes JSON + markdown and names the machine."""
