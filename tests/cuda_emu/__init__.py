"""The CUDA kernels of ``csrc/cuda`` on the CPU: builds them with g++ against the emulation layer in
this folder (no CUDA toolkit) and calls their launchers through ctypes.

The library is cached under ``build/cuda_emu/`` by a hash of its sources and flags; a mutant (a
kernel file replaced by a patched copy) gets its own library. Inputs and outputs are torch tensors in
the kernels' layouts: maps ``[images, locations, d]`` (channels innermost).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CUDA_DIR = ROOT / "csrc" / "cuda"
BUILD_DIR = ROOT / "build" / "cuda_emu"
KERNEL_FILES = ("match_kernels.cu", "score_mma.cu")

KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

FLAGS = ["-std=c++17", "-O1", "-g1", "-fPIC", "-DQACONV_CUDA_EMU", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-unused-function"]
# The kernel files: ThreadSanitizer's instrumentation only (its runtime is not linked): every load
# and store calls a hook of runtime.cpp, which checks shared and global memory.
KERNEL_FLAGS = ["-x", "c++", "-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]


@dataclass(frozen=True)
class Device:
    """A device profile: compute capability, multiprocessors, opt-in shared memory per block."""

    name: str
    major: int
    minor: int
    sms: int
    smem_optin: int


DEVICES = {
    "sm_75": Device("sm_75 (T4)", 7, 5, 40, 64 * 1024),
    "sm_80": Device("A100 sm_80", 8, 0, 108, 163 * 1024),
    "sm_89": Device("RTX 4090 sm_89", 8, 9, 128, 99 * 1024),
    "sm_90": Device("H100 sm_90", 9, 0, 132, 227 * 1024),
}


class EmuError(RuntimeError):
    """A launch the emulator refused or a kernel it stopped (race, divergence, deadlock, bounds)."""


def compiler() -> Optional[str]:
    """The C++ compiler the emulator builds with ($CXX or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _objcopy(cxx: str) -> str:
    """objcopy of the compiler's binutils."""
    res = subprocess.run([cxx, "-print-prog-name=objcopy"], capture_output=True, text=True)
    return shutil.which(res.stdout.strip() or "objcopy") or "objcopy"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def build(replace: Optional[Dict[str, str]] = None) -> Path:
    """Compiles the emulator library, files of csrc/cuda replaced by ``{file name: source text}``
    (kernel files or headers: a patched copy of the whole folder is compiled); cached."""
    cxx = compiler()
    if cxx is None:
        raise EmuError("no C++ compiler")
    replace = replace or {}
    unknown = set(replace) - {f.name for f in CUDA_DIR.iterdir()}
    if unknown:
        raise EmuError(f"not in csrc/cuda: {sorted(unknown)}")
    cuda_src = {f.name: replace.get(f.name, f.read_text()).encode() for f in sorted(CUDA_DIR.iterdir())
                if f.suffix in (".h", ".cuh", ".cu")}
    cuda_dir = CUDA_DIR
    if replace:  # a patched copy of csrc/cuda (quoted includes resolve next to the including file)
        cuda_dir = BUILD_DIR / f"src-{_digest(*(n.encode() + t for n, t in cuda_src.items()))}"
        cuda_dir.mkdir(parents=True, exist_ok=True)
        for name, text in cuda_src.items():
            (cuda_dir / name).write_bytes(text)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode()
    emu_headers = [f.name.encode() + f.read_bytes() for f in sorted(HERE.glob("**/*.h"))]
    cuda_headers = [n.encode() + t for n, t in cuda_src.items() if not n.endswith(".cu")]
    own = _digest(*emu_headers, " ".join(FLAGS).encode(), version).encode()  # runtime, probes
    common = _digest(own, *cuda_headers).encode()                             # driver, kernel files
    units: List[Tuple[Path, List[str], bytes]] = [(HERE / "runtime.cpp", [], own), (HERE / "driver.cpp", [], common),
                                                  (HERE / "probes.cpp", KERNEL_FLAGS[2:], own)]
    units += [(cuda_dir / name, KERNEL_FLAGS, common) for name in KERNEL_FILES]
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{cuda_dir}"]
    objects, jobs = [], []
    for src, extra, deps in units:
        obj = BUILD_DIR / f"{src.stem}-{_digest(deps, src.read_bytes(), ' '.join(extra).encode())}.o"
        objects.append(obj)
        if obj.exists():
            continue
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *FLAGS, *extra, *includes, "-c", str(src), "-o", str(tmp)]
        jobs.append((subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), tmp, obj, src.name))
    for proc, tmp, obj, name in jobs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise EmuError(f"compiling {name} for the emulator failed:\n{err}")
        if name in KERNEL_FILES:  # static __shared__ arrays: see cuda_emu.h
            res = subprocess.run([_objcopy(cxx), "--rename-section", ".bss=qaconv_emu_shared", str(tmp)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise EmuError(f"objcopy failed:\n{res.stderr}")
        os.replace(tmp, obj)
    lib = BUILD_DIR / f"libqaconv_cuda_emu-{_digest(*(o.name.encode() for o in objects))}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([cxx, "-shared", "-Wl,-Bsymbolic", "-o", str(tmp), *map(str, objects)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise EmuError(f"linking the emulator failed:\n{res.stderr}")
        os.replace(tmp, lib)
    return lib


_I64, _VP = ctypes.c_int64, ctypes.c_void_p


class Emulator:
    """The kernels of one emulator library; every call runs them on the CPU and raises EmuError when the
    emulator stops a launch."""

    def __init__(self, lib: Path):
        self.path = lib
        self.lib = ctypes.CDLL(str(lib))
        L = self.lib
        L.emu_configure.argtypes = [ctypes.c_int] * 5 + [ctypes.c_uint64]
        L.emu_last_error.restype = ctypes.c_char_p
        L.emu_alloc.restype = _VP
        L.emu_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int]
        L.emu_free.argtypes = [_VP]
        L.emu_match_forward.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP] + [_I64] * 5
        L.emu_score_forward.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP, _VP] + [_I64] * 5
        L.emu_score_forward_mma.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP, _VP] + [_I64] * 5
        L.emu_match_backward.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP, _VP, _VP] + [_I64] * 5
        L.emu_plan_score_mma.argtypes = [ctypes.c_int] * 3 + [_I64] * 6 + [ctypes.POINTER(_I64)]
        L.emu_score_tries_tensor_cores.argtypes = [ctypes.c_int] * 3
        L.emu_staging_kind.argtypes = [ctypes.c_int, ctypes.c_double]
        L.emu_mma_channels.restype = _I64
        L.emu_mma_channels.argtypes = [_I64]
        L.emu_convert.argtypes = [ctypes.c_int, _VP, _VP, _I64]
        L.emu_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        L.emu_probe_mma.argtypes = [_VP] * 7 + [ctypes.c_int]
        L.emu_probe_ldmatrix.argtypes = [_VP] * 3
        L.emu_probe_fault.argtypes = [ctypes.c_int, _VP, _VP, ctypes.c_int]
        self.configure()

    def configure(self, device: Device = DEVICES["sm_80"], schedule: str = "forward", seed: int = 0) -> None:
        """The device the launchers see and the order threads run in (see emu_control.h)."""
        self.lib.emu_configure(device.major, device.minor, device.sms, device.smem_optin, SCHEDULES[schedule], seed)

    def stats(self) -> Dict[str, int]:
        """Counters since the library was loaded: launches, ctas, switches, barriers, collectives."""
        out = (ctypes.c_uint64 * 5)()
        self.lib.emu_stats(out)
        return dict(zip(("launches", "ctas", "switches", "barriers", "collectives"), out))

    # ---- buffers ----
    def _upload(self, t: Optional[torch.Tensor], readonly: bool = True):
        if t is None:
            return None
        t = t.contiguous()
        p = self.lib.emu_alloc(max(t.numel() * t.element_size(), 1), int(readonly))
        ctypes.memmove(p, t.data_ptr(), t.numel() * t.element_size())
        self._buffers.append(p)
        return p

    def _output(self, shape: Sequence[int], dtype: torch.dtype):
        t = torch.empty(shape, dtype=dtype)
        p = self.lib.emu_alloc(max(t.numel() * t.element_size(), 1), 0)
        self._buffers.append(p)
        return t, p

    def _download(self, t: torch.Tensor, p) -> torch.Tensor:
        ctypes.memmove(t.data_ptr(), p, t.numel() * t.element_size())
        return t

    def _call(self, fn, *args) -> int:
        err = fn(*args)
        if err not in (0, 801):  # 801: cudaErrorNotSupported, the caller falls back
            msg = self.lib.emu_last_error().decode() or "the launcher refused its arguments"
            raise EmuError(f"cudaError {err}: {self.symbolize(msg)}")
        return err

    def _run(self, body):
        self._buffers = []
        try:
            return body()
        finally:
            for p in self._buffers:
                self.lib.emu_free(p)
            self._buffers = []

    # ---- launchers ----
    def match(self, q: torch.Tensor, g: torch.Tensor, with_indices: bool = True):
        """match_forward: values [P, N, Lq + Lg] (q's dtype) and int64 indices (or None)."""
        P, Lq, d = q.shape
        N, Lg, _ = g.shape

        def body():
            vals, pv = self._output((P, N, Lq + Lg), q.dtype)
            idx, pi = self._output((P, N, Lq + Lg), torch.int64) if with_indices else (None, None)
            self._call(self.lib.emu_match_forward, KIND[q.dtype], self._upload(q), self._upload(g), pv, pi,
                       P, N, d, Lq, Lg)
            return self._download(vals, pv), (self._download(idx, pi) if with_indices else None)
        return self._run(body)

    def score(self, q: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              tensor_cores: bool) -> Optional[torch.Tensor]:
        """score_forward (CUDA cores) or score_forward_mma (tensor cores: None when it declines)."""
        P, Lq, d = q.shape
        N, Lg, _ = g.shape
        fn = self.lib.emu_score_forward_mma if tensor_cores else self.lib.emu_score_forward

        def body():
            out, po = self._output((P, N), torch.float32)
            err = self._call(fn, KIND[q.dtype], self._upload(q), self._upload(g),
                             self._upload(weight.float()), self._upload(None if bias is None else bias.float()),
                             po, P, N, d, Lq, Lg)
            return None if err == 801 else self._download(out, po)
        return self._run(body)

    def backward(self, grad_values: torch.Tensor, indices: torch.Tensor, q: torch.Tensor, g: torch.Tensor,
                 need_q: bool = True, need_g: bool = True):
        """match_backward: float32 grad_q [P, Lq, d] and grad_g [N, Lg, d] (None where not asked)."""
        P, Lq, d = q.shape
        N, Lg, _ = g.shape

        def body():
            gq, pq = self._output((P, Lq, d), torch.float32) if need_q else (None, None)
            gg, pg = self._output((N, Lg, d), torch.float32) if need_g else (None, None)
            self._call(self.lib.emu_match_backward, KIND[q.dtype], self._upload(grad_values.float()),
                       self._upload(indices), self._upload(q), self._upload(g), pq, pg, P, N, d, Lq, Lg)
            return (self._download(gq, pq) if need_q else None), (self._download(gg, pg) if need_g else None)
        return self._run(body)

    # ---- probes of the emulator itself (probes.cpp) ----
    def probe_mma(self, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, a_idx: torch.Tensor,
                  b_idx: torch.Tensor, c_idx: torch.Tensor) -> torch.Tensor:
        """One mma.m16n8k16 with fragments gathered by the given layouts: A [16, 16], B [16, 8] (k, n)
        float16/bfloat16, C [16, 8] float32; index tensors int32 [32, 8], [32, 4], [32, 4] (flat)."""
        def body():
            D, pd = self._output((16, 8), torch.float32)
            A16, B16 = A.contiguous().view(torch.int16), B.contiguous().view(torch.int16)
            self._call(self.lib.emu_probe_mma, self._upload(A16), self._upload(B16), self._upload(C.float()),
                       self._upload(a_idx.int()), self._upload(b_idx.int()), self._upload(c_idx.int()), pd,
                       int(A.dtype == torch.bfloat16))
            return self._download(D, pd)
        return self._run(body)

    def probe_ldmatrix(self, rows: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
        """ldmatrix.x4 of 32 rows (int32 [32, 4]: 16 bytes each), lane l addressing row row_of[l]:
        int32 [32, 4], register j of lane l."""
        def body():
            out, po = self._output((32, 4), torch.int32)
            self._call(self.lib.emu_probe_ldmatrix, self._upload(rows.int()), self._upload(row_of.int()), po)
            return self._download(out, po)
        return self._run(body)

    def probe_fault(self, fault: int, smem_bytes: int = 256) -> torch.Tensor:
        """The fault kernel of probes.cpp (64 threads): raises EmuError where the emulator stops it."""
        def body():
            out, po = self._output((64,), torch.float32)
            self._call(self.lib.emu_probe_fault, fault, self._upload(torch.arange(64.0)), po, smem_bytes)
            return self._download(out, po)
        return self._run(body)

    # ---- planning ----
    def plan(self, device: Device, P: int, N: int, d: int, Lq: int, Lg: int) -> Dict[str, int]:
        """The tensor-core launch plan of launch_plan.h for a device."""
        out = (_I64 * 8)()
        self.lib.emu_plan_score_mma(device.major, device.minor, device.sms, device.smem_optin, P, N, d, Lq, Lg, out)
        keys = ("supported", "stages", "smem_bytes", "warps", "per_cta", "chunks", "max_p", "row_stride")
        return dict(zip(keys, out))

    def score_dispatch(self, q: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       float32_precision: str = "highest", simple: bool = False) -> Tuple[torch.Tensor, str]:
        """qaconv_score as the torch binding (match_cuda.cpp) dispatches it, with the decisions taken from
        launch_plan.h: the tensor-core kernel where it is tried and fits (float32 staged in float16 or
        bfloat16, channels zero-padded to a multiple of 8), else the CUDA-core kernel on the maps as given.
        Returns the scores and which kernel produced them."""
        L = self.lib
        kind = KIND[q.dtype]
        if L.emu_score_tries_tensor_cores(kind, int(float32_precision == "highest"), int(simple)):
            qs, gs = q, g
            if q.dtype == torch.float32:
                max_abs = float(torch.stack([q.abs().max(), g.abs().max()]).max())
                staged = {1: torch.float16, 2: torch.bfloat16}[L.emu_staging_kind(int(float32_precision == "high"),
                                                                                   max_abs)]
                qs, gs = q.to(staged), g.to(staged)
            pad = L.emu_mma_channels(q.shape[2]) - q.shape[2]
            qs, gs = (torch.nn.functional.pad(qs, (0, pad)), torch.nn.functional.pad(gs, (0, pad)))
            out = self.score(qs, gs, weight, bias, tensor_cores=True)
            if out is not None:
                return out, f"tensor cores ({qs.dtype})"
        return self.score(q, g, weight, bias, tensor_cores=False), "CUDA cores"

    def convert(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """float32 -> dtype (float16/bfloat16) -> float32 through the emulator's conversions."""
        x = x.float().contiguous()
        out = torch.empty_like(x)
        self.lib.emu_convert(KIND[dtype], x.data_ptr(), out.data_ptr(), x.numel())
        return out

    # ---- messages ----
    def symbolize(self, message: str) -> str:
        """Replaces pc=<address> in a message by the kernel source line (addr2line), where possible."""
        base = None
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith(str(self.path)):
                    base = int(line.split("-")[0], 16)
                    break
        tool = shutil.which("addr2line")
        if base is None or tool is None:
            return message

        def one(m: "re.Match[str]") -> str:
            off = int(m.group(1)) - base - 1  # the call's return address: step back into the call
            res = subprocess.run([tool, "-i", "-e", str(self.path), hex(off)], capture_output=True, text=True)
            frames = [f.strip().rsplit("/", 1)[-1] for f in res.stdout.splitlines() if f.strip()]
            frames = [f for f in frames if "??" not in f]
            return "at " + " inlined in ".join(frames[:3]) if frames else m.group(0)
        return re.sub(r"pc=(\d+)", one, message)
