"""Sparse vs. dense latency per visual-context length, from a latency benchmark result
(:func:`vpstudy.bench.results.load_latency_results`)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..bench.results import LatencyResult

DEFAULT_BENCH_DIR = "bench/results"


def fig_latency(result: LatencyResult) -> Figure:
    """Sparse latency as % of dense per visual-context length (horizontal bars), decode and
    total side by side; each bar labelled with its seconds and speedup over dense. A
    ``roofline_decode_s`` is marked with a diamond on the decode panel."""
    rows = result.rows
    lengths = sorted(rows["visual_tokens"].unique())
    methods = [m for m in dict.fromkeys(rows["method"]) if m != "dense"]
    colors = colormaps["viridis"](np.linspace(0.2, 0.8, max(len(methods), 1)))
    height = 0.8 / max(len(methods), 1)
    panels = (("decode_s", "Decode"), ("total_s", "Total (prefill + decode)"))
    dense = rows[rows["method"] == "dense"].set_index("visual_tokens")
    metrics = [metric for metric, _ in panels]
    shares = rows[metrics].to_numpy() / dense.loc[rows["visual_tokens"], metrics].to_numpy()  # [rows, 2]
    widest = 100 * max(1.0, float(np.nanmax(shares)))  # x range: the slowest bar, at least dense
    figure = Figure(figsize=(11.0, 2.2 + 1.0 * len(lengths) * max(len(methods), 1) ** 0.5), layout="constrained")
    for p, (metric, title) in enumerate(panels):
        ax = figure.add_subplot(1, 2, p + 1)
        roofline_labelled = False
        for j, (method, color) in enumerate(zip(methods, colors, strict=False)):
            mine = rows[rows["method"] == method].set_index("visual_tokens")
            for i, n in enumerate(lengths):
                if n not in mine.index:
                    continue
                y = i + ((len(methods) - 1) / 2 - j) * height  # first method on top
                seconds = float(mine.loc[n, metric])
                share = seconds / float(dense.loc[n, metric])
                ax.barh(y, 100 * share, height, color=color, label=method if i == 0 else None)
                ax.text(100 * share + 1.5, y, f"{seconds:.2f} s ({1 / share:.2f}×)", va="center", fontsize=9)
                roof = mine.loc[n].get("roofline_decode_s") if metric == "decode_s" else None
                if roof is not None and np.isfinite(roof):
                    ax.plot(
                        100 * roof / dense.loc[n, metric],
                        y,
                        marker="D",
                        color="black",
                        markersize=5,
                        linestyle="none",
                        label=None if roofline_labelled else "roofline (ideal)",
                    )
                    roofline_labelled = True
        ax.axvline(100, color="gray", linestyle="--", linewidth=1)
        ticks = [f"{n:,} visual tokens\ndense {dense.loc[n, metric]:.2f} s" for n in lengths]
        ax.set_yticks(np.arange(len(lengths)), ticks)
        ax.set_xlim(0, widest + 55)  # room for the labels
        ax.set_xlabel(f"{title} latency (% of dense)")
        ax.set_title(title)
        if p == 0:
            handles, labels = ax.get_legend_handles_labels()
            figure.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    figure.suptitle(f"Sparse vs. dense latency on {result.device} ({result.path.name})")
    return figure
