#!/usr/bin/env bash
# The one GPU check: kernel and optimizer tests run for real on the GPU, then the kernel
# benchmark, the optimizer benchmark and the attention stage; their tables are printed last.
# Sized for the H200 of the device tool: every stage has a timeout, and each timeout is also
# cut to what is left of one 9.5-minute deadline (GPU_CHECK_BUDGET_S=570; 1800 in the dry run),
# so all together stay under 9.5 minutes; a stage with under 30 s left is skipped (rc 124).
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
# Results: $OUT (or /tmp/qlora_gpu_check) gets gpu_check.log, bench.json/.md, optimizer.json/.md
# and attention.json/.md.
#
# GPU_CHECK_STAGES picks the stages (default "tests kernels optimizer attention", under 9.5 minutes).
# "attention" runs tests/kernels/test_flash_attention.py (compiled Triton kernels on a GPU,
# interpret mode in the dry run; when both run, the "tests" stage leaves that file to it) with float32 dots at
# "highest" precision (IEEE: Pallas' Triton dots take TF32 inputs by default, the tests' float32
# bounds do not allow for it), then scripts/bench_attention.py on Llama-3-8B's attention
# (pallas / chunked / reference / cuDNN, fwd+bwd, T = 1024, 4096, 16384, bf16). It runs after the
# others and gets what the deadline leaves them (at most 150 s of tests and 240 s of benchmark,
# which stops starting rows 30 s before its end): nothing only if every earlier stage used its
# whole timeout (none has been timed on the H200 yet). Alone: GPU_CHECK_STAGES=attention.
# "e2e" (scripts/bench.py: our QLoRA step against transformers + peft + bitsandbytes on a
# random-weights Llama-3-8B, and NF4 quantization speed; carry the bitsandbytes wheel in .whl,
# or its rows say unavailable) is meant for a second call: GPU_CHECK_STAGES=e2e bash scripts/gpu_check.sh
# "offload" (scripts/bench.py ours-qlora against ours-qlora-offload: remat full against each layer's saved
# input in pinned_host, 8 layers of a random-weights Llama-3-8B, batch 1 x 8192; the goal is within 1.1x
# of remat full) fits the same second call: GPU_CHECK_STAGES="e2e offload".
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
  attn_bench=(--preset llama3-8b --tiny --interpret)
  attn_tests_cap=300 budget=${GPU_CHECK_BUDGET_S:-1800}  # interpret mode: ~110 s on 2 busy CPU cores; no device limit
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
  attn_bench=(--preset llama3-8b --batch 1 --seq-lens 1024,4096,16384 --dtype bfloat16)
  attn_tests_cap=150 budget=${GPU_CHECK_BUDGET_S:-570}
fi

stages=" ${GPU_CHECK_STAGES:-tests kernels optimizer attention} "
tests_rc=0 bench_rc=0 opt_rc=0 e2e_rc=0 attn_rc=0 offload_rc=0
[[ $stages == *" attention "* ]] && tests+=(--ignore "$repo/tests/kernels/test_flash_attention.py")
deadline=$((SECONDS + budget))
# left CAP: seconds for the next stage, CAP at most, or 0 when under 30 s of the deadline are left.
# limit CAP CMD...: CMD under that timeout; without running it (rc 124) when 0 is left.
left() { local l=$((deadline - SECONDS)); ((l > $1)) && l=$1; ((l < 30)) && l=0; echo "$l"; }
limit() {
  local t; t=$(left "$1"); shift
  if ((t == 0)); then echo "[gpu_check] skipped: the $budget s deadline is spent"; return 124; fi
  timeout "$t" "$@"
}
# e2e on the GPU: a random-weights Llama-3-8B (all 32 layers, written once to /tmp, ~16 GB) in 4 bits on
# both stacks, and quantizing its projections; override with GPU_E2E_ARGS="..." (scripts/bench.py --help)
read -r -a e2e <<< "${GPU_E2E_ARGS:---model random:llama-3-8b --batch 4 --seq-len 512 --steps 5 --variants ours-qlora,torch-qlora,quant-ours,quant-bnb --quant-layers 4}"
[[ "${1:-}" == "--dry-run" ]] && e2e=(--model "$out/tiny" --batch 2 --seq-len 32 --rank 4 --steps 1
  --variants ours-qlora,torch-qlora,quant-ours,quant-bnb --quant-model smollm2-135m)
read -r -a offload <<< "${GPU_OFFLOAD_ARGS:---model random:llama-3-8b --layers 8 --batch 1 --seq-len 8192 --rank 32 --steps 3}"
[[ "${1:-}" == "--dry-run" ]] && offload=(--model "$out/tiny" --batch 1 --seq-len 64 --rank 4 --steps 1)

