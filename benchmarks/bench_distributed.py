"""Sharded gallery scoring across processes: throughput of 1 against N processes (one thread each, gloo
on the CPU), with the efficiency ``speed-up / processes``.

Every rank scores all queries against its contiguous gallery shard with the fused op
(``qaconv_ext.distributed.sharded_score_blocks``) and rank 0 gathers the ``[P, N]`` scores; the time
runs from a barrier to the assembled matrix on rank 0 (the gather included). The assembled scores are
checked bit for bit against one process.

    python benchmarks/bench_distributed.py                    # 1 and 2 processes, 64 x 1024 pairs
    python benchmarks/bench_distributed.py --processes 1,2,4 --gallery 8192
    python benchmarks/bench_distributed.py --eval-rerank      # also qaconv eval --rerank, 1 vs 2 processes

``--eval-rerank`` adds the end-to-end case a user runs: ``qaconv eval --rerank`` on the demo's test set
(the synthetic ``domain_b``: 144 queries, 1,151 gallery images; generated under ``--eval-data-root`` if
missing) with a model of the demo's size (``--eval-checkpoint``, default: an untrained one of the demo's
architecture, written to a temporary folder: the work does not depend on the weights), once as
``python -m qaconv_ext eval`` (torch's default threads) and once as ``torchrun --nproc_per_node=2``
(one thread per process), wall time of each command and whether both print the same rows.

On a machine with several GPUs the same script scores on ``cuda:RANK`` with ``--device cuda`` (nccl);
that path has not been run where these figures were taken.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
import torch.multiprocessing as mp

from _machine import add_output_args, machine_record, output_path, write_json  # benchmarks/_machine.py


def _maps(seed: int, n: int, d: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, h, w, generator=g), dim=1)


def _head(d: int, h: int, w: int):
    from qaconv_ext.head import QAConv

    torch.manual_seed(0)
    return QAConv(d, h, w).eval()


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from qaconv_ext.distributed import barrier, init_from_env, shard_range, sharded_score_blocks, shutdown

    env = init_from_env(args.device, timeout_s=600)
    q = _maps(1, args.queries, args.channels, args.height, args.width).to(env.device)
    g = _maps(2, args.gallery, args.channels, args.height, args.width)
    part = shard_range(args.gallery, env.rank, env.world_size)
    local = g[part.start:part.stop].to(env.device)
    head = _head(args.channels, args.height, args.width).to(env.device)
    times: List[float] = []
    scores: Optional[torch.Tensor] = None
    for _ in range(args.warmup + args.repeats):
        barrier()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scores = sharded_score_blocks(head, q, local, progress=False)
        times.append(time.perf_counter() - t0)
    if env.rank == 0:
        torch.save({"times": times[args.warmup:], "scores": scores}, os.path.join(out, f"world{world}.pt"))
    shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace, out: str) -> Dict:
    mp.start_processes(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True,
                       start_method="fork" if args.device == "cpu" else "spawn")
    return torch.load(os.path.join(out, f"world{world}.pt"), weights_only=True)


def _cpu_flags() -> List[str]:
    """The vector extensions the CPU kernels choose from, as ``/proc/cpuinfo`` names them."""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        return []
    return sorted(f for f in ("avx2", "avx512f", "avx512_bf16") if f" {f} " in text or f" {f}\n" in text)


def _demo_sized_checkpoint(folder: str) -> str:
    """An untrained QAConv checkpoint of the demo's architecture and input size (this package's format)."""
    from qaconv_ext.cli.demo import DEMO_PREPROCESS
    from qaconv_ext.engine import TrainConfig, build_model, save_checkpoint

    cfg = TrainConfig(arch="small", neck=128, height=128, width=64, preprocess=DEMO_PREPROCESS)
    backbone, criterion = build_model(cfg, 120)
    path = os.path.join(folder, "checkpoint.pt")
    save_checkpoint({"format": "qaconv-ext/1", "epoch": 1, "model": backbone.state_dict(),
                     "head": criterion.matcher.state_dict(), "config": cfg.to_dict()}, path)
    return path


def eval_rerank_case(args: argparse.Namespace) -> Dict:
    """``qaconv eval --rerank`` on the demo's test set in one process and in two (torchrun)."""
    from qaconv_ext.data import make_synthetic_network

    make_synthetic_network(args.eval_data_root)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ck = args.eval_checkpoint or _demo_sized_checkpoint(tmp)
        common = ["eval", "--checkpoint", ck, "--dataset", "synthetic-b", "--data-root", args.eval_data_root,
                  "--device", "cpu", "--rerank", "--rerank-mode", args.eval_rerank_mode, "--no-progress"]
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        for world, launcher in ((1, [sys.executable, "-m", "qaconv_ext"]),
                                (2, [torchrun, "--standalone", "--nproc_per_node=2", "-m", "qaconv_ext"])):
            out = os.path.join(tmp, f"world{world}.json")
            t0 = time.perf_counter()
            proc = subprocess.run(launcher + common + ["--json", out], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(launcher)} eval failed: {proc.stderr.strip().splitlines()[-1:]}")
            result = json.loads(open(out).read())
            result.pop("world_size", None)
            rows.append({"processes": world, "threads_per_process": torch.get_num_threads() if world == 1 else 1,
                         "wall_s": round(wall, 1), "rows": result})
    same = rows[0]["rows"] == rows[1]["rows"]
    for r in rows:
        r["same_rows_as_one_process"] = same
        r["speedup"] = round(rows[0]["wall_s"] / r["wall_s"], 3)
    return {"command": "qaconv eval --rerank --rerank-mode " + args.eval_rerank_mode,
            "dataset": "synthetic-b (144 queries, 1,151 gallery images)", "rows": rows}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", default="1,2", help="process counts to time (default: %(default)s)")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--gallery", type=int, default=1024)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--height", type=int, default=12)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--eval-rerank", action="store_true",
                   help="also time qaconv eval --rerank on the demo's test set, 1 against 2 processes")
    p.add_argument("--eval-checkpoint", default=None, help="the model for --eval-rerank (default: demo-sized, untrained)")
    p.add_argument("--eval-data-root", default=os.path.join("data_cache", "synthetic"),
                   help="the synthetic network's folder (default: %(default)s)")
    p.add_argument("--eval-rerank-mode", default="dense", choices=("dense", "sparse"))
    add_output_args(p, "distributed_cpu.json")
    args = p.parse_args(argv)
    worlds = [int(x) for x in args.processes.split(",")]
    if 1 not in worlds:
        worlds = [1] + worlds
    load_before = os.getloadavg()
    pairs = args.queries * args.gallery
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as out:
        for world in worlds:
            rec = run(world, args, out)
            t = statistics.median(rec["times"])
            if ref is None:
                ref = rec["scores"]
            rows.append({"processes": world, "median_s": round(t, 4), "times_s": [round(x, 4) for x in rec["times"]],
                         "pairs_per_s": round(pairs / t), "identical_to_one_process": bool(torch.equal(rec["scores"], ref))})
    base = rows[0]["median_s"]
    for r in rows:
        r["speedup"] = round(base / r["median_s"], 3)
        r["efficiency"] = round(base / r["median_s"] / r["processes"], 3)
    result = {"machine": machine_record(load_before, os.getloadavg(), None if args.device == "cpu" else "cuda"),
              "threads_per_process": 1, "queries": args.queries, "gallery": args.gallery,
              "shape": [args.channels, args.height, args.width], "rows": rows}
    print(f"{'processes':>9} {'median s':>9} {'pairs/s':>10} {'speed-up':>9} {'efficiency':>10} identical")
    for r in rows:
        print(f"{r['processes']:>9} {r['median_s']:>9.3f} {r['pairs_per_s']:>10} {r['speedup']:>9.2f} "
              f"{r['efficiency']:>10.2f} {r['identical_to_one_process']}")
    ok = all(r["identical_to_one_process"] for r in rows)
    if args.eval_rerank:
        case = eval_rerank_case(args)
        result["machine"]["cpu_flags"] = _cpu_flags()
        result["eval_rerank"] = case
        result["machine"]["load_average_before_after"][1] = round(os.getloadavg()[0], 2)
        print(f"\n{case['command']} on {case['dataset']}:")
        for r in case["rows"]:
            print(f"{r['processes']:>9} processes x {r['threads_per_process']} threads: {r['wall_s']:.1f} s "
                  f"(speed-up {r['speedup']:.2f}), same rows: {r['same_rows_as_one_process']}")
        ok = ok and case["rows"][1]["same_rows_as_one_process"]
    print(f"load average before/after: {result['machine']['load_average_before_after']} "
          f"on {result['machine']['cpu_count']} cores")
    path = output_path(args, "distributed_cpu.json")
    if path:
        write_json(path, result)
        print(f"results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
