#!/usr/bin/env bash
# The main job: set up the environment if needed, then run the demo (the engine answering a few chat
# prompts with the default model). Arguments go to the demo, e.g. `scripts/run.sh --policy static`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec "${BATON_VENV:-$root/.venv}/bin/python" -m engine.demo "$@"
