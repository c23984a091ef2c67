"""Loss curves from run directories' ``metrics.jsonl``, drawn to a PNG (needs the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from .errors import CharlmError
from .files import atomic_write
from .training.metrics import RunMetrics, read_metrics

# What the x axis can show, and how to read it from a metrics record.
X_AXES = {
    "step": ("optimizer step", lambda record: record["step"]),
    "time": ("training time (minutes)", lambda record: record["elapsed"] / 60.0),
}


def run_curves(run: str | Path) -> RunMetrics:
    """A run's metrics, refused in one line when there is nothing to draw yet."""
    metrics = read_metrics(run)
    if not metrics.train and not metrics.val:
        raise CharlmError(f"{run} holds no loss records yet")
    return metrics


def plot_runs(runs: list[RunMetrics], out: str | Path, x_axis: str = "time", title: str | None = None) -> Path:
    """Validation loss (solid, with markers) and training loss (faint) of each run against ``x_axis``."""
    if x_axis not in X_AXES:
        raise CharlmError(f"--x must be one of {', '.join(X_AXES)}, got '{x_axis}'")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharlmError("plotting needs matplotlib; install it with: pip install 'charlm[plot]'") from None
    label, x_of = X_AXES[x_axis]
    out = Path(out)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        if run.train:
            ax.plot([x_of(r) for r in run.train], [r["loss"] for r in run.train], color=color, alpha=0.3, linewidth=1)
        if run.val:
            final = f", final {run.final_val_loss:.4f}" if run.final_val_loss is not None else ""
            ax.plot([x_of(r) for r in run.val], [r["val_loss"] for r in run.val], color=color, marker="o",
                    markersize=3, linewidth=1.8, label=f"{run.name} (validation{final})")
    # Early training losses (4+ nats) would flatten the part worth seeing: show ~0.7 nats above the best.
    val_losses = [r["val_loss"] for run in runs for r in run.val]
    all_losses = val_losses + [r["loss"] for run in runs for r in run.train]
    ax.set_ylim(min(all_losses) - 0.05, min(max(all_losses), min(val_losses or all_losses) + 0.7) + 0.02)
    ax.set_xlabel(label)
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title or "charlm: validation loss (solid) and training loss (faint)")
    ax.grid(True, alpha=0.3)
    if any(run.val for run in runs):
        ax.legend()
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda fh: fig.savefig(fh, format="png"))
    except OSError as err:
        raise CharlmError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return out
