"""Figures more than one stage draws: the loss curve (written by `medmax train` for its own run
and by the report for any train_metrics file)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence


class PlotError(ValueError):
    """The rows to draw lack what the figure needs; the message says what."""


def loss_series(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Curves to draw from train_metrics rows: every numeric column whose name holds 'loss'.

    The x axis is 'step' (or 'global_step'); rows where a loss is null are skipped for that loss.
    When a 'split' column exists, each split gets its own curve.
    """
    if not rows:
        return {}
    step_col = next((c for c in ("step", "global_step") if c in rows[0]), None)
    if step_col is None:
        raise PlotError(f"train metrics have no step column (columns: {sorted(rows[0])})")
    loss_cols = [c for c, v in rows[0].items() if "loss" in c.lower()]
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for c in loss_cols:
            v = row.get(c)
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) and row.get(step_col) is not None:
                name = f"{c} ({row['split']})" if "split" in row and row["split"] else c
                xs, ys = curves.setdefault(name, ([], []))
                xs.append(float(row[step_col]))
                ys.append(float(v))
    return curves


def plot_loss(rows: Sequence[dict[str, Any]] | None, path: str | Path, why_missing: str = "") -> Path:
    """Loss curves of train_metrics rows (see loss_series), with the learning rate on a second axis
    when the rows have an 'lr' column; a placeholder saying why when there is nothing to draw.
    Used by `medmax train` for its own figure and by the report for any train_metrics file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    curves = loss_series(rows) if rows else {}
    if not curves:
        ax.text(0.5, 0.5, why_missing or "no loss values in the train metrics", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    for name, (xs, ys) in sorted(curves.items()):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 or name != "loss" else None, lw=1, label=name)
    if curves:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (response tokens)")
        handles, labels = ax.get_legend_handles_labels()
        lr = [(float(r["step"]), float(r["lr"])) for r in rows or () if r.get("lr") is not None and r.get("step") is not None]
        if lr:
            ax2 = ax.twinx()
            ax2.plot(*zip(*lr), color="grey", lw=0.8, ls="--", label="lr")
            ax2.set_ylabel("learning rate")
            more = ax2.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, loc="upper right")
        ax.set_title("LoRA training")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)  # atomic: a killed run leaves no half-written figure
    return path
