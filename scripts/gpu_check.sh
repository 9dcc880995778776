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
# Results: $OUT (or /tmp/qlora_gpu_check) gets gpu_check.log and each stage's .json/.md (bench, optimizer,
# attention, e2e, offload, plan, plan_bench).
#
# GPU_CHECK_STAGES picks the stages and their order (default "tests kernels optimizer attention", under
# 9.5 minutes). "tests": tests/kernels and tests/optim compiled for the GPU (-v: each verdict reaches the log
# even when the stage's timeout cuts it). "kernels": scripts/bench_kernels.py (the 4-bit matmul against bf16).
# "optimizer": scripts/bench_optimizer.py. "attention" runs tests/kernels/test_flash_attention.py (compiled
# Triton kernels on a GPU, interpret mode in the dry run; when both run, the "tests" stage leaves that file to
# it) with float32 dots at "highest" precision (IEEE: Pallas' Triton dots take TF32 inputs by default, the
# tests' float32 bounds do not allow for it), then scripts/bench_attention.py on Llama-3-8B's attention
# (pallas / chunked / reference / cuDNN, fwd+bwd, T = 1024, 4096, 16384, bf16), which stops starting rows
# 30 s before its end.
# "e2e" (scripts/bench.py: our QLoRA step against transformers + peft + bitsandbytes on a random-weights
# Llama-3-8B, and NF4 quantization speed; carry the bitsandbytes wheel in .whl, or its rows say unavailable).
# "offload" (scripts/bench.py ours-qlora against ours-qlora-offload: remat full against each layer's saved
# input in pinned_host, 8 layers of a random-weights Llama-3-8B, batch 1 x 8192; the goal is within 1.1x
# of remat full).
# "plan" (scripts/plan_curve.py in the background, many compiles at once on the machine's cores: the planner
# compiled for this GPU, Llama-3-8B's device bytes against sequence length for remat full, offload and
# offload + MLP tiles, interpolated to the max-context budgets; and the offload stage's two steps, whose
# measured peaks the summary divides by their plans). List it first so that it overlaps the others.
# Caps: GPU_TESTS_CAP (200 s), GPU_ATTN_TESTS_CAP (150 s), GPU_KERNELS_BUDGET_S (170 s); arguments:
# GPU_E2E_ARGS, GPU_OFFLOAD_ARGS, GPU_PLAN_ARGS, GPU_PLAN_JOBS (9).
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
  # -v: each test's verdict reaches the log as it finishes, also when the stage's timeout cuts it short
  tests=(-m "not oracle" -v --tb=short "$repo/tests/kernels" "$repo/tests/optim")
  bench=(--budget-s "${GPU_KERNELS_BUDGET_S:-170}")
  opt_bench=(--runs 5)
  attn_bench=(--preset llama3-8b --batch 1 --seq-lens 1024,4096,16384 --dtype bfloat16)
  attn_tests_cap=${GPU_ATTN_TESTS_CAP:-150} budget=${GPU_CHECK_BUDGET_S:-570}
fi

stages="${GPU_CHECK_STAGES:-tests kernels optimizer attention}"
tests_rc=0 bench_rc=0 opt_rc=0 e2e_rc=0 attn_rc=0 offload_rc=0 plan_rc=0
[[ " $stages " == *" attention "* ]] && tests+=(--ignore "$repo/tests/kernels/test_flash_attention.py")
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
# offload: the timed steps only (with the float32 residual stream and float32 LoRA terms beside them: their
# step-time and memory cost); the plan stage plans the first two steps (8 layers, 1 x 8192, r = 32) in parallel
read -r -a offload <<< "${GPU_OFFLOAD_ARGS:---model random:llama-3-8b --layers 8 --batch 1 --seq-len 8192 --rank 32 --steps 3 --no-plan}"
[[ "${1:-}" == "--dry-run" ]] && offload=(--model "$out/tiny" --batch 1 --seq-len 64 --rank 4 --steps 1)
# plan: the planner compiled for this machine, many plans at once (scripts/plan_curve.py): Llama-3-8B's curves
# for the max-context table, and the offload stage's two steps, whose measured peaks the summary divides by them
read -r -a plan_curve <<< "${GPU_PLAN_ARGS:---model llama-3-8b --rank 32 --optimizer fp32 --budgets 8,12,16,24,40,48,80,141 --variant full:8192,32768,131072 --variant offload:8192,65536,262144 --variant offload+tile4096:16384,131072,524288}"
plan_bench=(--model llama-3-8b --layers 8 --rank 32 --optimizer fp32 --variant full:8192 --variant offload:8192)
if [[ "${1:-}" == "--dry-run" ]]; then
  plan_curve=(--model smollm2-135m --rank 4 --optimizer fp32 --budgets 0.3 --variant full:128,256 --variant offload+tile64:128,256)
  plan_bench=(--model smollm2-135m --layers 2 --rank 4 --optimizer fp32 --variant full:64)
