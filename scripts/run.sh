#!/usr/bin/env bash
# The main job: set up the environment if needed, then serve the default model with Ray Serve
# (OpenAI-compatible HTTP on http://127.0.0.1:8000; Ctrl-C stops it).
#   scripts/run.sh               serve_config.yaml in the foreground (`serve run`)
#   scripts/run.sh demo [args]   the engine alone answering a few chat prompts (python -m engine.demo)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bin="${BATON_VENV:-$root/.venv}/bin"
if [[ "${1:-}" == demo ]]; then
  shift
  exec "$bin/python" -m engine.demo "$@"
fi
export PATH="$bin:$PATH"
# Ray's worker priority and Serve's control-loop period for the local Ray `serve run` starts (configs/ray_env.py;
# a variable already set in the environment wins).
eval "$("$bin/python" -m configs.ray_env)"
exec "$bin/serve" run serve_config.yaml "$@"