# The repository root must not be on sys.path (its kernels/ is not qlora_jax.kernels): run from /tmp.
if [[ $stages == *" tests "* ]]; then
echo "[gpu_check] kernel tests" | tee -a "$log"
(cd /tmp && limit 200 "$python" -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" -p no:cacheprovider \
  "${tests[@]}" 2>&1) | tee -a "$log" | tail -n 25
tests_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *" kernels "* ]]; then
echo "[gpu_check] benchmark" | tee -a "$log"
(cd /tmp && limit 270 "$python" "$repo/scripts/bench_kernels.py" "${bench[@]}" \
  --json "$out/bench.json" --markdown "$out/bench.md" 2>&1) | tee -a "$log" > "$out/bench.stdout"
bench_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *" optimizer "* ]]; then
echo "[gpu_check] optimizer benchmark" | tee -a "$log"
(cd /tmp && limit 100 "$python" "$repo/scripts/bench_optimizer.py" "${opt_bench[@]}" \
  --json "$out/optimizer.json" --markdown "$out/optimizer.md" 2>&1) | tee -a "$log" > "$out/optimizer.stdout"
opt_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *" attention "* ]]; then
echo "[gpu_check] flash attention tests" | tee -a "$log"
(cd /tmp && limit "$attn_tests_cap" env JAX_DEFAULT_MATMUL_PRECISION=highest "$python" -m pytest -c "$repo/pyproject.toml" \
  --rootdir "$repo" -p no:cacheprovider -q "$repo/tests/kernels/test_flash_attention.py" 2>&1) | tee -a "$log" | tail -n 15
attn_rc=${PIPESTATUS[0]}
echo "[gpu_check] attention benchmark" | tee -a "$log"
t=$(left 240)  # the script starts no new row in its last 30 s
(cd /tmp && limit 240 "$python" "$repo/scripts/bench_attention.py" "${attn_bench[@]}" --budget-s $((t - 30)) \
  --json "$out/attention.json" --markdown "$out/attention.md" 2>&1) | tee -a "$log" > "$out/attention.stdout"
rc=${PIPESTATUS[0]}
((attn_rc == 0)) && attn_rc=$rc
fi

if [[ $stages == *" e2e "* ]]; then
echo "[gpu_check] end-to-end training step against the PyTorch stack" | tee -a "$log"
if [[ "${1:-}" == "--dry-run" ]]; then
  "$python" -c "import sys; sys.path.insert(0, '$repo/tests'); from tinymodel import write_tiny_model; write_tiny_model('$out/tiny')"
fi
(cd /tmp && timeout 540 "$python" "$repo/scripts/bench.py" "${e2e[@]}" --cache /tmp/qlora_bench_cache \
  --json "$out/e2e.json" --markdown "$out/e2e.md" 2>&1) | tee -a "$log" > "$out/e2e.stdout"
e2e_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *" offload "* ]]; then
echo "[gpu_check] activation offload: remat offload against remat full" | tee -a "$log"
if [[ "${1:-}" == "--dry-run" && ! -d "$out/tiny" ]]; then
  "$python" -c "import sys; sys.path.insert(0, '$repo/tests'); from tinymodel import write_tiny_model; write_tiny_model('$out/tiny')"
fi
(cd /tmp && timeout 300 "$python" "$repo/scripts/bench.py" "${offload[@]}" --variants ours-qlora,ours-qlora-offload \
  --cache /tmp/qlora_bench_cache --json "$out/offload.json" --markdown "$out/offload.md" 2>&1) | tee -a "$log" > "$out/offload.stdout"
offload_rc=${PIPESTATUS[0]}
fi
rm -rf "$out/tiny"

echo
echo "[gpu_check] stages:$stages rc: tests=$tests_rc kernels=$bench_rc optimizer=$opt_rc attention=$attn_rc e2e=$e2e_rc offload=$offload_rc (log: $log)"
if [[ -s "$out/e2e.md" ]]; then cat "$out/e2e.md"; echo; fi
if [[ -s "$out/offload.md" ]]; then cat "$out/offload.md"; echo; fi
if [[ -s "$out/optimizer.md" ]]; then cat "$out/optimizer.md"; echo; fi
if [[ -s "$out/attention.md" ]]; then cat "$out/attention.md"; echo; elif [[ -f "$out/attention.stdout" ]]; then tail -n 20 "$out/attention.stdout"; echo; fi
if [[ -s "$out/bench.md" ]]; then cat "$out/bench.md"; elif [[ -f "$out/bench.stdout" ]]; then tail -n 30 "$out/bench.stdout"; fi
[[ $tests_rc == 0 && $bench_rc == 0 && $opt_rc == 0 && $attn_rc == 0 && $e2e_rc == 0 && $offload_rc == 0 ]]
