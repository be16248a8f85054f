"""What the CPU benchmarks share: the processor's name and the process's resident memory (Linux)."""
from __future__ import annotations

import platform

__all__ = ["cpu_name", "status_kib", "reset_peak_rss"]


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where it exists)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (the peak is then inexact)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
