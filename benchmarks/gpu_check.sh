#!/usr/bin/env bash
# The whole GPU story in one command, for a GPU machine without internet:
#   build fastkd with its CUDA kernels, run the GPU tests, run the GPU benchmarks against peers
#   (torch eager, torch.compile, Liger-Kernel when importable), write logs and tables under OUT.
# Usage: benchmarks/gpu_check.sh [OUT] [STEPS]   (OUT default: $OUT, else ./gpu_check_out)
#   STEPS: a space-separated subset of
#   "build tests kd_loss fused_linear sparse sample sinkhorn uld xtok onpolicy distill"
#   (default: all), so that the story can be split over calls on one machine; steps after
#   "build" expect fastkd installed. Each benchmark step is cut off after STEP_TIMEOUT seconds.
# Peer wheels (liger-kernel, geomloss) are installed from ./.whl when that folder holds them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
STEPS=" ${2:-build tests kd_loss fused_linear sparse sample sinkhorn uld xtok onpolicy distill} "
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $*"; }
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
bench() { timeout "$STEP_TIMEOUT" python3 -m fastkd.cli bench "$@"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } 2>&1 | tee "$OUT/machine.txt"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "peer wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastkd_peers .whl/*.whl \
    && export PYTHONPATH="/tmp/fastkd_peers${PYTHONPATH:+:$PYTHONPATH}"
fi

if wanted build; then
  step "build (CUDA kernels for ${FASTKD_CUDA_ARCHS:=90a})"
  export FASTKD_CUDA=ON FASTKD_CUDA_ARCHS
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  start=$(date +%s)
  if ! python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"; echo "build failed"; exit 1
  fi
  echo "built in $(( $(date +%s) - start )) s"
fi
python3 -m fastkd.cli info | tee "$OUT/build_info.json"

if wanted tests; then
  step "GPU tests (pytest -m \"gpu or triton\")"
  python3 -m pytest -q -m "gpu or triton" tests -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -n 25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wanted kd_loss; then
  step "kd_loss benchmark: bf16, N=8192, V=128256"
  bench kd_loss --device cuda --dtype bfloat16 --rows 8192 --vocab 128256 \
    --divergence fkl rkl jsd tvd --reps 10 --out "$OUT/bench_kd_loss.json" \
    --markdown "$OUT/bench_kd_loss.md" 2>&1 | tee "$OUT/bench_kd_loss.log" || status=1
fi

# Each case compiles its torch.compile and Liger peers afresh, which dominates the step: two
# cases (BT = 8192 and a smaller one) keep it within a few minutes.
if wanted fused_linear; then
  step "fused_linear_kd_loss benchmark: bf16, H=4096, V=128256, online teacher, jsd"
  bench fused_linear_kd_loss --device cuda --dtype bfloat16 --hidden 4096 --vocab 128256 \
    --rows 2048 8192 --teacher online --divergence jsd --beta 0.5 --warmup 1 --reps 5 \
    --out "$OUT/bench_fused_linear_kd_loss.json" \
    --markdown "$OUT/bench_fused_linear_kd_loss.md" 2>&1 \
    | tee "$OUT/bench_fused_linear_kd_loss.log" || status=1
fi

if wanted sparse; then
  step "sparse_kd_loss benchmark: bf16, N=8192, V=128256, 50 draws"
  bench sparse_kd_loss --device cuda --dtype bfloat16 --rows 8192 --vocab 128256 --reps 10 \
    --out "$OUT/bench_sparse_kd_loss.json" --markdown "$OUT/bench_sparse_kd_loss.md" 2>&1 \
    | tee "$OUT/bench_sparse_kd_loss.log" || status=1
fi

# sample_teacher: every fastkd kernel available on CUDA (fastkd[cuda], the native kernel built in
# the "build" step, and fastkd[triton]; the plain-PyTorch sampler fastkd[torch] only where neither
# is), against softmax + torch.multinomial.
if wanted sample; then
  for dtype in bfloat16 float32; do
    step "sample_teacher benchmark: $dtype, N=8192, V=128256, 50 draws"
    bench sample_teacher --device cuda --dtype "$dtype" --rows 8192 --vocab 128256 --reps 5 \
      --out "$OUT/bench_sample_teacher_$dtype.json" \
      --markdown "$OUT/bench_sample_teacher_$dtype.md" 2>&1 \
      | tee "$OUT/bench_sample_teacher_$dtype.log" || status=1
  done
  # Priority sampling runs plain PyTorch on CUDA (fastkd[torch]).
  step "sample_teacher benchmark: priority k=64, bf16, N=2048, V=128256"
  bench sample_teacher --device cuda --dtype bfloat16 --method priority --k 64 --rows 2048 \
    --vocab 128256 --reps 3 --out "$OUT/bench_priority_sample.json" \
    --markdown "$OUT/bench_priority_sample.md" 2>&1 \
    | tee "$OUT/bench_priority_sample.log" || status=1
