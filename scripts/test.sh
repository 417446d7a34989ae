#!/usr/bin/env bash
# Run the whole test suite: set up the environment if needed, then lint, type-check and test.
#   scripts/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
py="${BATON_VENV:-$root/.venv}/bin"
echo "[test] ruff"
"$py/ruff" check engine autoscaler deployments configs tests benchmarks
echo "[test] mypy"
"$py/mypy" engine autoscaler deployments configs benchmarks
echo "[test] pytest"
# Two xdist workers (tests/conftest.py schedules the Ray/Serve and timing tests on one, one at a time);
# BATON_TEST_WORKERS=0 runs everything in this process.
exec "$py/pytest" -q -p no:cacheprovider --durations=15 -n "${BATON_TEST_WORKERS:-2}" "$@"
