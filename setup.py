"""Build of qaconv-ext: the C++ CPU kernels always, the CUDA kernels where torch and a toolkit allow.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed.
``QACONV_EXT_CUDA=1`` forces the CUDA build (an error if impossible), ``QACONV_EXT_CUDA=0`` disables it.
"""
import glob
import json
import os
import subprocess
import sys

from setuptools import find_packages, setup

# Commands that only describe or pack the sources need no torch (an sdist can be made anywhere); every
# other command compiles the extension against the torch it will run with.
_METADATA_COMMANDS = {"egg_info", "dist_info", "sdist", "--name", "--version", "--help", "--help-commands"}
_COMPILE_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop",
                     "editable_wheel"}


def _metadata_only(argv) -> bool:
    """Whether ``setup.py`` was asked for metadata or an sdist only (no compiling)."""
    return any(a in _METADATA_COMMANDS for a in argv) and not any(a in _COMPILE_COMMANDS for a in argv)


def _torch_outside_isolation():
    """torch's version and folder as the interpreter sees it without pip's build isolation, else None.

    pip runs an isolated build with this same interpreter, hiding its site-packages through PYTHONPATH
    (a sitecustomize) and PYTHONNOUSERSITE; without them, an installed torch is visible again.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", "import os, torch; "
                              "print(torch.__version__, os.path.dirname(os.path.dirname(torch.__file__)))"],
                             env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split(maxsplit=1) if out.returncode == 0 and out.stdout.strip() else None


def _no_torch_message() -> str:
    """Why the build stops without torch, and the command that works."""
    command = ("    pip install --no-build-isolation .\n"
               "(from the source folder; for an sdist, its file name instead of `.`; with `python -m build`, "
               "add --no-isolation; setuptools and wheel must be installed there too)")
    isolated = any("build-env-" in p for p in [sys.prefix, *sys.path, os.environ.get("PYTHONPATH", "")])
    found = _torch_outside_isolation() if isolated else None
    if found:
        return (f"qaconv-ext compiles against the torch it will run with. torch {found[0]} is installed "
                f"(in {found[1].strip()}), but this build runs in pip's isolated build environment, which "
                f"hides it. Build without isolation:\n{command}")
    if isolated:
        return ("qaconv-ext compiles against the torch it will run with, and this build runs in an isolated "
                "build environment (pip's or python -m build's default), which hides any installed torch. "
                "Install torch into the environment you install qaconv-ext into (if it is not there yet), "
                f"then build without isolation:\n{command}")
    return (f"qaconv-ext compiles against the torch it will run with, and torch is not installed for "
            f"{sys.executable}. Install torch first (e.g. `pip install torch`), then:\n{command}")


try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:
    if not _metadata_only(sys.argv[1:]):
        raise SystemExit(_no_torch_message()) from exc
    torch = cpp_extension = None

HERE = os.path.dirname(os.path.abspath(__file__))

# The compiled libraries use PyTorch's stable ABI only (torch/csrc/stable, torch/headeronly) and no Python
# C API: they load into every torch from TARGET_TORCH on and into every Python >= 3.10 (an abi3 wheel).
# TARGET_TORCH is the oldest torch whose stable API has everything the bindings use (parallel_for, empty,
# the dispatcher call; 2.10). qaconv_ext/ops/_native.py refuses an older torch with a clear error.
TARGET_TORCH = (2, 10)
TARGET_HEX = "0x%02X%02X000000000000" % TARGET_TORCH
LIMITED_API = "0x030A0000"  # Python 3.10
# CUDA architectures when TORCH_CUDA_ARCH_LIST is unset: Ampere (A100: 8.0; A10/A40/RTX 30: 8.6), Ada
# (L4/L40/RTX 40: 8.9) and Hopper with its arch-specific features (H100/H200: 9.0a) as machine code,
# plus compute_80 PTX that the driver compiles for any newer GPU (9.0a PTX would run on sm_90 only).
DEFAULT_CUDA_ARCHS = "8.0+PTX;8.6;8.9;9.0a"


def _cuda_requested() -> bool:
    switch = os.environ.get("QACONV_EXT_CUDA", "auto").strip().lower()
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if switch in ("0", "off", "false", "no"):
        return False
    if switch in ("1", "on", "true", "yes"):
        if torch.version.cuda is None:
            raise SystemExit("QACONV_EXT_CUDA=1 but the installed torch has no CUDA support")
        if cpp_extension.CUDA_HOME is None:
            raise SystemExit("QACONV_EXT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return available


def _arch_names(arch_list: str) -> list:
    """TORCH_CUDA_ARCH_LIST ("8.0+PTX;9.0a") as the toolkit names them: sm_80, sm_90a, compute_80."""
    names, ptx = [], []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        arch, _, suffix = entry.partition("+")
        code = arch.replace(".", "")
        names.append("sm_" + code)
        if suffix.upper() == "PTX":
            ptx.append("compute_" + code)
    return names + ptx


def _write_if_changed(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:  # unchanged: no rebuild
        with open(path, "w") as f:
            f.write(text)


BUILD_INFO = {}  # what the libraries are built with (filled by _extensions)


def _build_info(with_cuda: bool) -> str:
    """Records what the libraries are built with; returns the folder of the generated header.

    The same JSON twice: inside the libraries (the header's QACONV_BUILD_INFO, read back by
    qaconv_ext.build_info()) and as _build_info.json beside them (written by _BuildExt), which the package
    reads before it loads a library, to refuse a torch older than the target with a clear message.
    """
    BUILD_INFO.update(torch=torch.__version__, target_torch="%d.%d" % TARGET_TORCH, target_abi=TARGET_HEX,
                      cuda=torch.version.cuda if with_cuda else None,
                      cuda_archs=_arch_names(os.environ["TORCH_CUDA_ARCH_LIST"]) if with_cuda else [])
    text = json.dumps(BUILD_INFO, sort_keys=True)
    folder = os.path.join(HERE, "build", "generated")
    _write_if_changed(os.path.join(folder, "qaconv_build_info.h"),
                      "// Generated by setup.py: what the compiled libraries were built with.\n#pragma once\n"
                      "#define QACONV_BUILD_INFO %s\n" % json.dumps(text))
    return folder


def _sources(*patterns) -> list:
    return [os.path.relpath(p, HERE) for pattern in patterns for p in sorted(glob.glob(os.path.join(HERE, pattern)))]


def _extensions() -> list:
    """The CPU library (schemas, CPU kernels) and, where CUDA is built, the CUDA library beside it.

    Two libraries, so that one wheel serves a CPU-only torch too: the CUDA one (linked to torch's CUDA
    libraries and the CUDA runtime) is loaded only where torch has CUDA.
    """
    with_cuda = _cuda_requested()
    if with_cuda:  # with no visible GPU, torch's arch detection fails: give it the list
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    include_dirs = [os.path.join(HERE, "csrc"), _build_info(with_cuda)]
    stable = ["-DTORCH_TARGET_VERSION=" + TARGET_HEX, "-DPy_LIMITED_API=" + LIMITED_API]
    cxx = ["-O3", *stable]
    if os.environ.get("QACONV_EXT_NATIVE_ARCH", "0") == "1":
        cxx.append("-march=native")
    extensions = [cpp_extension.CppExtension(
        "qaconv_ext._kernels", _sources("csrc/*.cpp", "csrc/cpu/*.cpp"), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, py_limited_api=True)]
    if with_cuda:
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", *stable]
        extensions.append(cpp_extension.CUDAExtension(
            "qaconv_ext._kernels_cuda", _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"), include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, py_limited_api=True))
    return extensions


class _BuildExt(cpp_extension.BuildExtension if cpp_extension is not None else object):
    """torch's build_ext (ninja), which also writes the build record beside the libraries."""

    def run(self):
        super().run()
        library = self.get_ext_fullpath("qaconv_ext._kernels")  # in place for editable installs
        _write_if_changed(os.path.join(os.path.dirname(library), "_build_info.json"),
                          json.dumps(BUILD_INFO, sort_keys=True) + "\n")


setup(
    packages=find_packages(include=["qaconv_ext", "qaconv_ext.*"]),
    ext_modules=_extensions() if torch is not None else [],  # none only for metadata and the sdist
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)} if torch is not None else {},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # one wheel for every CPython >= 3.10
)
