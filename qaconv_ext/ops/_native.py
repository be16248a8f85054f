"""The compiled kernels: loads their libraries into torch and answers their queries.

The libraries are built on PyTorch's stable ABI and use no Python C API: ``qaconv_ext/_kernels*.so``
defines the ``qaconv_ext::*`` schemas and registers the CPU kernels, ``qaconv_ext/_kernels_cuda*.so`` (in
builds with CUDA) registers the CUDA kernels. Both load with ``torch.ops.load_library``; their queries
(the CPU micro-kernel in use, what they were built with) are plain C functions, called through ctypes.

:func:`load` raises :class:`ImportError` when no library was built (the package then runs its chunked
PyTorch path) and :class:`TorchTooOldError` when the installed torch predates the stable ABI the
libraries were built for.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["TorchTooOldError", "load", "cpu_kernel", "build_info", "check_torch_version"]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


class TorchTooOldError(ImportError):
    """The installed torch is older than the one the compiled libraries need."""


def _library(stem: str) -> Optional[Path]:
    """The built library ``qaconv_ext/<stem>.*.so`` (``_kernels.abi3.so``), or None."""
    found = sorted(p for p in _PACKAGE_DIR.glob(stem + ".*so") if p.name.split(".", 1)[0] == stem)
    return found[0] if found else None


def _version_tuple(version: str) -> Tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"unreadable torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(info: Dict[str, Any], installed: str) -> None:
    """Raise :class:`TorchTooOldError` when torch ``installed`` is older than the libraries' target."""
    target = info["target_torch"]
    if _version_tuple(installed) < _version_tuple(target):
        raise TorchTooOldError(
            f"qaconv_ext's compiled kernels need torch >= {target} (they use PyTorch's stable ABI of {target}; "
            f"built with torch {info['torch']}), but torch {installed} is installed. Install torch >= {target} "
            "(docs/INSTALL.md).")


_CPU: Optional[ctypes.CDLL] = None
_BUILD: Dict[str, Any] = {}
_CUDA_PATH: Optional[Path] = None
with_cuda = False


def load() -> None:
    """Load the compiled libraries into torch (once).

    ImportError when they are not built; :class:`TorchTooOldError` when the installed torch is older than
    the stable ABI they target (checked from the build record, before anything is loaded: such a library
    would not load).
    """
    global _CPU, _BUILD, _CUDA_PATH, with_cuda
    if _CPU is not None:
        return
    cpu_path, record = _library("_kernels"), _PACKAGE_DIR / "_build_info.json"
    if cpu_path is None or not record.exists():
        raise ImportError(f"qaconv_ext's compiled kernels are not built (no _kernels library and build record "
                          f"in {_PACKAGE_DIR})")
    check_torch_version(json.loads(record.read_text()), torch.__version__)
    torch.ops.load_library(str(cpu_path))  # the schemas and the CPU kernels
    lib = ctypes.CDLL(str(cpu_path))  # the same loaded library, for its C queries
    lib.qaconv_ext_build_info.restype = ctypes.c_char_p
    lib.qaconv_ext_cpu_kernel.restype = ctypes.c_int
    lib.qaconv_ext_cpu_kernel.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    _BUILD = json.loads(lib.qaconv_ext_build_info().decode())  # what the library says of itself
    _CUDA_PATH = _library("_kernels_cuda")
    # The CUDA library links torch's CUDA libraries and the CUDA runtime of its toolkit's major version:
    # loaded only where torch has CUDA (a CPU-only torch keeps the CPU kernels of the same wheel); where it
    # cannot load (a torch built for another CUDA major version), CUDA tensors take the chunked path.
    if _CUDA_PATH is not None and torch.version.cuda is not None:
        try:
            torch.ops.load_library(str(_CUDA_PATH))
            with_cuda = True
        except OSError as exc:
            _BUILD["cuda_load_error"] = str(exc)
            warnings.warn(f"qaconv_ext: the CUDA kernels (built with CUDA {_BUILD.get('cuda')}) do not load "
                          f"next to torch {torch.__version__} (CUDA {torch.version.cuda}): {exc}. CUDA tensors "
                          "use the chunked PyTorch path; see docs/INSTALL.md.", RuntimeWarning, stacklevel=2)
    _CPU = lib


def cpu_kernel() -> str:
    """Name of the CPU micro-kernel variant in use (avx512bf16, avx512, avx2, generic, generic16).

    The processor's best, or the one the environment variable ``QACONV_CPU_KERNEL`` names; ValueError
    when that names an unknown variant or one this processor cannot run.
    """
    load()
    buffer = ctypes.create_string_buffer(256)
    if _CPU.qaconv_ext_cpu_kernel(buffer, len(buffer)) != 0:
        raise ValueError(f"QACONV_CPU_KERNEL={os.environ.get('QACONV_CPU_KERNEL')}: {buffer.value.decode()}")
    return buffer.value.decode()


def _kernels() -> List[str]:
    return ["cpu"] + (["cuda"] if with_cuda else [])


def build_info() -> Dict[str, Any]:
    """What the compiled kernels were built with and which of them run here.

    ``torch`` (the version built against), ``target_torch`` / ``target_abi`` (the oldest torch the
    libraries load into: the stable ABI version), ``cuda`` and ``cuda_archs`` (toolkit version and the
    architectures of the CUDA kernels, machine code ``sm_*`` and PTX ``compute_*``; None and [] in a
    CPU-only build), ``kernels`` (the devices with compiled kernels loaded in this process),
    ``cuda_library`` (whether the build has the CUDA library, loaded or not), ``cpu_kernel``.
    """
    info = dict(_BUILD)
    info.update(kernels=_kernels(), cuda_library=_CUDA_PATH is not None, cpu_kernel=cpu_kernel(),
                torch_running=torch.__version__)
    return info
