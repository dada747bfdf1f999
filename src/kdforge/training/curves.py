"""Training curves: every logged loss term and evaluation metric against the step, as one PNG, and
as TensorBoard event files (``DIR/tensorboard``) when the ``tensorboard`` package is installed."""

from __future__ import annotations

from pathlib import Path


def _plot_terms(axis, history: list[dict], title: str) -> None:
    """Every logged loss term of ``history`` against the step on ``axis`` (gradient norms are not losses)."""
    steps = [entry["step"] for entry in history]
    terms = [key for key in history[0] if key not in ("step", "lr", "eval") and not key.startswith("grad_norm/")] \
        if history else []
    for name in terms:
        axis.plot(steps, [entry.get(name) for entry in history], label=name)
    axis.set(xlabel="step", ylabel="loss", title=title)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)


def plot_history(history: list[dict], path: Path) -> None:
    """Left: the loss terms of every step; right: each evaluation metric where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, evaluations) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_terms(losses, history, "training loss terms")
    measured = [entry for entry in history if entry.get("eval")]
    for name in measured[0]["eval"] if measured else []:
        evaluations.plot([e["step"] for e in measured], [e["eval"][name] for e in measured], marker="o", label=name)
    evaluations.set(xlabel="step", title="evaluation")
    if evaluations.get_legend_handles_labels()[0]:
        evaluations.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_runs(histories: dict[str, list[dict]], path: Path) -> None:
    """One panel of loss terms per run (``name -> history``), side by side on a shared step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.8), sharex=True, squeeze=False)
    for axis, (name, history) in zip(axes[0], histories.items()):
        _plot_terms(axis, history, name)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


class TensorBoardLog:
    """Writes each history entry's scalars (``train/<term>``, ``eval/<metric>``, ``lr``) as it comes.

    Without the ``tensorboard`` package it does nothing. A resumed run starts the log at its
    checkpoint's step (``purge_step``), so TensorBoard drops what the interrupted run logged after it.
    """

    def __init__(self, folder: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: the PNG curves are always written
            self.writer = None
            return
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def log(self, entry: dict) -> None:
        if self.writer is None:
            return
        step = entry["step"]
        for name, value in entry.items():
            if name == "eval":
                for metric, score in value.items():
                    self.writer.add_scalar(f"eval/{metric}", score, step)
            elif name == "lr":
                self.writer.add_scalar("lr", value, step)
            elif name != "step":
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
