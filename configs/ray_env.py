"""The Ray settings the main job (`scripts/run.sh`) starts its local Ray with, unless the environment sets them.

Measured on a 2-core machine serving the default model (benchmarks/NOTES.md, session 9): Ray starts its worker
processes, Serve's replicas included, at nice 15, below Ray's own daemons (dashboard, agents, log monitor, GCS) and
the HTTP clients at nice 0; the engine's two compute threads then lose their core to every one of them, and a thread
that loses its core holds up the other at the next barrier. Serve's controller checks its deployments every 0.1 s,
~12% of a core here. With workers at the same priority as everything else and the controller's loop at 0.5 s, our
Serve deployment served 85 tok/s against 76 without (5 alternating passes each, anyscale bf16, 16 in flight).

These are environment variables read when Ray starts (`ray start`, or `serve run` starting a local Ray): on a running
cluster, export them before `ray start`. Python callers get them from `main_job_env()`.
"""

from __future__ import annotations

import os
import shlex

DEFAULTS = {
    "RAY_worker_niceness": "0",  # Ray's default 15; 0 leaves the workers at the priority of whoever started Ray
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",  # Serve's default 0.1
}


def main_job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """DEFAULTS, each unless `environ` (default: this process's environment) sets it already."""
    environ = dict(os.environ) if environ is None else environ
    return {name: environ.get(name, value) for name, value in DEFAULTS.items()}


def main() -> None:
    """Print `export NAME=value` lines for a shell (`scripts/run.sh` evaluates them)."""
    for name, value in main_job_env().items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
