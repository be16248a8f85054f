#!/usr/bin/env bash
# Set up the virtual environment and build the extension, on a fresh machine or one that already has torch.
#  - An importable torch (system site-packages) is reused; otherwise torch==2.13.0 is installed from pip's
#    configured index, or from $TORCH_INDEX_URL when set (e.g. https://download.pytorch.org/whl/cpu: on PyPI
#    the Linux torch wheel is the CUDA build, several GB).
#  - Other dependencies are installed only when missing, so a machine without network works if they exist.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
  # A host interpreter that is itself a virtual environment (e.g. /opt/torch/.venv) does not pass its
  # own packages on through --system-site-packages: link them with a .pth file instead.
  if "$PY" -c "import torch" 2>/dev/null && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    site_dir=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PY" -c "import site, sys; print('\n'.join(site.getsitepackages() + [p for p in sys.path if p.endswith('-packages')]))" \
      | sort -u > "$site_dir/_host_site_packages.pth"
    echo "bootstrap: reusing the packages of $("$PY" -c 'import sys; print(sys.prefix)')"
  fi
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
  pip_install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
missing=()
for spec in numpy:numpy scipy:scipy tqdm:tqdm PIL:pillow pytest:pytest setuptools:setuptools wheel:wheel; do
  mod=${spec%%:*}; pkg=${spec#*:}
  "$VPY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  pip_install "${missing[@]}"
fi
"$VPY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null || pip_install ninja || true
echo "bootstrap: building qaconv_ext (torch $("$VPY" -c 'import torch; print(torch.__version__)'))"
MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)} "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$VPY" -c "import qaconv_ext, qaconv_ext.ops as o; assert o.native_available('cpu'), 'native kernel missing'; print('bootstrap: qaconv_ext', qaconv_ext.__version__, 'native CPU', o.native_available('cpu'), 'native CUDA', o.native_available('cuda'))"
