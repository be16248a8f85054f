"""``qaconv bench``: a quick matching-throughput check of the fused op against the PyTorch reference.

Times ``qaconv_score`` (fused head, one float per pair), ``qaconv_match`` (all maxima) and the chunked
reference ``qaconv_score`` on the same seeded unit-norm maps in one process, and prints pairs/s,
GFLOP/s and the speed-up. ``--full`` runs the repository's ``benchmarks/bench_match.py`` instead
(per-method processes, peak memory, JSON), when that script is available.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional

from .common import CommandError, json_path, positive_int, resolve_device, write_json

#: What ``qaconv bench --help`` says (plain text).
DESCRIPTION = ("A quick matching-throughput check: times qaconv_score (fused head, one number per pair), "
               "qaconv_match (all maxima) and the chunked PyTorch reference qaconv_score on the same seeded "
               "unit-norm feature maps in one process, and prints pairs/s, GFLOP/s and the speed-up. --full "
               "runs the repository's benchmarks/bench_match.py instead (one process per method, peak memory, "
               "JSON), when that script is there.")


def _time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quick_bench(queries: int = 32, gallery: int = 512, channels: int = 128, height: int = 24, width: int = 8,
                dtype: str = "float32", device: str = "cpu", repeats: int = 3, reference: bool = True,
                seed: int = 0) -> Dict[str, Any]:
    """Median time per call and pairs/s of the fused score/match ops (and the reference score)."""
    import torch

    from .. import qaconv_match, qaconv_score
    from ..ops import reference as ref

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    shape = (channels, height, width)
    q = torch.nn.functional.normalize(torch.randn(queries, *shape, generator=g), dim=1).to(device, dt)
    x = torch.nn.functional.normalize(torch.randn(gallery, *shape, generator=g), dim=1).to(device, dt)
    w = torch.randn(2 * height * width, generator=g).to(device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    methods = {"fused score": lambda: qaconv_score(q, x, w, 0.1), "fused match": lambda: qaconv_match(q, x)}
    if reference:
        methods["reference score"] = lambda: ref.qaconv_score(q, x, w, 0.1)
    pairs = queries * gallery
    flop = 2.0 * (height * width) ** 2 * channels * pairs
    results = {}
    with torch.no_grad():
        for name, fn in methods.items():
            s = _time(fn, repeats, sync)
            results[name] = {"seconds": s, "pairs_per_s": pairs / s, "gflops": flop / s / 1e9}
    out: Dict[str, Any] = {"problem": {"queries": queries, "gallery": gallery, "channels": channels,
                                       "height": height, "width": width, "dtype": dtype, "device": str(device),
                                       "threads": torch.get_num_threads()},
                           "results": results}
    if "reference score" in results:
        out["speedup_score"] = results["fused score"]["pairs_per_s"] / results["reference score"]["pairs_per_s"]
    return out


def _find_bench_script() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.getcwd(), os.path.dirname(os.path.dirname(here))):
        cand = os.path.join(base, "benchmarks", "bench_match.py")
        if os.path.isfile(cand):
            return cand
    return None


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command."""
    p = subparsers.add_parser("bench", help="quick matching throughput: fused op vs PyTorch reference",
                              description=DESCRIPTION)
    p.add_argument("--queries", type=positive_int, default=32, help="query feature maps (default: %(default)s)")
    p.add_argument("--gallery", type=positive_int, default=512, help="gallery feature maps (default: %(default)s)")
    p.add_argument("--channels", type=positive_int, default=128, help="channels per location (default: %(default)s)")
    p.add_argument("--height", type=positive_int, default=24, help="feature map height (default: %(default)s)")
    p.add_argument("--width", type=positive_int, default=8, help="feature map width (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"),
                   help="feature dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per method; the median is "
                   "reported (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true", help="skip the (slower) reference")
    p.add_argument("--json", type=json_path, default=None, metavar="FILE.json", help="write the results here")
    p.add_argument("--full", action="store_true",
                   help="run benchmarks/bench_match.py (from a source checkout) with the remaining arguments")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv bench``."""
    if args.full:
        script = _find_bench_script()
        if script is None:
            raise CommandError("qaconv bench --full: benchmarks/bench_match.py not found (run from a source checkout)")
        cmd = [sys.executable, script, f"--queries={args.queries}", f"--gallery={args.gallery}",
               f"--channels={args.channels}", f"--height={args.height}", f"--width={args.width}",
               f"--dtype={args.dtype}", f"--repeats={args.repeats}"] + list(args.rest or [])
        if args.json is not None:
            cmd.append(f"--json={args.json}")
        return subprocess.call(cmd)
    device = resolve_device(args.device, "qaconv bench")
    r = quick_bench(args.queries, args.gallery, args.channels, args.height, args.width, args.dtype, device,
                    args.repeats, not args.no_reference)
    pb = r["problem"]
    print(f"{pb['queries']} x {pb['gallery']} pairs, L = {pb['height']}x{pb['width']}, d = {pb['channels']}, "
          f"{pb['dtype']}, {pb['device']} ({pb['threads']} threads)")
    print(f"{'method':<18}{'ms/call':>10}{'pairs/s':>12}{'GFLOP/s':>10}")
    for name, m in r["results"].items():
        print(f"{name:<18}{1e3 * m['seconds']:>10.1f}{m['pairs_per_s']:>12,.0f}{m['gflops']:>10.1f}")
    if "speedup_score" in r:
        print(f"fused score: {r['speedup_score']:.2f}x the reference's pairs/s")
    if args.json:
        print(f"wrote {write_json(args.json, r)}")
    return 0


__all__ = ["quick_bench", "register", "run"]
