"""Packaging: the source distribution holds every file the build needs, and a build without torch says why.

Both run setup.py in a copy of the source tree with torch hidden from the build process (as an isolated
build environment hides it), so they need no compiler and take a few seconds. The full check (sdist and
wheel built, installed into fresh environments, run from outside the tree) is tools/check_dist.sh.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Build outputs, environments and generated data: not sources, never copied.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "runs", "data_cache",
                                      "*.egg-info", "__pycache__", ".pytest_cache", "*.so", "*.o", "*.pyc")
# setup.py run with `import torch` failing, the way an isolated build environment makes it fail.
_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py'] + sys.argv[1:]; "
                  "runpy.run_path('setup.py', run_name='__main__')")


def _files_under(top: str) -> set:
    out = set()
    for dirpath, dirnames, files in os.walk(os.path.join(ROOT, top)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in files:
            if not f.endswith((".pyc", ".so", ".o")):
                out.add(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/"))
    return out


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("tree") / "qaconv-ext"
    shutil.copytree(ROOT, dst, ignore=_NOT_SOURCES)
    return str(dst)


@pytest.fixture(scope="module")
def sdist_names(source_copy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sdist"))
    code = ("import sys; sys.modules['torch'] = None; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, out], cwd=source_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(os.path.join(out, name)) as tar:
        top = name[: -len(".tar.gz")]
        return {m.name[len(top) + 1:] for m in tar.getmembers() if m.isfile()}


def test_sdist_holds_every_build_source(sdist_names):
    csrc = _files_under("csrc")
    assert {"csrc/checks.h", "csrc/ops.cpp"} <= csrc and any(f.startswith("csrc/cuda/") for f in csrc)
    assert sorted(csrc - sdist_names) == []
    package = {f for f in _files_under("qaconv_ext") if f.endswith(".py")}
    assert "qaconv_ext/data/synthetic/plan.py" in package
    assert sorted(package - sdist_names) == []
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"} <= sdist_names
    assert not [f for f in sdist_names if f.endswith((".so", ".o", ".pyc"))]


def test_build_without_torch_names_the_command(source_copy):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "bdist_wheel"], cwd=source_copy,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "torch is not installed for" in proc.stderr and "Install torch first" in proc.stderr
    assert "pip install --no-build-isolation ." in proc.stderr


def test_isolated_build_says_isolation_hides_torch(source_copy, tmp_path):
    # pip's isolated build: the same interpreter with PYTHONPATH pointing at its build-env site folder.
    site = tmp_path / "pip-build-env-test" / "site"
    site.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "bdist_wheel"], cwd=source_copy,
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    import torch

    assert f"torch {torch.__version__} is installed" in proc.stderr
    assert "isolated build environment, which hides it" in proc.stderr
    assert "pip install --no-build-isolation ." in proc.stderr


def test_metadata_needs_no_torch(source_copy, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "egg_info", "--egg-base", str(tmp_path)],
                          cwd=source_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "qaconv_ext.egg-info" / "requires.txt") as fh:
        assert "torch>=2.10" in fh.read()
