#!/usr/bin/env bash
# The one GPU check: kernel and optimizer tests run for real on the GPU, then the kernel
# benchmark and the optimizer benchmark; their tables are printed last. Sized for the H200
# of the device tool: every stage has a timeout, all together under 9.5 minutes.
#
#   bash scripts/gpu_check.sh            # on the GPU machine (device tool run)
#   bash scripts/gpu_check.sh --dry-run  # anywhere, no GPU: CPU, Pallas interpret mode, tiny shapes
#
# On the GPU machine nothing is installed from the network: the package is copied
# into a site folder (kernels/ as qlora_jax/kernels, as pyproject maps it) and any
# wheels under .whl/ are installed beside it. jax-triton (the optional "triton"
# backend) is such a wheel; fetch it here once, then name .whl in the run's carry:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl jax-triton==0.3.1
# Without it the triton rows say "unavailable" and everything else runs.
# Results: $OUT (or /tmp/qlora_gpu_check) gets gpu_check.log, bench.json/.md and optimizer.json/.md.
#
# GPU_CHECK_STAGES picks the stages (default "tests kernels optimizer", under 9.5 minutes);
# "e2e" (scripts/bench.py: our QLoRA step against transformers + peft + bitsandbytes on a
# random-weights Llama-3-8B, and NF4 quantization speed; carry the bitsandbytes wheel in .whl,
# or its rows say unavailable) is meant for a second call: GPU_CHECK_STAGES=e2e bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
out="${OUT:-/tmp/qlora_gpu_check}"
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
export PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--dry-run" ]]; then
  bash scripts/setup_env.sh .venv python3 test,oracle || exit 1
  python="$repo/.venv/bin/python"
  tests=(-m "not oracle" -x -q "$repo/tests/kernels/test_fused_matmul.py" "$repo/tests/kernels/test_dequantize_kernel.py"
         "$repo/tests/optim/test_offload.py")
  bench=(--tiny --budget-s 60)
  opt_bench=(--tiny)
else
  python=python3
  site=/tmp/qlora_site
  rm -rf "$site" && mkdir -p "$site/qlora_jax"
  cp -r qlora_jax/. "$site/qlora_jax/" && cp -r kernels "$site/qlora_jax/kernels"
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      || echo "[gpu_check] carried wheels failed to install; continuing without them"
  fi
  export PYTHONPATH="$site"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$log"
  tests=(-m "not oracle" -q "$repo/tests/kernels" "$repo/tests/optim")
  bench=(--budget-s 170)
  opt_bench=(--runs 5)
fi

stages=" ${GPU_CHECK_STAGES:-tests kernels optimizer} "
tests_rc=0 bench_rc=0 opt_rc=0 e2e_rc=0
# e2e on the GPU: a random-weights Llama-3-8B (all 32 layers, written once to /tmp, ~16 GB) in 4 bits on
# both stacks, and quantizing its projections; override with GPU_E2E_ARGS="..." (scripts/bench.py --help)
read -r -a e2e <<< "${GPU_E2E_ARGS:---model random:llama-3-8b --batch 4 --seq-len 512 --steps 5 --variants ours-qlora,torch-qlora,quant-ours,quant-bnb --quant-layers 4}"
[[ "${1:-}" == "--dry-run" ]] && e2e=(--model "$out/tiny" --batch 2 --seq-len 32 --rank 4 --steps 1
  --variants ours-qlora,torch-qlora,quant-ours,quant-bnb --quant-model smollm2-135m)

# The repository root must not be on sys.path (its kernels/ is not qlora_jax.kernels): run from /tmp.
if [[ $stages == *" tests "* ]]; then
echo "[gpu_check] kernel tests" | tee -a "$log"
(cd /tmp && timeout 200 "$python" -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" -p no:cacheprovider \
  "${tests[@]}" 2>&1) | tee -a "$log" | tail -n 25
tests_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *" kernels "* ]]; then
echo "[gpu_check] benchmark" | tee -a "$log"
(cd /tmp && timeout 270 "$python" "$repo/scripts/bench_kernels.py" "${bench[@]}" \
  --json "$out/bench.json" --markdown "$out/bench.md" 2>&1) | tee -a "$log" > "$out/bench.stdout"
bench_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *" optimizer "* ]]; then
echo "[gpu_check] optimizer benchmark" | tee -a "$log"
(cd /tmp && timeout 100 "$python" "$repo/scripts/bench_optimizer.py" "${opt_bench[@]}" \
  --json "$out/optimizer.json" --markdown "$out/optimizer.md" 2>&1) | tee -a "$log" > "$out/optimizer.stdout"
opt_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *" e2e "* ]]; then
echo "[gpu_check] end-to-end training step against the PyTorch stack" | tee -a "$log"
if [[ "${1:-}" == "--dry-run" ]]; then
  "$python" -c "import sys; sys.path.insert(0, '$repo/tests'); from tinymodel import write_tiny_model; write_tiny_model('$out/tiny')"
fi
(cd /tmp && timeout 540 "$python" "$repo/scripts/bench.py" "${e2e[@]}" --cache /tmp/qlora_bench_cache \
  --json "$out/e2e.json" --markdown "$out/e2e.md" 2>&1) | tee -a "$log" > "$out/e2e.stdout"
e2e_rc=${PIPESTATUS[0]}
rm -rf "$out/tiny"
fi

echo
echo "[gpu_check] stages:$stages rc: tests=$tests_rc kernels=$bench_rc optimizer=$opt_rc e2e=$e2e_rc (log: $log)"
if [[ -s "$out/e2e.md" ]]; then cat "$out/e2e.md"; echo; fi
if [[ -s "$out/optimizer.md" ]]; then cat "$out/optimizer.md"; echo; fi
if [[ -s "$out/bench.md" ]]; then cat "$out/bench.md"; elif [[ -f "$out/bench.stdout" ]]; then tail -n 30 "$out/bench.stdout"; fi
[[ $tests_rc == 0 && $bench_rc == 0 && $opt_rc == 0 && $e2e_rc == 0 ]]
