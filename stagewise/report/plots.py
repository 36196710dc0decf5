"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so nothing touches
the process-wide backend or pyplot's figure registry: a report can be drawn from any
process (a notebook with an interactive backend included) and no figure is leaked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from stagewise.report.rundata import MIX_PREFIX, VAL_PREFIX, RunData, Stage

DPI = 110
WIDTH = 10.0  # inches: 1100 px, the width of the page's content column


def _new(height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})  # no version string: same bytes


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average; the first window-1 points average what exists so far."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _legend_below(ax) -> None:
    """Under the x label, in one row: every time plot keeps the same axes width, so steps line up."""
    handles, labels = ax.get_legend_handles_labels()
    ax.figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)


def _window(n: int) -> int:
    return max(1, n // 50)


def _time_axes(ax, run: RunData) -> None:
    """Every plot over steps spans the same steps, so the figures line up one under another."""
    mark_stages(ax, run.stages)
    first, last = run.records[0]["step"], run.records[-1]["step"]
    if last > first:
        ax.set_xlim(first, last)
    ax.set_xlabel("step")


def mark_stages(ax, stages: list[Stage]) -> None:
    """Dashed lines between stages, each stage's name at the top of its span, alternate spans shaded."""
    if not stages:
        return
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for k, st in enumerate(stages):
        left = st.first_step - 0.5 if k else st.first_step
        right = st.last_step + 0.5 if k + 1 < len(stages) else st.last_step
        if k % 2:
            ax.axvspan(left, right, color="0.5", alpha=0.08, lw=0)
        if k:
            ax.axvline(left, color="0.25", ls="--", lw=1)
        ax.text((left + right) / 2, 0.98, st.name, transform=top, ha="center", va="top", fontsize=9,
                color="0.2", clip_on=True, bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))


def domain_colors(domains: list[str]) -> dict[str, object]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {d: cmap(i % 10) for i, d in enumerate(domains)}


