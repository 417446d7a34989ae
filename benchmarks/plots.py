"""PNG plots of a comparison: throughput bars, batch occupancy and accounted memory over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"generate": "#7f7f7f", "hf-cb": "#bcbd22", "static": "#1f77b4", "orca": "#d62728", "baton": "#2ca02c",
          "baton-pd": "#9467bd"}


def _panels(n: int, height: float = 3.6) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, height), squeeze=False)
    return fig, list(axes[0])


def throughput(report: dict[str, Any], path: Path) -> None:
    workloads = report["workloads"]
    fig, axes = _panels(len(workloads))
    for ax, (name, w) in zip(axes, workloads.items(), strict=True):
        systems = list(w["systems"])
        tps = [w["systems"][s]["tokens_per_s"] for s in systems]
        bars = ax.bar(systems, tps, color=[COLORS.get(s, "#333333") for s in systems])
        for bar, s in zip(bars, systems, strict=True):
            ratio = w["systems"][s]["ratio_vs_baseline"]
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{name} ({w['summary']['requests']} requests)")
        ax.set_ylabel("useful output tokens / s")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Throughput (ratio to static-batch generate)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _over_time(report: dict[str, Any], path: Path, column: int, ylabel: str, title: str, scale: float = 1.0
               ) -> None:
    workloads = report["workloads"]
    fig, axes = _panels(len(workloads))
    for ax, (name, w) in zip(axes, workloads.items(), strict=True):
        for s, run in w["systems"].items():
            points = run.get("timeline") or []
            if not points:
                continue
            ax.step([p[0] for p in points], [p[column] * scale for p in points], where="post", label=s,
                    color=COLORS.get(s), linewidth=1.0)
        ax.set_title(name)
        ax.set_xlabel("seconds since the first arrival")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def occupancy(report: dict[str, Any], path: Path) -> None:
    _over_time(report, path, 1, "rows in the decode forward",
               "Batch occupancy per iteration (engine policies; finished-but-computed rows count for static)")


def memory(report: dict[str, Any], path: Path) -> None:
    _over_time(report, path, 2, "accounted MiB", "Engine accounted memory per iteration "
               "(KV window + prefilled pool + step transients; weights excluded)", scale=1 / 2**20)


HTTP_COLORS = {"baton": COLORS["baton-pd"], "plain": COLORS["generate"]}


def http_load(report: dict[str, Any], path: Path) -> None:
    """benchmarks/http_load.py: throughput bars (ratio to the plain deployment) and end-to-end latency
    percentiles, one bar group per percentile."""
    systems = report["systems"]
    names = list(systems)
    colors = [HTTP_COLORS.get(s, "#333333") for s in names]
    fig, (ax_t, ax_l) = _panels(2, height=4.0)
    labels = [f"{systems[s]['label']}\nother CPU {systems[s].get('other_cpu_cores', 0.0):.2f} cores" for s in names]
    bars = ax_t.bar(labels, [systems[s]["tokens_per_s"] for s in names], color=colors)
    for bar, s in zip(bars, names, strict=True):
        ratio = systems[s].get("ratio_vs_plain")
        failed = systems[s]["failed"]
        note = (f"{ratio:.2f}x" if ratio is not None else "") + (f"\n{failed} failed" if failed else "")
        if note:
            ax_t.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                          va="bottom", fontsize=8)
    m = report["meta"]
    ax_t.set_title(f"throughput ({m['requests']} requests, at most {m['concurrency']} in flight)")
    ax_t.set_ylabel("useful output tokens / s")
    quantiles = ("p50", "p90", "p99")
    width = 0.8 / max(1, len(names))
    for i, (s, color) in enumerate(zip(names, colors, strict=True)):
        e2e = systems[s]["latency"]["e2e_s"]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(quantiles))]
        ax_l.bar(xs, [e2e[q] or 0.0 for q in quantiles], width, label=systems[s]["label"], color=color)
    top = max((systems[s]["latency"]["e2e_s"][q] or 0.0 for s in names for q in quantiles), default=0.0)
    if top > 0:
        ax_l.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax_l.set_xticks(range(len(quantiles)), list(quantiles))
    ax_l.set_ylabel("end-to-end latency (s)")
    ax_l.set_title("latency percentiles (non-streaming)")
    ax_l.legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(f"HTTP load over Ray Serve: {m['model']}, {m['dtype']}, {m['threads']} torch threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


VS_VLLM_COLORS = {"vllm": "#ff7f0e", "baton": COLORS["baton-pd"]}


def vs_vllm(report: dict[str, Any], path: Path) -> None:
    """benchmarks/vs_vllm.py: useful tok/s, TTFT p50 and TPOT p50 per (mode, workload, dtype), ours beside vLLM's."""
    rows = report["rows"]
    groups = list(dict.fromkeys((r["mode"], r["workload"], r["dtype"]) for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    panels = (("useful output tokens / s", lambda r: r["tokens_per_s"]),
              ("TTFT p50 (s)", lambda r: r["latency"]["ttft_s"]["p50"]),
              ("TPOT p50 (ms)", lambda r: (r["latency"]["tpot_s"]["p50"] or 0.0) * 1e3))
    fig, axes = _panels(len(panels), height=4.2)
    width = 0.8 / max(1, len(systems))
    for ax, (ylabel, value) in zip(axes, panels, strict=True):
        for i, s in enumerate(systems):
            xs, ys, labels = [], [], []
            for j, g in enumerate(groups):
                row = next((r for r in rows if (r["mode"], r["workload"], r["dtype"]) == g and r["system"] == s), None)
                if row is None:
                    continue
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(value(row) or 0.0)
                labels.append(row)
            bars = ax.bar(xs, ys, width, label="vLLM" if s == "vllm" else "BATON", color=VS_VLLM_COLORS.get(s))
            if ylabel.startswith("useful"):
                for bar, row in zip(bars, labels, strict=True):
                    if row["ratio_vs_vllm"] is not None and s != "vllm":
                        ax.annotate(f"{row['ratio_vs_vllm']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                    bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(groups)), ["\n".join(g) for g in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("BATON vs vLLM (CPU): throughput ratio to vLLM on the bars")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
