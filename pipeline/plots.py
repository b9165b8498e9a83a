"""PNG plots for reports (matplotlib, Agg backend, no timestamps or version in the file, so identical inputs
give byte-identical images and artifacts stay stable)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None}, bbox_inches="tight")
    _pyplot().close(fig)


def similarity_histogram(path: Path, kept: list[float | None], dropped: list[float], *, threshold: float,
                         floor: float, title: str) -> dict:
    """Histogram of each instruction's highest ROUGE-L against the texts before it. Scores at or below
    `floor` were not computed exactly and share one bar. Returns the counts that were drawn."""
    plt = _pyplot()
    width = 0.05
    edges = [floor]
    while edges[-1] < 1.0 - 1e-9:
        edges.append(min(1.0, round(edges[-1] + width, 10)))
    low_kept = sum(1 for s in kept if s is None)
    above_kept = [s for s in kept if s is not None]

    def counts(values):
        out = [0] * (len(edges) - 1)
        for v in values:
            i = next((k for k in range(len(edges) - 1) if v <= edges[k + 1]), len(edges) - 2)
            out[i] += 1
        return out

    kc, dc = counts(above_kept), counts(dropped)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([floor - width / 2], [low_kept], width=width * 0.9, color="#9ecae1", label=f"kept, at most {floor:.2f}")
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    ax.bar(mids, kc, width=width * 0.9, color="#3182bd", label="kept")
    ax.bar(mids, dc, width=width * 0.9, bottom=kc, color="#de2d26", label="dropped")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("highest ROUGE-L F against earlier instructions")
    ax.set_ylabel("instructions")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, path)
    return {"floor": floor, "at_most_floor": low_kept,
            "bins": [{"upper": b, "kept": k, "dropped": d} for b, k, d in zip(edges[1:], kc, dc)]}


def bar_chart(path: Path, labels: list[str], series: dict[str, list[float]], *, title: str, ylabel: str,
              errors: dict[str, list[tuple[float, float]]] | None = None, stacked: bool = False,
              colors: list[str] | None = None) -> None:
    """Grouped (or stacked) bars, one group per label, with optional (low, high) error bars per series."""
    plt = _pyplot()
    n = max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) * (1 if stacked else n) + 2), 4))
    width = 0.8 if stacked else 0.8 / n
    bottom = [0.0] * len(labels)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (0 if stacked else (k - (n - 1) / 2) * width) for i in range(len(labels))]
        yerr = None
        if errors and name in errors:
            yerr = [[v - lo for v, (lo, hi) in zip(values, errors[name])],
                    [hi - v for v, (lo, hi) in zip(values, errors[name])]]
        ax.bar(xs, values, width=width * 0.95, label=name, yerr=yerr, capsize=2,
               bottom=bottom if stacked else None, color=colors[k] if colors else None)
        if stacked:
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    save(fig, path)
