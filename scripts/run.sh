#!/usr/bin/env bash
# The main job, on a fresh machine: sets up .venv (idempotent), then runs it.
# Until the trainer lands this is the quantization report on Gaussian and real
# SmolLM2-135M weights; arguments are passed through (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv python3 test,oracle
exec .venv/bin/python scripts/quant_report.py "$@"
