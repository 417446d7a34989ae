"""The main job's Ray settings (configs/ray_env.py): what `scripts/run.sh` exports before `serve run` starts Ray,
and that Ray's workers then really run at the priority they give (a Ray started here, CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from configs.ray_env import DEFAULTS, main_job_env

REPO = Path(__file__).resolve().parents[2]


def test_the_defaults_apply_unless_the_environment_sets_them() -> None:
    assert main_job_env({}) == DEFAULTS
    assert main_job_env({"RAY_worker_niceness": "7"})["RAY_worker_niceness"] == "7"


def test_run_sh_exports_them_to_the_shell_that_runs_serve() -> None:
    """The very line scripts/run.sh evaluates, in a shell, with one variable set by the user beforehand."""
    line = next(line for line in (REPO / "scripts" / "run.sh").read_text().splitlines() if "configs.ray_env" in line)
    env = {**os.environ, "bin": str(Path(sys.executable).parent), "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "2",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_worker_niceness", None)
    done = subprocess.run(["bash", "-c", f'{line}; echo "$RAY_worker_niceness $RAY_SERVE_CONTROL_LOOP_INTERVAL_S"'],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == [DEFAULTS["RAY_worker_niceness"], "2"]


def test_ray_workers_started_with_them_run_at_that_priority(tmp_path: Path) -> None:
    script = (
        "import os, ray\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False, logging_level='ERROR')\n"
        "print('NICE', ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
    )
    env = {**os.environ, **main_job_env({}), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("NICE")]
    assert lines == [f"NICE {os.nice(0) + int(DEFAULTS['RAY_worker_niceness'])}"], done.stdout + done.stderr[-2000:]
