"""`GET /metrics` on the HTTP port: the BATON metrics every node exports, as one Prometheus text page.

Ray exports each process's metrics through its node's metrics agent, on a port of its own
(`ray_baton_*`, tagged with the deployment, replica and node). The ingress reads those pages from every
alive node and keeps the `ray_baton_` families, merged so that each family's `# HELP` / `# TYPE` appear
once with all its samples beneath, as the text format requires.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

import ray

PREFIX = "ray_baton_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def merge_families(pages: Iterable[str], prefix: str = PREFIX) -> str:
    """The families named `prefix*` of Prometheus text `pages`, merged: comments once, samples in order."""
    comments: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for page in pages:
        family = None
        for line in page.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family.startswith(prefix):
                    seen = comments.setdefault(family, [])
                    if line not in seen:
                        seen.append(line)
                    samples.setdefault(family, [])
            elif line and not line.startswith("#") and family is not None and family.startswith(prefix):
                if line.split("{", 1)[0].split(" ", 1)[0].startswith(family):
                    samples[family].append(line)
    return "".join("\n".join(comments[f] + samples[f]) + "\n" for f in comments)


def node_pages(timeout_s: float = 2.0) -> list[str]:
    """The metrics page of every alive node of this Ray cluster (a node that does not answer is skipped)."""
    pages = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - the cluster's own nodes
                pages.append(r.read().decode("utf-8", errors="replace"))
        except OSError:
            continue
    return pages
