"""The compiled libraries stand on PyTorch's stable ABI only, say what they were built with, refuse an older
torch clearly, and (in a CUDA build) carry the promised GPU architectures.

* The binding sources include nothing of torch but ``torch/csrc/stable`` and ``torch/headeronly`` and
  no Python C API; the built libraries reference torch through its C shim only (no C++ symbol of
  ATen/c10/torch, no ``Py*`` symbol).
* ``qaconv_ext.build_info()`` agrees with the build record read before loading, and with this torch.
* A torch older than the target is refused at import with a message that names both versions.
* The CUDA library of a CUDA wheel holds machine code for sm_80, sm_86, sm_89, sm_90a and compute_80
  PTX (``cuobjdump``; skipped where no CUDA wheel or no cuobjdump is at hand: ``make wheel-check``
  builds one with the CUDA torch and runs this test on it).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import qaconv_ext
from qaconv_ext.ops import _library, _native

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(qaconv_ext.__file__).resolve().parent
# The architectures the CUDA kernels are built for by default (setup.py's DEFAULT_CUDA_ARCHS).
CUDA_ELF = {"sm_80", "sm_86", "sm_89", "sm_90a"}
CUDA_PTX = {"sm_80"}  # cuobjdump names the PTX of compute_80 after its architecture

native = pytest.mark.skipif(not _library.NATIVE, reason="the compiled kernels are not built")


def test_bindings_include_only_the_stable_api():
    if not (ROOT / "csrc").is_dir():
        pytest.skip("the C++ sources are not here (tests copied next to an installed wheel)")
    allowed = ("torch/csrc/stable/", "torch/headeronly/")
    sources = sorted(ROOT.glob("csrc/**/*"))
    assert any(p.name == "binding.h" for p in sources)
    for path in sources:
        if path.suffix not in (".cpp", ".h", ".cu", ".cuh"):
            continue
        for line in path.read_text().splitlines():
            match = re.match(r"\s*#\s*include\s*[<\"]([^>\"]+)[>\"]", line)
            if match is None:
                continue
            header = match.group(1)
            assert not header.startswith(("ATen/", "c10/", "Python.h", "pybind11")), (path, header)
            assert not header.startswith("torch/") or header.startswith(allowed), (path, header)


def _undefined_symbols(library: Path) -> list:
    out = subprocess.run(["nm", "-D", "--undefined-only", "-C", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(None, 1)[1] for line in out.splitlines() if line.strip()]


@native
@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm (binutils) to list the symbols")
def test_libraries_reach_torch_through_its_c_shim_only():
    libraries = sorted(PACKAGE.glob("_kernels*.so"))
    assert libraries
    for library in libraries:
        symbols = _undefined_symbols(library)
        assert any(s.startswith("aoti_torch_") for s in symbols)
        cxx_torch = [s for s in symbols if re.search(r"\b(at|c10|torch|caffe2)::", s)]
        python = [s for s in symbols if re.match(r"_?Py", s)]
        assert cxx_torch == [] and python == [], (library.name, cxx_torch[:5], python[:5])


@native
def test_build_info_agrees_with_the_record_and_this_torch():
    info = qaconv_ext.build_info()
    record = json.loads((PACKAGE / "_build_info.json").read_text())
    assert {k: info[k] for k in record} == record
    assert info["target_torch"] == "2.10" and info["target_abi"] == "0x020A000000000000"
    assert info["torch_running"] == torch.__version__
    assert info["kernels"][0] == "cpu" and ("cuda" in info["kernels"]) == _library.NATIVE_CUDA
    assert (info["cuda"] is None) == (info["cuda_archs"] == []) == (not info["cuda_library"])
    assert info["cpu_kernel"] == qaconv_ext.cpu_kernel()


@pytest.mark.parametrize("installed, refused", [("2.9.1", True), ("1.13.0+cpu", True), ("2.10.0", False),
                                                ("2.13.0+cpu", False), ("2.14.1+cu130", False), ("3.0.0", False)])
def test_torch_version_check(installed, refused):
    record = {"target_torch": "2.10", "torch": "2.14.1+cu130"}
    if refused:
        with pytest.raises(_native.TorchTooOldError, match=rf"need torch >= 2\.10 .* torch {re.escape(installed)} is"):
            _native.check_torch_version(record, installed)
    else:
        _native.check_torch_version(record, installed)


@native
def test_older_torch_is_refused_at_import():
    # a fresh interpreter whose torch reports an older version: the import stops with the reason, before
    # any library is loaded (not the silent fallback of an unbuilt package)
    code = ("import torch; torch.__version__ = '2.9.1'\n"
            "try:\n    import qaconv_ext.ops\nexcept ImportError as e:\n"
            "    print(type(e).__name__, e); print('loaded', bool(torch.ops.loaded_libraries))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "TorchTooOldError qaconv_ext's compiled kernels need torch >= 2.10" in out.stdout
    assert "torch 2.9.1 is installed" in out.stdout and "loaded False" in out.stdout


def test_float32_matmul_precision_reaches_the_kernels():
    # the CUDA kernels read torch's setting through this op (csrc/cuda/match_cuda.cpp)
    old = torch.get_float32_matmul_precision()
    try:
        for precision in ("medium", "high", "highest"):
            torch.set_float32_matmul_precision(precision)
            assert torch.ops.qaconv_ext._float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(old)


def _cuobjdump():
    """cuobjdump from $CUOBJDUMP, PATH, the CUDA toolkit, or the CUDA torch's triton (which ships one)."""
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(home, "bin", "cuobjdump")]
    try:
        import triton  # noqa: F401  (present next to a CUDA torch)

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _cuda_wheel():
    """The CUDA wheel to inspect: $QACONV_CUDA_WHEEL, else the newest abi3 wheel in dist/ with a CUDA library."""
    named = os.environ.get("QACONV_CUDA_WHEEL")
    if named:
        return named
    for wheel in sorted(glob.glob(str(ROOT / "dist" / "qaconv_ext-*-cp310-abi3-*.whl")), key=os.path.getmtime,
                        reverse=True):
        if any("_kernels_cuda" in n for n in zipfile.ZipFile(wheel).namelist()):
            return wheel
    return None


def test_cuda_wheel_holds_the_architectures(tmp_path):
    wheel, tool = _cuda_wheel(), _cuobjdump()
    if wheel is None:
        pytest.skip("no CUDA wheel here (make wheel-check builds one against torch 2.14.1+cu130 into dist/)")
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit, or the triton of a CUDA torch)")
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if os.path.basename(n).startswith("_kernels_cuda"))
        library = z.extract(name, tmp_path)
        record = json.loads(z.read("qaconv_ext/_build_info.json"))
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    # one entry per .cu file and architecture: "ELF file 1: match_kernels.sm_80.cubin"
    elf_archs = re.findall(r"ELF file\s+\d+:\s+(\w+)\.(sm_\w+)\.cubin", elf)
    ptx_archs = re.findall(r"PTX file\s+\d+:\s+(\w+)\.(sm_\w+)\.ptx", ptx)
    sources = {s for s, _ in elf_archs}
    assert sources
    if (ROOT / "csrc").is_dir():  # every .cu file of the tree is in the library
        assert sources == {Path(p).stem for p in glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))}
    for source in sources:
        assert {a for s, a in elf_archs if s == source} == CUDA_ELF, (source, elf)
        assert {a for s, a in ptx_archs if s == source} == CUDA_PTX, (source, ptx)
    assert sorted(record["cuda_archs"]) == sorted(CUDA_ELF | {"compute_80"})
