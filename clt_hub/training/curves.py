"""Pictures of a training run: curves over steps, and per-layer quality bars (PNG, skipped without matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clt_hub.training.evaluate import DENSE_FRACTION, EvalReport


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_training(history: list[dict[str, float]], path: str | Path) -> Path | None:
    """Loss, NMSE, L0 and dead fraction against step, as one PNG (skipped without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return None
    if not history:
        return None
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key, title in zip(axes, ("loss", "fvu", "l0", "dead"),
                              ("loss", "FVU (unexplained variance)", "L0 (features per token and layer)",
                               "dead fraction"), strict=True):
        ax.plot(steps, [h[key] for h in history])
        ax.set_title(title)
        ax.set_xlabel("step")
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_layers(report: EvalReport, path: str | Path) -> Path | None:
    """Per-layer bars: FVU, L0, dead and dense fractions."""
    plt = _pyplot()
    if plt is None:
        return None
    layers = list(range(len(report.fvu)))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, values, title in zip(axes, (report.fvu, report.l0, report.dead_fraction, report.dense_fraction),
                                 ("FVU", "L0", "dead fraction", f"dense fraction (> {DENSE_FRACTION:.0%})"), strict=True):
        ax.bar(layers, values)
        ax.set_title(title)
        ax.set_xlabel("layer")
    fig.suptitle(f"CE recovered {report.ce_recovered:.3f}, next-token agreement {report.next_token_agreement:.3f}, "
                 f"KL {report.kl:.3f}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_runs(runs: dict[str, tuple[list[dict[str, float]], dict[str, Any] | None]], path: str | Path
              ) -> Path | None:
    """Training runs side by side: training FVU against step, and held-out FVU and dead fraction per layer
    (from each run's eval.json, when it has one). `runs` maps a label to (train_log rows, eval.json or None)."""
    plt = _pyplot()
    if plt is None or not runs:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    n = len(runs)
    for i, (label, (history, report)) in enumerate(runs.items()):
        axes[0].plot([h["step"] for h in history], [h["fvu"] for h in history], label=label)
        if report:
            for ax, key in ((axes[1], "fvu"), (axes[2], "dead_fraction")):
                values = report[key]
                ax.bar([l + (i - (n - 1) / 2) * 0.8 / n for l in range(len(values))], values, width=0.8 / n,
                       label=f"{label} (mean {sum(values) / len(values):.2f})")
    for ax, title, xlabel in ((axes[0], "training FVU", "step"), (axes[1], "held-out FVU", "layer"),
                              (axes[2], "dead on held-out text", "layer")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
