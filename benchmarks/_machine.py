"""What the benchmarks share: the machine's description, the process's resident memory (Linux), JSON output.

Where results go: ``--json PATH`` if given; ``--update-results`` writes the committed file in
``benchmarks/results/`` (the figures docs/PERFORMANCE.md quotes); by default a new folder of this run,
``runs/bench/<date-time>/``, so a run never overwrites the committed results by accident.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from typing import Any, Dict, Optional, Sequence

__all__ = ["cpu_name", "machine_record", "status_kib", "reset_peak_rss", "write_json", "add_output_args",
           "output_path", "RESULTS_DIR", "RUNS_DIR"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(_REPO, "benchmarks", "results")  # committed: docs/PERFORMANCE.md's figures
RUNS_DIR = os.path.join(_REPO, "runs", "bench")             # one folder per run, not committed
_this_run: Dict[str, str] = {}


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


def machine_record(load_before: Sequence[float], load_after: Sequence[float],
                   device: Optional[str] = None) -> Dict[str, Any]:
    """Date, device (default: the CPU), core and thread counts, versions and load averages for a result file."""
    import numpy as np
    import torch

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device or cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def add_output_args(parser: Any, name: str) -> None:
    """Add ``--json`` and ``--update-results`` for a benchmark whose result file is called ``name``."""
    parser.add_argument("--json", default=None,
                        help=f"where to write the results ('' to skip; default: runs/bench/<date-time>/{name})")
    parser.add_argument("--update-results", action="store_true",
                        help=f"write the committed benchmarks/results/{name} (docs/PERFORMANCE.md's figures) instead")


def output_path(args: Any, name: str) -> str:
    """The result file of this run: ``--json``, else the committed one with ``--update-results``, else
    ``name`` in a new folder ``runs/bench/<date-time>/`` (created once per process, never reused)."""
    if args.json is not None:
        return args.json
    if args.update_results:
        return os.path.join(RESULTS_DIR, name)
    if RUNS_DIR not in _this_run:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for k in range(1, 1000):
            folder = os.path.join(RUNS_DIR, stamp if k == 1 else f"{stamp}-{k}")
            try:
                os.makedirs(folder)
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError(f"no free run folder for {stamp} under {RUNS_DIR}")
        _this_run[RUNS_DIR] = folder
    return os.path.join(_this_run[RUNS_DIR], name)


def save_result(args: Any, name: str, result: Any) -> str:
    """Write ``result`` to this run's result file (:func:`output_path`), say where, and return the path."""
    path = output_path(args, name)
    write_json(path, result)
    print(f"wrote {path}")
    return path
