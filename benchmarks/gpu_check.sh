#!/usr/bin/env bash
# One call on a GPU machine (torch with CUDA, nvcc, ninja, no network): build the CUDA extension,
# run the op tests on CPU and GPU, run the GPU benchmarks (TLift, gallery scoring), print the table last.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (logs and JSON go to OUT_DIR, default a new folder
#                                                runs/bench/gpu-<date-time>; benchmarks/results to update the
#                                                committed JSON; on a lent machine pass the folder that comes back)
#   STEPS=build,tests bash benchmarks/gpu_check.sh   then   STEPS=bench ...   (two calls; the steps' time
#   limits add up to more than one 10-minute call: build ~2-3 min, tests <= 7, benchmarks <= 8)
set -uo pipefail
STEPS="${STEPS:-build,tests,bench}"
step() { [[ ",$STEPS," == *",$1,"* ]]; }
cd "$(dirname "$0")/.."
OUT="${1:-runs/bench/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QACONV_EXT_CUDA=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# Build for this GPU only (half the compile time of the default "8.0+PTX;9.0a"), into the repo's
# virtual environment, reusing the host's torch (tools/bootstrap.sh).
TORCH_CUDA_ARCH_LIST="$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")"
export TORCH_CUDA_ARCH_LIST
echo "gpu_check: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
PY=.venv/bin/python
if step build; then
  rm -f .venv/.qaconv-built qaconv_ext/_kernels*.so qaconv_ext/_build_info.json
  if ! make setup > "$OUT/gpu_build.log" 2>&1; then
    tail -60 "$OUT/gpu_build.log"; echo "gpu_check: build failed"; exit 1
  fi
  tail -3 "$OUT/gpu_build.log"
fi
$PY -c "import qaconv_ext.ops as o; assert o.native_available('cuda'), 'not built with CUDA: run the build step'" || exit 1
tests=0
bench=0

# Every step has its own time limit, so one slow step cannot take the others' results with it; each
# benchmark writes its own JSON.
if step tests; then
  # the op contract's cuda cases (test_ops*.py take the device as a parameter), then its cpu cases
  timeout 300 $PY -m pytest -q --maxfail=25 tests/test_cuda.py tests/test_tlift.py tests/test_engine.py \
    tests/test_ops.py tests/test_ops_fuzz.py -k "not test_ops or cuda" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  tests=${PIPESTATUS[0]}
  timeout 120 $PY -m pytest -q tests/test_ops.py tests/test_ops_fuzz.py -k "not cuda" 2>&1 | tail -3
fi
if step bench; then
  timeout 120 $PY benchmarks/bench_tlift.py --device cuda --json "$OUT/tlift_gpu.json" 2>&1 | tail -5
  timeout 180 $PY benchmarks/bench_gallery.py --sizes market --json "$OUT/gpu_gallery.json" 2>&1 \
    | tee "$OUT/gpu_bench.log" | tail -8
  bench=${PIPESTATUS[0]}
  timeout 180 $PY benchmarks/bench_gallery.py --sizes msmt --max-queries-fused 1024 --training-size 0 \
    --json "$OUT/gpu_gallery_msmt.json" 2>&1 | tee -a "$OUT/gpu_bench.log" | tail -6
fi
echo "gpu_check: tests rc=$tests bench rc=$bench"
[[ $tests -eq 0 && $bench -eq 0 ]]
