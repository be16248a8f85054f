"""Smoke runs of the benchmark scripts on tiny problems, so a GPU session does not find their bugs.

They check the scripts' plumbing and that the paths they compare agree; the timings mean nothing here.
"""
from __future__ import annotations

import json


def test_gallery_benchmark_runs_and_its_paths_agree(bench_path, tmp_path):
    import bench_gallery

    out = tmp_path / "gallery.json"
    rc = bench_gallery.main(["--device", "cpu", "--sizes", "tiny", "--height", "4", "--width", "3",
                             "--channels", "16", "--repeats", "1", "--mm-size", "64", "--training-size", "4,20",
                             "--max-queries-fused", "24", "--max-queries-simple", "8",
                             "--max-queries-unfused", "16", "--max-gallery-unfused", "100", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    (row,) = rec["gallery"]
    assert (row["queries"], row["gallery"], row["L"]) == (40, 300, 12)
    assert row["fused_timed_queries"] == 24 and row["unfused_timed_pairs"] == 16 * 100
    # the unfused path computes in float16: agreement to its rounding
    assert row["fused_vs_unfused_max_abs_diff"] < 5e-3
    assert row["tensor_core_vs_simple_max_abs_diff"] == 0.0  # one CPU kernel twice
    assert rec["training"]["pairs"] == 80 and rec["training"]["grad_rel_err_vs_reference"] < 1e-5
    assert row["fused_s"] > 0 and row["speedup_vs_unfused"] > 0
    rc = bench_gallery.main(["--device", "cpu", "--sizes", "tiny", "--height", "2", "--width", "2", "--channels", "8",
                             "--repeats", "1", "--mm-size", "32", "--training-size", "0", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["training"] is None  # '0' skips the training problem


def test_tlift_benchmark_runs_and_matches_the_loop(bench_path, tmp_path):
    import bench_tlift

    out = tmp_path / "tlift.json"
    rec = bench_tlift.main(["--queries", "60", "--gallery", "200", "--cams", "3", "--spans", "600,3000",
                            "--loop-probes", "20", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "tlift_cpu"
    assert [c["time_span_s"] for c in rec["cases"]] == [600.0, 3000.0]
    for case in rec["cases"]:
        assert case["max_abs_diff_vs_loop"] < 1e-6 and case["loop"]["probes_timed"] == 20


def test_backward_benchmark_runs_and_agrees(bench_path, tmp_path):
    import bench_backward

    out = tmp_path / "backward.json"
    rec = bench_backward.main(["--batch", "3", "--classes", "7", "--channels", "16", "--maps", "4x2,3x3",
                               "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "cpu_backward"
    assert [c["map"] for c in rec["cases"]] == ["4x2", "3x3"]
    for case in rec["cases"]:
        assert case["grad_rel_err_vs_reference"] < 1e-5
        assert case["backward_query_only_s"] > 0 and case["backward_both_s"] > 0


def test_match_benchmark_times_bfloat16_interleaved(bench_path, monkeypatch):
    import argparse

    import bench_match

    monkeypatch.setattr(bench_match, "INTERLEAVED_SAMPLE_S", 0.002)

    args = argparse.Namespace(threads=1, seed=0, queries=2, gallery=3, channels=6, height=2, width=3,
                              interleaved_rounds=2, compare_kernels=["generic"])
    rec = bench_match._interleaved_worker(args)
    assert rec["rounds"] == 2 and rec["problem"]["queries"] == 2 and rec["problem"]["gallery"] == 3
    kernel = rec["kernel"]
    assert set(rec["gflops_median"]) == {"fused score float32", f"fused score bfloat16 [{kernel}]",
                                         "fused score bfloat16 [generic]", "torch.mm float32", "torch.mm bfloat16",
                                         "torch.mm float32 limit", "torch.mm bfloat16 limit"}
    assert all(v > 0 for v in rec["gflops_median"].values())
    assert len(rec["gflops_per_round"]) == 2
    assert {"bfloat16 / float32 fused score", "fused bfloat16 / torch.mm bfloat16",
            f"fused score bfloat16 [{kernel}] / fused score bfloat16 [generic]"} <= set(rec["ratio_median"])
