"""CPU training-step matching: batch feature maps against the class memory, forward and backward.

The problem of one training step of the class-memory loss: a batch of ``--batch`` query maps (with
gradient) matched against ``--classes`` memory maps (without), ``qaconv_match`` with indices, then
the backward through the argmax. Timed in one run on the same seeded inputs:

* fused forward + backward against the chunked reference under autograd;
* the fused backward alone, computing only the query gradient (what autograd asks for here) and
  both gradients, to show what the gradient mask saves.

    python benchmarks/bench_backward.py                  # 32 x 751 (Market-1501's classes), 16x8 and 24x8 maps
    python benchmarks/bench_backward.py --classes 120 --maps 16x8 --json /tmp/b.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from _machine import add_output_args, machine_record, save_result  # benchmarks/_machine.py

RESULT_NAME = "cpu_backward.json"


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(batch: int, classes: int, channels: int, h: int, w: int, repeats: int, seed: int) -> Dict:
    import qaconv_ext
    from qaconv_ext import reference

    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(batch, channels, h, w, generator=g), dim=1)
    memory = torch.nn.functional.normalize(torch.randn(classes, channels, h, w, generator=g), dim=1)
    upstream = torch.randn(batch, classes, 2 * h * w, generator=g)
    q = query.clone().requires_grad_()

    def fused_step():
        values = qaconv_ext.qaconv_match(q, memory)
        return torch.autograd.grad(values, q, upstream)[0]

    def reference_step():
        values = reference.qaconv_match(q, memory)
        return torch.autograd.grad(values, q, upstream)[0]

    values, indices = torch.ops.qaconv_ext.match(query, memory, True)
    row = {"batch": batch, "classes": classes, "channels": channels, "map": f"{h}x{w}"}
    row["fused_fwd_bwd_s"] = _median_s(fused_step, repeats)
    row["reference_fwd_bwd_s"] = _median_s(reference_step, max(1, repeats // 2))
    row["fused_forward_s"] = _median_s(lambda: torch.ops.qaconv_ext.match(query, memory, True), repeats)
    row["backward_query_only_s"] = _median_s(
        lambda: torch.ops.qaconv_ext.match_backward(upstream, indices, query, memory, [True, False]), repeats)
    row["backward_both_s"] = _median_s(
        lambda: torch.ops.qaconv_ext.match_backward(upstream, indices, query, memory, [True, True]), repeats)
    got, want = fused_step(), reference_step()
    row["grad_rel_err_vs_reference"] = float((got - want).norm() / want.norm())
    row["speedup_vs_reference"] = row["reference_fwd_bwd_s"] / row["fused_fwd_bwd_s"]
    row["mask_saves"] = 1.0 - row["backward_query_only_s"] / row["backward_both_s"]
    return row


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=751)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--maps", default="16x8,24x8", help="comma-separated HxW feature-map sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p, RESULT_NAME)
    args = p.parse_args(argv)

    import qaconv_ext

    load_before = os.getloadavg()
    cases = []
    for spec in args.maps.split(","):
        h, w = (int(x) for x in spec.lower().split("x"))
        cases.append(run_case(args.batch, args.classes, args.channels, h, w, args.repeats, args.seed))
    record = {"benchmark": "cpu_backward", **machine_record(load_before, os.getloadavg()),
              "qaconv_ext": qaconv_ext.__version__, "cases": cases}
    print(f"training-step matching, {args.batch} x {args.classes} pairs, d = {args.channels}, float32, "
          f"{torch.get_num_threads()} threads, {record['device']}")
    print(f"  {'map':>5}{'fused fwd+bwd s':>17}{'reference s':>13}{'speed-up':>10}{'bwd q only s':>14}"
          f"{'bwd both s':>12}{'grad rel err':>14}")
    for c in cases:
        print(f"  {c['map']:>5}{c['fused_fwd_bwd_s']:>17.3f}{c['reference_fwd_bwd_s']:>13.3f}"
              f"{c['speedup_vs_reference']:>9.2f}x{c['backward_query_only_s']:>14.3f}{c['backward_both_s']:>12.3f}"
              f"{c['grad_rel_err_vs_reference']:>14.1e}")
    save_result(args, RESULT_NAME, record)
    return record


if __name__ == "__main__":
    main()
