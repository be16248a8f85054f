#!/usr/bin/env bash
# The distributions install and run outside the repository:
#  1. builds the sdist, then the wheel FROM that sdist (python -m build --no-isolation: one compile, and
#     proof that the sdist alone builds), with the build environment's torch;
#  2. installs the sdist (compiled again by pip, the way a user installs it) into a fresh virtual
#     environment that gets only torch (the build's exact version, --no-deps, never a resolver's pick),
#     torch's own requirements and the package's runtime dependencies (as the wheel declares them), then
#     the sdist with --no-deps, checked with `pip check` (the wheel's own installs, next to several torch
#     versions and without a compiler, are tools/wheel_check.sh's);
#  3. in a temporary folder outside the tree, imports qaconv_ext from that environment, checks that the
#     compiled CPU kernel loaded and compares qaconv_score / qaconv_match with qaconv_ext.reference;
#  4. checks that an isolated `pip install <sdist>` stops with the message naming --no-build-isolation.
# Usage: tools/check_dist.sh [python]   (default .venv/bin/python: the build environment, with torch)
#   KEEP_DIST_CHECK=1 keeps the work folder (printed) for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${1:-${PY:-.venv/bin/python}}"
CHECK=check_dist KEEP="${KEEP_DIST_CHECK:-0}"
source tools/check_common.sh

"$PY" -c "import torch" 2>/dev/null || fail "$PY cannot import torch; run 'make setup' first"
"$PY" -c "from build import ProjectBuilder" 2>/dev/null || run_logged "$WORK/pip-build.log" "$PY" -m pip install -q build
# The build's own torch, pinned exactly (local label included, e.g. 2.13.0+cpu) and installed with
# --no-deps, so no resolver can swap in another build (PyPI's Linux wheel is the CUDA one, GBs).
TORCH_VERSION="$("$PY" -c "import torch; print(torch.__version__)")"
BASE_PY="$("$PY" -c "import sys; print(getattr(sys, '_base_executable', sys.executable))")"
# What that torch requires (its metadata, extras left out): none of it depends on torch.
mapfile -t TORCH_REQS < <("$PY" -c "from importlib.metadata import requires
print('\n'.join(r for r in requires('torch') or [] if 'extra ==' not in r))")

# 1. sdist, then the wheel from the sdist.
step "building the sdist and, from it, the wheel (torch $TORCH_VERSION)"
run_logged "$WORK/build.log" "$PY" -m build --no-isolation --outdir "$WORK/dist" "$ROOT"
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "check_dist: built $(basename "$SDIST") and $(basename "$WHEEL")"
# The package's runtime dependencies as the wheel declares them (extras and torch left out).
mapfile -t RUNTIME_REQS < <("$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist:"):
        req = line.split(":", 1)[1].strip()
        if "extra ==" not in req and not req.replace("-", "_").lower().startswith("torch"):
            print(req)
EOF
)
tar -tzf "$SDIST" > "$WORK/sdist-files.txt"
missing=()
while IFS= read -r f; do
  grep -qxF "$(basename "$SDIST" .tar.gz)/$f" "$WORK/sdist-files.txt" || missing+=("$f")
done < <(find csrc -type f ! -name '*.o' | sort; printf '%s\n' README.md LICENSE setup.py pyproject.toml)
[[ ${#missing[@]} -eq 0 ]] || fail "the sdist lacks ${missing[*]}"
"$PY" - "$WHEEL" <<'EOF' || fail "the wheel's contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("qaconv_ext/_kernels") and n.endswith(".so") for n in names), "no compiled library"
assert "qaconv_ext/_build_info.json" in names, "no build record"
assert "qaconv_ext/data/synthetic/plan.py" in names and not any(n.startswith("csrc/") for n in names)
EOF

# 2. fresh environments: torch + runtime dependencies only, then the distribution.
fresh_env() {  # fresh_env DIR [BUILD_TOOLS...]
  local dir=$1 name; shift
  name=$(basename "$dir")
  run_logged "$WORK/venv-$name.log" "$BASE_PY" -m venv "$dir"
  run_logged "$WORK/torch-$name.log" "$dir/bin/python" -m pip install -q --no-deps \
    ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  # torch's requirements, the package's and the build tools: nothing here asks for torch.
  run_logged "$WORK/deps-$name.log" "$dir/bin/python" -m pip install -q "${TORCH_REQS[@]}" "${RUNTIME_REQS[@]}" "$@"
  "$dir/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_VERSION')" \
    || fail "$name: torch changed from $TORCH_VERSION"
}
step "fresh environment for the sdist (compiles)"
# Building from the sdist without isolation needs the build tools in that environment too.
fresh_env "$WORK/env-sdist" "setuptools>=64" wheel ninja
run_logged "$WORK/install-sdist.log" "$WORK/env-sdist/bin/python" -m pip install -q --no-deps \
  --no-build-isolation "$SDIST"

# 3. run the op from outside the tree.
mkdir "$WORK/outside"
for env in env-sdist; do
  vpy="$WORK/$env/bin/python"
  run_logged "$WORK/pip-check-$env.log" "$vpy" -m pip check
  (cd "$WORK/outside" && "$vpy" - "$WORK/$env" <<'EOF') || fail "the op in $env"
import os, sys
import torch
import qaconv_ext
from qaconv_ext import native_available, qaconv_match, qaconv_score, reference

env = os.path.realpath(sys.argv[1])
assert os.path.realpath(qaconv_ext.__file__).startswith(env + os.sep), f"imported {qaconv_ext.__file__}"
assert native_available("cpu"), "the compiled CPU kernel did not load"
g = torch.Generator().manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(3, 16, 6, 4, generator=g, dtype=torch.float64), dim=1)
k = torch.nn.functional.normalize(torch.randn(5, 16, 6, 4, generator=g, dtype=torch.float64), dim=1)
w = torch.randn(48, generator=g, dtype=torch.float64)
s64 = qaconv_score(q, k, w, 0.25)
ref = reference.qaconv_score(q, k, w, 0.25)
assert torch.allclose(s64, ref, rtol=1e-12, atol=1e-12), (s64 - ref).abs().max()
s32 = qaconv_score(q.float(), k.float(), w.float(), 0.25)
assert torch.allclose(s32.double(), ref, rtol=1e-4, atol=1e-4), (s32.double() - ref).abs().max()
v, i = qaconv_match(q, k, return_indices=True)
rv, ri = reference.qaconv_match(q, k, return_indices=True)
assert torch.equal(v, rv) and torch.equal(i, ri)
print(f"check_dist: {os.path.basename(env)}: qaconv_ext {qaconv_ext.__version__} from "
      f"{os.path.dirname(qaconv_ext.__file__)}, native CPU, score and match equal the reference")
EOF
  "$WORK/$env/bin/qaconv" --help > /dev/null || fail "the qaconv command in $env"
done

# 4. the default (isolated) pip install of the sdist stops with the exact command.
step "isolated install of the sdist (expected to stop)"
if "$WORK/env-sdist/bin/python" -m pip install --no-deps --force-reinstall "$SDIST" > "$WORK/isolated.log" 2>&1; then
  fail "an isolated build found a torch it cannot see"
fi
grep -q "pip install --no-build-isolation \." "$WORK/isolated.log" \
  && grep -q "isolated build environment" "$WORK/isolated.log" \
  || { tail -30 "$WORK/isolated.log" >&2; fail "the isolated build's message"; }
grep -m1 "qaconv-ext compiles against" "$WORK/isolated.log" | sed 's/^ *//; s/^/check_dist: isolated pip says: /'
step "ok"
