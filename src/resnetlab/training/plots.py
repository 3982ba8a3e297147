"""Training curves drawn from ``metrics.jsonl`` records."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and error (100 - accuracy) per epoch, training dashed and validation solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key, style, label in (("train", "--", "training"), ("val", "-", "validation")):
        done = [r for r in history if r.get(f"{key}_loss") is not None]  # validation may skip epochs
        if not done:
            continue
        epochs = [r["epoch"] for r in done]
        ax_loss.plot(epochs, [r[f"{key}_loss"] for r in done], style, marker=".", label=label)
        ax_err.plot(epochs, [100 - r[f"{key}_acc"] for r in done], style, marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error")
    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