fi

# The repository root must not be on sys.path (its kernels/ is not qlora_jax.kernels): run from /tmp.
stage_tests() {
  echo "[gpu_check] kernel tests" | tee -a "$log"
  (cd /tmp && limit "${GPU_TESTS_CAP:-200}" "$python" -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" -p no:cacheprovider \
    "${tests[@]}" 2>&1) | tee -a "$log" | grep -v " PASSED" | tail -n 40
  tests_rc=${PIPESTATUS[0]}
}

stage_kernels() {
  echo "[gpu_check] benchmark" | tee -a "$log"
  (cd /tmp && limit 270 "$python" "$repo/scripts/bench_kernels.py" "${bench[@]}" \
    --json "$out/bench.json" --markdown "$out/bench.md" 2>&1) | tee -a "$log" > "$out/bench.stdout"
  bench_rc=${PIPESTATUS[0]}
}

stage_optimizer() {
  echo "[gpu_check] optimizer benchmark" | tee -a "$log"
  (cd /tmp && limit 100 "$python" "$repo/scripts/bench_optimizer.py" "${opt_bench[@]}" \
    --json "$out/optimizer.json" --markdown "$out/optimizer.md" 2>&1) | tee -a "$log" > "$out/optimizer.stdout"
  opt_rc=${PIPESTATUS[0]}
}

stage_attention() {
  echo "[gpu_check] flash attention tests" | tee -a "$log"
  (cd /tmp && limit "$attn_tests_cap" env JAX_DEFAULT_MATMUL_PRECISION=highest "$python" -m pytest -c "$repo/pyproject.toml" \
    --rootdir "$repo" -p no:cacheprovider -v --tb=short "$repo/tests/kernels/test_flash_attention.py" 2>&1) | tee -a "$log" | grep -v " PASSED" | tail -n 30
  attn_rc=${PIPESTATUS[0]}
  echo "[gpu_check] attention benchmark" | tee -a "$log"
  local t; t=$(left 240)  # the script starts no new row in its last 30 s
  (cd /tmp && limit 240 "$python" "$repo/scripts/bench_attention.py" "${attn_bench[@]}" --budget-s $((t - 30)) \
    --json "$out/attention.json" --markdown "$out/attention.md" 2>&1) | tee -a "$log" > "$out/attention.stdout"
  local rc=${PIPESTATUS[0]}
  ((attn_rc == 0)) && attn_rc=$rc
}

tiny_model() {
  [[ "${1:-}" == "--dry-run" && ! -d "$out/tiny" ]] || return 0
  "$python" -c "import sys; sys.path.insert(0, '$repo/tests'); from tinymodel import write_tiny_model; write_tiny_model('$out/tiny')"
}

stage_e2e() {
  echo "[gpu_check] end-to-end training step against the PyTorch stack" | tee -a "$log"
  tiny_model "$@"
  (cd /tmp && limit 540 "$python" "$repo/scripts/bench.py" "${e2e[@]}" --cache /tmp/qlora_bench_cache \
    --json "$out/e2e.json" --markdown "$out/e2e.md" 2>&1) | tee -a "$log" > "$out/e2e.stdout"
  e2e_rc=${PIPESTATUS[0]}
}

stage_offload() {
  echo "[gpu_check] activation offload and the precision options against remat full in bf16" | tee -a "$log"
  tiny_model "$@"
  (cd /tmp && limit 420 "$python" "$repo/scripts/bench.py" "${offload[@]}" \
    --variants ours-qlora,ours-qlora-offload,ours-qlora-res32,ours-qlora-res32-lora32 \
    --cache /tmp/qlora_bench_cache --json "$out/offload.json" --markdown "$out/offload.md" 2>&1) | tee -a "$log" > "$out/offload.stdout"
  offload_rc=${PIPESTATUS[0]}
}

# plan: started in the background (it only compiles: XLA's GPU preallocation is off in its processes), waited for
# at the end; its two plan_curve runs (the offload stage's two steps, and the curves) share the machine's cores.
plan_pid=""
stage_plan() {
  echo "[gpu_check] planner compiled here (background)" | tee -a "$log"
  local t; t=$(left 420)
  if ((t == 0)); then plan_rc=124; return; fi
  (cd /tmp
   timeout "$t" "$python" "$repo/scripts/plan_curve.py" "${plan_bench[@]}" --jobs 2 \
      --json "$out/plan_bench.json" --markdown "$out/plan_bench.md" > "$out/plan_bench.stdout" 2>&1 &
   timeout "$t" "$python" "$repo/scripts/plan_curve.py" "${plan_curve[@]}" --jobs "${GPU_PLAN_JOBS:-9}" \
      --json "$out/plan.json" --markdown "$out/plan.md" > "$out/plan.stdout" 2>&1
   rc2=$?; wait $!; rc1=$?; ((rc1 == 0)) && exit $rc2; exit $rc1) &
  plan_pid=$!
}

for stage in $stages; do
  case $stage in
    tests|kernels|optimizer|attention|e2e|offload|plan) "stage_$stage" "$@" ;;
    *) echo "[gpu_check] unknown stage '$stage' (tests kernels optimizer attention e2e offload plan)"; exit 2 ;;
  esac
