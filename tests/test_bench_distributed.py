"""Smoke run of benchmarks/bench_distributed.py on a tiny problem: 1 and 2 processes give the same scores."""
from __future__ import annotations

import json


def test_distributed_benchmark_runs_and_processes_agree(bench_path, tmp_path):
    import bench_distributed

    out = tmp_path / "dist.json"
    assert bench_distributed.main(["--queries", "6", "--gallery", "21", "--channels", "8", "--height", "4",
                                   "--width", "3", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["processes"] for r in rec["rows"]] == [1, 2]
    assert all(r["identical_to_one_process"] for r in rec["rows"])
    assert rec["rows"][0]["efficiency"] == 1.0 and rec["threads_per_process"] == 1
