#!/usr/bin/env bash
# What a session with a GPU runs (issue 7), in one command of under 10 minutes on one H100/H200:
#   bash benchmarks/gpu/gpu_session.sh [step|tests|all]      (results and logs under $OUT, default /tmp/kfac_gpu)
# Run it from the repository root.
# step:  builds kfac.ext with CUDA kernels (in the background), times ResNet-50 SGD vs K-FAC in float32 and bf16
#        autocast (benchmarks/gpu/gpu_step.py), eigh / Cholesky per linalg backend (benchmarks/gpu/gpu_eigh.py),
#        then runs the CUDA tests. (An --ext comparison doubles the K-FAC configurations: run it on its own.)
# tests: the whole test suite on this machine's torch (pytest-xdist when installed) and the fused-op benchmark
#        (benchmarks/cpu/fused_ops.py, which also times the CUDA kernels when a GPU is present).
set -u
OUT=${OUT:-/tmp/kfac_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu --format=csv
$PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

if [[ $what == step || $what == all ]]; then
  (time MAX_JOBS=4 timeout 400 $PY -m kfac.ext build --cuda) >"$OUT/ext_build.log" 2>&1 &
  build=$!
  timeout 240 $PY benchmarks/gpu/gpu_step.py --out-dir "$OUT" 2>&1 | tee "$OUT/gpu_step.log" | tail -n 25
  wait $build; tail -n 5 "$OUT/ext_build.log"
  $PY -m kfac.ext info
  timeout 240 $PY benchmarks/gpu/gpu_step.py --amp --out-dir "$OUT" 2>&1 | tee "$OUT/gpu_step_amp.log" | tail -n 25
  timeout 60 $PY benchmarks/gpu/gpu_eigh.py 577 2305 4609 2>&1 | tee "$OUT/gpu_eigh.log"
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py tests/unit/test_ext.py \
    tests/integration/test_gpu_step_benchmark.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -n 25
fi
if [[ $what == tests || $what == all ]]; then
  $PY -m kfac.ext info >/dev/null 2>&1 || true
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout 400 $PY -m pytest -q -p no:cacheprovider $xdist tests 2>&1 | tee "$OUT/pytest_all.log" | tail -n 30
  timeout 150 $PY benchmarks/cpu/fused_ops.py --threads 16 2>&1 | tee "$OUT/fused_ops.log" | tail -n 40
  cp benchmarks/cpu/results/fused_ops.json "$OUT/fused_ops_gpu.json"
  cp benchmarks/cpu/results/fused_ops.png "$OUT/fused_ops_gpu.png"
fi
