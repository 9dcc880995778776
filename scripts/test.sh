#!/usr/bin/env bash
# Runs the whole test suite; sets up what it needs first (idempotent).
#   bash scripts/test.sh [extra pytest args]
# 1. Python 3.11 + jax 0.10.2 (what CI and most CPUs get), every test, oracles included:
#    bitsandbytes / torch are installed and oracle tests must not skip here.
# 2. When a Python 3.12 exists (pyenv 3.12.1 here): jax 0.11.2, the GPU machine's version,
#    on every test that needs no torch, so version drift shows up on the CPU; the e2e-marked
#    whole-script runs are left to the first pass (their parts run in both).
set -euo pipefail
cd "$(dirname "$0")/.."
# pytest, not `python -m pytest`: the latter puts the repository root on sys.path (see pyproject).
# Two pytest workers (QLORA_TEST_WORKERS), one test file each at a time: most tests are bound by
# XLA's single-threaded compile, so two processes on two cores take about 0.7x the time of one.
workers=(-n "${QLORA_TEST_WORKERS:-2}" --dist loadfile)

bash scripts/setup_env.sh .venv python3 test,oracle
QLORA_JAX_REQUIRE_ORACLES=1 .venv/bin/pytest -q "${workers[@]}" "$@"

py312=""
if command -v python3.12 >/dev/null 2>&1 && python3.12 --version >/dev/null 2>&1; then
  py312="python3.12"
elif command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 python3.12 --version >/dev/null 2>&1; then
  py312="python3.12"; export PYENV_VERSION=3.12.1
fi
if [[ -n "$py312" ]]; then
  echo "[test] second pass: $($py312 --version) with jax 0.11.2 (tests that need no torch)"
  bash scripts/setup_env.sh .venv312 "$(command -v $py312)" test 0.11.2
  .venv312/bin/pytest -q "${workers[@]}" -m "not oracle and not e2e" "$@"
else
  echo "[test] no Python 3.12 found: skipped the jax 0.11.2 pass"
fi
