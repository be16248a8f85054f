#!/usr/bin/env bash
# Compile-checks the CUDA sources without a GPU: every .cu with nvcc for sm_75, sm_80 and sm_90a, with the
# defines torch's build adds to nvcc, and the torch binding (csrc/cuda/*.cpp) with the host compiler
# against the installed torch's headers. Usage: tools/nvcc_check.sh [python]  (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PY:-.venv/bin/python}}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do [[ -x "$c" ]] && NVCC="$c" && break; done
fi
[[ -n "$NVCC" ]] || { echo "nvcc_check: nvcc not found (set NVCC)" >&2; exit 1; }
# nvcc may be a wrapper script: ask it where its toolkit lives.
CUDA_TOP="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
CUDA_INC="$(readlink -f "${CUDA_TOP:-/usr/local/cuda/bin/..}")/include"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)

status=0
for cu in csrc/cuda/*.cu; do
  for arch in sm_75 sm_80 sm_90a; do  # sm_75: builds that list pre-Ampere GPUs must still compile
    if "$NVCC" -std=c++17 -O3 --use_fast_math -Icsrc "${TORCH_NVCC_DEFINES[@]}" \
        -gencode "arch=compute_${arch#sm_},code=${arch}" -Xptxas -warn-spills \
        -c "$cu" -o "$OUT/$(basename "$cu").$arch.o" 2> "$OUT/log"; then
      echo "nvcc ok   $cu ($arch)"
      grep -i "warning\|spill" "$OUT/log" | grep -v " 0 bytes spill" || true
    else
      cat "$OUT/log" >&2; echo "nvcc FAIL $cu ($arch)" >&2; status=1
    fi
  done
done

# The binding includes torch's CUDA headers; a CPU-only torch ships them too (without the generated
# CMake config header, hence C10_CUDA_NO_CMAKE_CONFIGURE_FILE).
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "nvcc_check: $PY cannot import torch; run 'make setup' first" >&2; exit 1
fi
mapfile -t TORCH_INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
INCS=(-Icsrc -I"$CUDA_INC" -I"$PY_INC")
for d in "${TORCH_INC[@]}"; do INCS+=(-I"$d"); done
for cpp in csrc/cuda/*.cpp; do
  if "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -Wno-unused-parameter -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
      -DQACONV_WITH_CUDA=1 "${INCS[@]}" "$cpp" 2> "$OUT/log"; then
    echo "c++ ok    $cpp (syntax, against torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  else
    cat "$OUT/log" >&2; echo "c++ FAIL  $cpp" >&2; status=1
  fi
done
exit $status
