"""Build of qaconv-ext: the C++ CPU kernels always, the CUDA kernels where torch and a toolkit allow.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed.
``QACONV_EXT_CUDA=1`` forces the CUDA build (an error if impossible), ``QACONV_EXT_CUDA=0`` disables it.
"""
import glob
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


def _extension():
    sources = [os.path.relpath(p, HERE) for p in
               sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-fopenmp"]
    if os.environ.get("QACONV_EXT_NATIVE_ARCH", "0") == "1":
        cxx.append("-march=native")
    include_dirs = [os.path.join(HERE, "csrc")]
    if not _cuda_requested():
        return cpp_extension.CppExtension("qaconv_ext._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    # With no visible GPU, torch's arch detection fails: pick Ampere (+PTX) and Hopper by default.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    sources += [os.path.relpath(p, HERE) for p in
                sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) +
                       glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension("qaconv_ext._C", sources, include_dirs=include_dirs,
                                       define_macros=[("QACONV_WITH_CUDA", "1")],
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                       extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["qaconv_ext", "qaconv_ext.*"]),
    ext_modules=[_extension()] if torch is not None else [],  # none only for metadata and the sdist
    cmdclass=({"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
              if torch is not None else {}),
)
