"""kdforge: knowledge distillation of ensembles and large models into small students."""

__version__ = "0.1.0"
