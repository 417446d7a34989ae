"""The Ray settings the main job (`scripts/run.sh`) starts its local Ray with, unless the environment sets them.

Measured on a 2-core machine serving the default model (benchmarks/NOTES.md, session 9): Ray starts its worker
processes, Serve's replicas included, at nice 15, below Ray's own daemons (dashboard, agents, log monitor, GCS) and
the HTTP clients at nice 0; the engine's two compute threads then lose their core to every one of them, and a thread
that loses its core holds up the other at the next barrier. Serve's controller checks its deployments every 0.1 s,
~12% of a core here. With workers at the same priority as everything else and the controller's loop at 0.5 s, our
Serve deployment served 85 tok/s against 76 without (5 alternating passes each, anyscale bf16, 16 in flight).

Direct ingress (Ray Serve's own mode, one of its "throughput optimized" settings): the ingress replica listens
on HTTP itself, so each streamed token crosses one process fewer. Serve's proxy took 0.11-0.15 of a core through
HTTP, and the engine's compute thread waited in the run queue 0.16 of the time instead of 0.09. Measured (bf16, 16 in
flight, a fresh Ray per pass, 3 passes each): chat 311-348 -> 378-390 tok/s, anyscale 225-244 -> 258-266.

These are environment variables read when Ray starts (`ray start`, or `serve run` starting a local Ray): on a running
cluster, export them before `ray start`. Python callers get them from `main_job_env()`.
"""

from __future__ import annotations

import os
import shlex

DIRECT_INGRESS_PORT = 8000  # where the first ingress replica on a node listens (serve_config.yaml's endpoint)


def ingress_port_env(port: int) -> dict[str, str]:
    """Serve's direct-ingress port range of exactly `port`."""
    return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}


DEFAULTS = {
    "RAY_worker_niceness": "0",  # Ray's default 15; 0 leaves the workers at the priority of whoever started Ray
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",  # Serve's default 0.1
    # Serve's direct ingress: the ingress replica serves HTTP itself, on a port from this range, and Serve's proxy
    # (then on the head node only, at http_options.port) is no longer on the path. One port, so that a replacement
    # of a killed ingress replica takes the same one (Serve's allocator would otherwise hand it the next while the
    # dead replica's is reclaimed): one ingress replica per node; widen the range for more.
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    **ingress_port_env(DIRECT_INGRESS_PORT),
    # A replacement ingress replica gets its port back at once (Serve's default holds a released port for 150 s,
    # for external load balancers; there is none here), and a stopping one waits only for its requests.
    "RAY_SERVE_PORT_QUARANTINE_S": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}


def main_job_env(environ: dict[str, str] | None = None, ingress_port: int | None = None) -> dict[str, str]:
    """DEFAULTS, each unless `environ` (default: this process's environment) sets it already; with
    `ingress_port`, the ingress replica listens there instead (a second Serve beside a running main job)."""
    environ = dict(os.environ) if environ is None else environ
    env = {name: environ.get(name, value) for name, value in DEFAULTS.items()}
    return env if ingress_port is None else {**env, **ingress_port_env(ingress_port)}


def main() -> None:
    """Print `export NAME=value` lines for a shell (`scripts/run.sh` evaluates them)."""
    for name, value in main_job_env().items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
