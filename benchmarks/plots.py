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
