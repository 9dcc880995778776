#!/usr/bin/env bash
# The main job, on a fresh machine: sets up .venv (idempotent), then fine-tunes.
# With no arguments: SmolLM2-135M-Instruct in 4 bits + LoRA on the chitchat conversations
# (outputs in runs/default); arguments go to scripts/train.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv python3 "${QLORA_JAX_EXTRAS-}"
exec .venv/bin/python scripts/train.py "$@"
