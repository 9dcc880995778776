#!/usr/bin/env bash
# The main job, on a fresh machine: sets up .venv (idempotent), then fine-tunes.
# With no arguments: SmolLM2-135M-Instruct in 4 bits + LoRA on the chitchat conversations
# (outputs in runs/default); arguments go to scripts/train.py (see --help).
# The venv gets only what training needs: no extras (no torch) unless QLORA_JAX_EXTRAS names some,
# and on an NVIDIA machine jax's CUDA plugin (QLORA_JAX_ACCELERATOR=cpu|cuda12|cuda13 overrides;
# scripts/setup_env.sh). `bash scripts/run.sh --print-plan` prints that set-up plan and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=(.venv python3 "${QLORA_JAX_EXTRAS-}")
if [[ "${1:-}" == "--print-plan" ]]; then exec bash scripts/setup_env.sh --print-plan "${setup[@]}"; fi
bash scripts/setup_env.sh "${setup[@]}"
exec .venv/bin/python scripts/train.py "$@"
