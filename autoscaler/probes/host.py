"""Host probe: this process's resident memory against its cgroup limit (or a configured budget).

For CPU serving: the KV cache lives in host memory, and the cgroup limit is where the OOM killer strikes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from autoscaler.probes.base import MemoryReading, ProbeUnavailable

# cgroup v1 writes "no limit" as a huge page-aligned number (9223372036854771712); anything this big is none.
_NO_LIMIT = 1 << 60


class HostProbe:
    """`used` = resident set size of this process; `total` = the smallest of the cgroup memory limits that
    apply, the configured budget, and (only when neither exists) the machine's MemTotal.

    Limits are read once, at construction (they do not change under a running replica); each `read` is
    one small file read. All paths are injectable for tests.
    """

    name = "host"

    sees_whole_cache = True  # reads the device (or process), so it sees the preallocated cache buffer

    def __init__(
        self,
        budget_bytes: int | None = None,
        statm_path: Path = Path("/proc/self/statm"),
        cgroup_limit_paths: Sequence[Path] | None = None,
        meminfo_path: Path = Path("/proc/meminfo"),
    ) -> None:
        self.statm_path = statm_path
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        paths = default_cgroup_limit_paths() if cgroup_limit_paths is None else cgroup_limit_paths
        limits = [v for v in (read_limit(p) for p in paths) if v is not None]
        if budget_bytes is not None:
            limits.append(budget_bytes)
        if not limits:
            mem_total = read_mem_total(meminfo_path)
            if mem_total is None:
                raise ProbeUnavailable(
                    "host probe: no cgroup memory limit, no memory_budget_bytes, no MemTotal"
                )
            limits.append(mem_total)
        self.total_bytes = min(limits)
        self.resident_bytes()  # fail at construction, not in the serving loop, if RSS cannot be read

    def resident_bytes(self) -> int:
        """Resident set size of this process: /proc/self/statm (field 2, in pages), else psutil."""
        try:
            return int(self.statm_path.read_text().split()[1]) * self._page_size
        except (OSError, IndexError, ValueError):
            pass
        try:
            import psutil
        except ImportError as e:
            raise ProbeUnavailable(
                f"host probe: cannot read {self.statm_path} and psutil is not installed"
            ) from e
        return int(psutil.Process().memory_info().rss)

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        return MemoryReading(
            used_bytes=self.resident_bytes(),
            total_bytes=self.total_bytes,
            engine_bytes=engine_bytes,
            source=self.name,
        )


def read_limit(path: Path) -> int | None:
    """A cgroup memory limit in bytes, or None when the file is absent, says "max", or is effectively unlimited."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max" (v2 unlimited) or anything unexpected
        return None
    value = int(text)
    return value if 0 < value < _NO_LIMIT else None


def read_mem_total(meminfo_path: Path) -> int | None:
    """MemTotal from /proc/meminfo, in bytes."""
    try:
        for line in meminfo_path.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, IndexError, ValueError):
        return None
    return None


def default_cgroup_limit_paths(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> list[Path]:
    """Limit files that may apply to this process: its own cgroup (v2 `0::/path`, v1 `N:memory:/path`), then
    the mount roots (inside a container the own path is often not visible and the root is the container)."""
    paths: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        own = parts[2].lstrip("/")
        if parts[0] == "0" and parts[1] == "":
            paths.append(root / own / "memory.max")
        elif "memory" in parts[1].split(","):
            paths.append(root / "memory" / own / "memory.limit_in_bytes")
    paths += [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    return paths