fi

# Two Sinkhorn regimes at eps = 0.05 to tol 1e-6: fastkd's cuda and triton kernels
# against its batched plain-PyTorch solver (backend torch) and GeomLoss (tensorized).
if wanted sinkhorn; then
  # The last shape is sinkd_loss's: one large problem, where backend "auto" picks torch on a
  # GPU (python/fastkd/ot/solver.py, _few_large_problems_on_gpu); the table shows whether the
  # one-CTA-per-problem kernels lose there.
  for shape in "4096 64" "256 512" "1 4096"; do
    set -- $shape
    step "sinkhorn benchmark: $1 problems of $2x$2, eps 0.05, tol 1e-6"
    bench sinkhorn --device cuda --batch "$1" --n "$2" --m "$2" --eps 0.05 --tol 1e-6 \
      --peers torch geomloss --reps 5 --out "$OUT/bench_sinkhorn_$1x$2.json" \
      --markdown "$OUT/bench_sinkhorn_$1x$2.md" 2>&1 | tee "$OUT/bench_sinkhorn_$1x$2.log" \
      || status=1
  done
fi

# Cross-tokenizer ULD at a Qwen2.5-sized student and a Llama-3-sized teacher: fastkd[triton]
# (torch.sort of chunks, the Triton kernel over sorted rows) against the published plain-PyTorch
# formulation, whose autograd holds fp32 probabilities, sorted copies and int64 indices (about
# 32 bytes per student element by count: over 20 GB at 4096 rows).
if wanted uld; then
  step "uld_loss benchmark: bf16, N=4096, V_s=151936, V_t=128256"
  bench uld_loss --device cuda --dtype bfloat16 --rows 4096 --vocab 151936 \
    --teacher-vocab 128256 --reps 5 --out "$OUT/bench_uld_loss.json" \
    --markdown "$OUT/bench_uld_loss.md" 2>&1 | tee "$OUT/bench_uld_loss.log" || status=1
fi

# Cross-tokenizer: the byte-offset alignment (align_spans, torch backend on the GPU, against TRL's
# GOLD aligner and a Python two-pointer loop on the CPU) and GOLD's merged-row losses at
# V_s = 151936, V_t = 128256 (ULD and the hybrid) against their plain-PyTorch formulation.
if wanted xtok; then
  step "xtok benchmark: alignment, GOLD losses at V_s=151936, V_t=128256"
  bench xtok --device cuda --reps 3 --out "$OUT/bench_xtok.json" \
    --markdown "$OUT/bench_xtok.md" 2>&1 | tee "$OUT/bench_xtok.log" || status=1
fi

# On-policy distillation's loss step at a Llama-3-sized head: the sampled tokens' log-probs from
# both heads (fused_linear_logprobs, Triton row kernel) with the k3 estimator, and the teacher's
# top-16 with the exact tail (fused_linear_topk, torch row math on chunks) into the fused sparse
# loss, against TRL's generalized_jsd_loss (beta 1: reverse KL) and log_softmax + gather on full
# logits; then fused_linear_topk alone against F.linear + torch.topk + logsumexp.
if wanted onpolicy; then
  step "on-policy loss step benchmark: bf16, N=8192, H=4096, V=128256"
  bench onpolicy --device cuda --dtype bfloat16 --rows 8192 --hidden 4096 --vocab 128256 \
    --k 16 --beta 1 --warmup 1 --reps 5 --out "$OUT/bench_onpolicy.json" \
    --markdown "$OUT/bench_onpolicy.md" 2>&1 | tee "$OUT/bench_onpolicy.log" || status=1
  step "fused_linear_topk benchmark: bf16, N=8192, H=4096, V=128256, k=16"
  bench fused_linear_topk --device cuda --dtype bfloat16 --rows 8192 --hidden 4096 \
    --vocab 128256 --k 16 --warmup 1 --reps 5 --out "$OUT/bench_fused_linear_topk.json" \
    --markdown "$OUT/bench_fused_linear_topk.md" 2>&1 \
    | tee "$OUT/bench_fused_linear_topk.log" || status=1
fi

# The trainer end to end at a GPU size: corpus, tokenizer, a Llama-style teacher of about 30M
# parameters trained from scratch, five students (CE, online fkl and jsd, two caches), bf16
# autocast; the table's training tokens/s are the GPU figures. Needs transformers.
if wanted distill; then
  step "fastkd demo --size medium"
  timeout "${DISTILL_TIMEOUT:-540}" python3 -m fastkd.cli demo --size medium \
    --out "$OUT/demo" --no-progress 2>&1 | tee "$OUT/demo.log" || status=1
  cp "$OUT"/demo/medium-seed0/results.md "$OUT/demo_results.md" 2>/dev/null || status=1
fi

step "done (status $status); results in $OUT"
exit $status
