"""Smoke runs of the search and sparse-evaluation benchmarks on tiny problems (their plumbing and the
agreements they check; the timings mean nothing here)."""
from __future__ import annotations

import json
import os

import pytest
import torch


def test_search_benchmark_runs(bench_path, tmp_path):
    import bench_search

    out = tmp_path / "search.json"
    rec = bench_search.main(["--sizes", "40,90", "--channels", "8", "--height", "4", "--width", "2", "--queries", "2",
                             "--shortlists", "20,60", "--repeats", "1", "--block", "25", "--dir", str(tmp_path),
                             "--in-process", "--json", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "search_cpu"
    assert [r["gallery"] for r in rec["sizes"]] == [40, 90]
    assert set(rec["sizes"][0]["methods"]) == {"exhaustive", "two-stage 20"}  # a shortlist >= N is skipped
    assert set(rec["sizes"][1]["methods"]) == {"exhaustive", "two-stage 20", "two-stage 60"}
    for row in rec["sizes"]:
        for r in row["methods"].values():
            assert "error" not in r, r
            assert r["seconds_per_query"] > 0 and r["peak_mib"] > 0
    ext = rec["extrapolated"]
    assert [s["gallery"] for s in ext["sizes"]] == [10 ** 6, 10 ** 7]
    ex90 = rec["sizes"][1]["methods"]["exhaustive"]["seconds_per_query"]
    assert ext["sizes"][0]["exhaustive"]["seconds_per_query"] == pytest.approx(ex90 * 10 ** 6 / 90)
    assert [p for p in os.listdir(tmp_path) if p.startswith("bench_search.")] == []  # the index is removed


def test_sparse_evaluation_benchmark_agrees_with_dense(bench_path, tmp_path):
    import bench_eval_sparse

    out = tmp_path / "eval.json"
    rec = bench_eval_sparse.main(["--queries", "30", "--gallery", "150", "--ids", "15", "--cameras", "3",
                                  "--dense-check", "--in-process", "--json", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "eval_sparse_cpu"
    sparse, dense = rec["results"]["sparse"], rec["results"]["dense"]
    assert "error" not in sparse and "error" not in dense, rec["results"]
    assert sparse["gallery_rows_asked"] == 150  # every gallery row once; look-ups as single entries
    assert list(sparse["rows"]) == ["QAConv", "QAConv + RR"]
    assert max(rec["max_metric_diff_dense_vs_sparse"].values()) <= 1e-6
    assert rec["problem"]["dense_gg_scores_gib"] == pytest.approx(4 * 150 ** 2 / 2 ** 30)


def test_two_stage_rankings(bench_path):
    import bench_two_stage

    order = torch.tensor([[2, 0, 3, 1]])
    dist = bench_two_stage._ranking_distance(order, 4)
    assert torch.sort(dist, dim=1, stable=True).indices.tolist() == order.tolist()
    desc_sim = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3]])
    full = bench_two_stage._two_stage_order(torch.tensor([[3, 4]]), desc_sim)
    assert full.tolist() == [[3, 4, 1, 2, 0]]  # the shortlist first, then the rest by descriptor
