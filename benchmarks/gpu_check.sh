#!/usr/bin/env bash
# The whole GPU story in one command, for a GPU machine without internet:
#   build fastkd with its CUDA kernels, run the GPU tests, run the GPU benchmarks against peers
#   (torch eager, torch.compile, Liger-Kernel when importable), write logs and tables under OUT.
# Usage: benchmarks/gpu_check.sh [OUT]   (default: $OUT, else ./gpu_check_out)
# Peer wheels (liger-kernel) are installed from ./.whl when that folder holds them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $*"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } 2>&1 | tee "$OUT/machine.txt"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "peer wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastkd_peers .whl/*.whl \
    && export PYTHONPATH="/tmp/fastkd_peers${PYTHONPATH:+:$PYTHONPATH}"
fi

step "build (CUDA kernels for ${FASTKD_CUDA_ARCHS:=90a})"
export FASTKD_CUDA=ON FASTKD_CUDA_ARCHS CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; echo "build failed"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
python3 -m fastkd.cli info | tee "$OUT/build_info.json"

step "GPU tests (pytest -m \"gpu or triton\")"
python3 -m pytest -q -m "gpu or triton" tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "kd_loss benchmark: bf16, N=8192, V=128256"
python3 -m fastkd.cli bench kd_loss --device cuda --dtype bfloat16 --rows 8192 --vocab 128256 \
  --divergence fkl rkl jsd tvd --reps 10 --out "$OUT/bench_kd_loss.json" \
  --markdown "$OUT/bench_kd_loss.md" 2>&1 | tee "$OUT/bench_kd_loss.log" || status=1

# 8 cases, each compiling its torch.compile and Liger peers afresh: compiling, not the timed
# steps, dominates here, and 5 reps keep the step within a few minutes.
step "fused_linear_kd_loss benchmark: bf16, H=4096, V=128256, online teacher"
python3 -m fastkd.cli bench fused_linear_kd_loss --device cuda --dtype bfloat16 --hidden 4096 \
  --vocab 128256 --rows 1024 2048 4096 8192 --teacher online --divergence jsd fkl --beta 0.5 \
  --warmup 1 --reps 5 --out "$OUT/bench_fused_linear_kd_loss.json" \
  --markdown "$OUT/bench_fused_linear_kd_loss.md" 2>&1 \
  | tee "$OUT/bench_fused_linear_kd_loss.log" || status=1

step "sparse_kd_loss benchmark: bf16, N=8192, V=128256, 50 draws"
python3 -m fastkd.cli bench sparse_kd_loss --device cuda --dtype bfloat16 --rows 8192 \
  --vocab 128256 --reps 10 --out "$OUT/bench_sparse_kd_loss.json" \
  --markdown "$OUT/bench_sparse_kd_loss.md" 2>&1 | tee "$OUT/bench_sparse_kd_loss.log" || status=1

# sample_teacher has no CUDA kernel yet: on CUDA fastkd.sample_teacher runs the plain-PyTorch
# reference sampler (fastkd[torch] in the table), measured against softmax + torch.multinomial,
# the baseline a CUDA kernel would have to beat.
step "sample_teacher benchmark: fp32, N=8192, V=128256, 50 draws"
python3 -m fastkd.cli bench sample_teacher --device cuda --rows 8192 --vocab 128256 --reps 5 \
  --out "$OUT/bench_sample_teacher.json" --markdown "$OUT/bench_sample_teacher.md" 2>&1 \
  | tee "$OUT/bench_sample_teacher.log" || status=1

step "done (status $status); results in $OUT"
exit $status