def plot_loss(run: RunData, path: Path) -> None:
    fig, ax = _new(3.6)
    steps, loss = run.series("loss")
    w = _window(len(loss))
    ax.plot(steps, loss, color="tab:blue", alpha=0.3 if w > 1 else 1.0, lw=0.8, label="train loss")
    if w > 1:
        ax.plot(steps, smooth(loss, w), color="tab:blue", lw=1.6, label=f"train loss, mean of last {w} steps")
    vs, vl = run.series("val_loss")
    if vs:
        ax.plot(vs, vl, "o-", color="tab:orange", ms=4, lw=1.2, label="validation loss")
    if len(loss) >= 40:  # the first steps (loss near ln(vocab)) would flatten everything after them
        tail = np.asarray(loss[len(loss) // 20:] + vl)
        ax.set_ylim(tail.min() - 0.05 * np.ptp(tail) - 1e-3, tail.max() + 0.15 * np.ptp(tail) + 1e-3)
    _time_axes(ax, run)
    ax.set_ylabel("loss (nats/token)")
    _legend_below(ax)
    _save(fig, path)


def plot_lr(run: RunData, path: Path) -> None:
    fig, ax = _new(2.6)
    steps, lr = run.series("lr")
    ax.plot(steps, lr, color="tab:green", lw=1.5)
    ax.set_ylim(0, max(lr) * 1.15 if lr else 1)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _time_axes(ax, run)
    ax.set_ylabel("learning rate")
    _save(fig, path)


def plot_val_domains(run: RunData, path: Path, colors: dict) -> None:
    fig, ax = _new(3.8)
    for d in run.keys_with(VAL_PREFIX):
        s, v = run.series(VAL_PREFIX + d)
        ax.plot(s, v, "o-", ms=3.5, lw=1.4, color=colors.get(d), label=d)
    _time_axes(ax, run)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # room for the stage names
    ax.set_ylabel("validation loss (nats/token)")
    _legend_below(ax)
    _save(fig, path)


def plot_mixture(run: RunData, path: Path, colors: dict) -> int:
    """Stacked realised mixture (smoothed within each stage) and the replay fraction. Returns the window."""
    fig, ax = _new(3.4)
    domains = run.keys_with(MIX_PREFIX)
    recs = [r for r in run.records if any(MIX_PREFIX + d in r for d in domains)]
    steps = np.array([r["step"] for r in recs])
    stage_of = np.array([r.get("stage", 0) for r in recs])
    w = _window(len(recs))

    def per_stage(values, stage) -> np.ndarray:  # smoothing never mixes two stages' proportions
        v = np.asarray(values, dtype=float)
        out = np.empty_like(v)
        for s in np.unique(stage):
            m = stage == s
            out[m] = smooth(v[m], w)
        return out

    ys = [per_stage([float(r.get(MIX_PREFIX + d) or 0.0) for r in recs], stage_of) for d in domains]
    ax.stackplot(steps, ys, labels=domains, colors=[colors.get(d) for d in domains], alpha=0.75, lw=0)
    rs, rv = run.series(run.replay_key) if run.replay_key else ([], [])
    if rs:
        keep = np.isin(steps, rs)
        replay = dict(zip(rs, rv))
        ax.plot(steps[keep], per_stage([replay[s] for s in steps[keep]], stage_of[keep]), color="black", lw=1.6,
                label="replay fraction")
    _time_axes(ax, run)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("fraction of sequences")
    _legend_below(ax)
    _save(fig, path)
    return w


def plot_forgetting(run: RunData, path: Path) -> None:
    """L[i][j] as a heatmap, every cell annotated; null cells grey."""
    f = run.forgetting
    m = np.array([[np.nan if v is None else v for v in row] for row in f.matrix], dtype=float)
    rows, cols = m.shape
    fig = Figure(figsize=(min(WIDTH, 2.2 + 1.3 * cols), 1.4 + 0.55 * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis_r", aspect="auto")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("loss (nats/token)")
    finite = m[np.isfinite(m)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(rows):
        for j in range(cols):
            v = m[i, j]
            text, color = ("—", "0.3") if np.isnan(v) else (f"{v:.3f}", "white" if v > mid else "black")
            ax.text(j, i, text, ha="center", va="center", fontsize=10, color=color)
    ax.set_xticks(range(cols), f.domains)
    ax.set_yticks(range(rows), [f"after {s}" for s in f.stages])
    ax.set_xlabel("evaluated on domain")
    ax.tick_params(length=0)
    _save(fig, path)


def plot_life_table(run: RunData, path: Path) -> None:
    """forgetting.json's table as a heatmap: each cell's value and, in brackets, how far it is worse than
    the column's best so far; the colour is that forgetting relative to the best (0: at its best)."""
    t = run.forgetting.table
    vals = np.array([[np.nan if v is None else v for v in row] for row in t["values"]], dtype=float)
    drop = np.array([[np.nan if v is None else v for v in row] for row in t["forgetting"]], dtype=float)
    best = np.full_like(vals, np.nan)
    for j, c in enumerate(t["columns"]):
        for i in range(vals.shape[0]):
            seen = vals[:i + 1, j][np.isfinite(vals[:i + 1, j])]
            if seen.size:
                best[i, j] = seen.max() if c.get("higher_is_better") else seen.min()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(best) > 0, drop / np.abs(best), np.where(np.isfinite(drop), 0.0, np.nan))
    rows, cols = vals.shape
    fig = Figure(figsize=(min(WIDTH, 2.4 + 1.45 * cols), 1.5 + 0.55 * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")
    im = ax.imshow(np.ma.masked_invalid(rel), cmap="Reds", aspect="auto", vmin=0, vmax=max(0.05, np.nanmax(rel)
                                                                                            if np.isfinite(rel).any() else 0))
    fig.colorbar(im, ax=ax, pad=0.02).set_label("worse than best so far (fraction)")
    for i in range(rows):
        for j, c in enumerate(t["columns"]):
            if np.isnan(vals[i, j]):
                ax.text(j, i, "—", ha="center", va="center", fontsize=9, color="0.3")
                continue
            pct = c["key"].startswith("exact_match")
            text = f"{vals[i, j]:.1%}\n(-{drop[i, j]:.1%})" if pct else f"{vals[i, j]:.3f}\n(+{drop[i, j]:.3f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(cols), [c["key"].replace("/", "\n") for c in t["columns"]], fontsize=8)
    ax.set_yticks(range(rows), [f"after {s}" for s in run.forgetting.stages])
    ax.tick_params(length=0)
    _save(fig, path)


def plot_life_curves(run: RunData, path: Path) -> None:
    """Every column of the table over the whole run, one panel each, with the stage boundaries."""
    cols = run.forgetting.table["columns"]
    n = len(cols)
    ncol = 3 if n > 4 else 2
    nrow = -(-n // ncol)
    fig = Figure(figsize=(WIDTH, 2.3 * nrow), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for k, c in enumerate(cols):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        pts = [(r["step"], r[c["key"]]) for r in run.records if c["key"] in r]
        if pts:
            ax.plot(*zip(*pts), marker=".", ms=3, lw=1.2)
        _time_axes(ax, run)
        ax.grid(True, alpha=0.3)
        ax.set_title(c["key"] + (" (higher is better)" if c.get("higher_is_better") else " (lower is better)"),
                     fontsize=9)
        for t in ax.texts:
            t.set_fontsize(7)
    _save(fig, path)
