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


def similarity_histogram(path: Path, histogram: dict, *, threshold: float, title: str) -> None:
    """Histogram of each instruction's highest ROUGE-L against the texts before it, from `pipeline.data.rouge.dedup`'s
    `histogram` dict: kept (blue) and dropped (red) per bin, stacked. Bins whose kept count is a sampled estimate
    are drawn lighter and hatched, with ±1 standard error, and the legend gives the sample size and seed."""
    plt = _pyplot()
    bins = histogram["bins"]
    lo = [b["lo"] for b in bins]
    width = [b["hi"] - b["lo"] for b in bins]
    kept = [b["kept"] for b in bins]
    est = histogram.get("estimate")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    exact = [i for i, b in enumerate(bins) if b["exact"]]
    guess = [i for i, b in enumerate(bins) if not b["exact"]]

    def pick(values, idx):
        return [values[i] for i in idx]

    ax.bar(pick(lo, exact), pick(kept, exact), width=[w * 0.9 for w in pick(width, exact)], align="edge",
           color="#3182bd", label="kept (exact)" if any(pick(kept, exact)) else None)
    if guess:
        label = "kept, sampled estimate"
        if est:
            label += f" ({est['sample']:,} of {est['population']:,} scored, seed {est['seed']}; ±1 s.e.)"
        ax.bar(pick(lo, guess), pick(kept, guess), width=[w * 0.9 for w in pick(width, guess)], align="edge",
               color="#c6dbef", edgecolor="#3182bd", hatch="///", linewidth=0.6, label=label)
        ax.errorbar([lo[i] + width[i] * 0.45 for i in guess], pick(kept, guess),
                    yerr=[bins[i].get("kept_stderr", 0.0) for i in guess], fmt="none", ecolor="#08306b",
                    elinewidth=0.8, capsize=2)
    ax.bar(lo, [b["dropped"] for b in bins], width=[w * 0.9 for w in width], align="edge", bottom=kept,
           color="#de2d26", label="dropped (exact)")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlim(0, 1)
    top = max([b["kept"] + b.get("kept_stderr", 0.0) for b in bins] + [b["kept"] + b["dropped"] for b in bins] + [1])
    ax.set_ylim(0, top * 1.08)
    ax.set_xlabel("highest ROUGE-L F against the earlier kept instructions")
    ax.set_ylabel("instructions")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    save(fig, path)


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