done
if [[ -n $plan_pid ]]; then
  wait "$plan_pid"; plan_rc=$?
  cat "$out/plan_bench.stdout" "$out/plan.stdout" >> "$log" 2>/dev/null
fi
rm -rf "$out/tiny"

echo
echo "[gpu_check] stages: $stages; rc: tests=$tests_rc kernels=$bench_rc optimizer=$opt_rc attention=$attn_rc e2e=$e2e_rc offload=$offload_rc plan=$plan_rc (log: $log)"
if [[ -s "$out/e2e.md" ]]; then cat "$out/e2e.md"; echo; fi
if [[ -s "$out/offload.md" ]]; then cat "$out/offload.md"; echo; fi
if [[ -s "$out/offload.json" && -s "$out/plan_bench.json" ]]; then
  "$python" "$repo/scripts/plan_curve.py" --measured "$out/offload.json" "$out/plan_bench.json"; echo
fi
if [[ -s "$out/plan.md" ]]; then cat "$out/plan.md"; echo; elif [[ -f "$out/plan.stdout" ]]; then tail -n 15 "$out/plan.stdout"; echo; fi
if [[ -s "$out/optimizer.md" ]]; then cat "$out/optimizer.md"; echo; fi
if [[ -s "$out/attention.md" ]]; then cat "$out/attention.md"; echo; elif [[ -f "$out/attention.stdout" ]]; then tail -n 20 "$out/attention.stdout"; echo; fi
if [[ -s "$out/bench.md" ]]; then cat "$out/bench.md"; elif [[ -f "$out/bench.stdout" ]]; then tail -n 30 "$out/bench.stdout"; fi
[[ $tests_rc == 0 && $bench_rc == 0 && $opt_rc == 0 && $attn_rc == 0 && $e2e_rc == 0 && $offload_rc == 0 && $plan_rc == 0 ]]
