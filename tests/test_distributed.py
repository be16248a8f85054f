"""``qaconv_ext.distributed``: shards, option checks, and sharded scoring in real processes (2 ranks,
gloo on the CPU) compared bit for bit with one process."""
from __future__ import annotations

import torch
import pytest

import distributed_workers as workers
from qaconv_ext.distributed import option_mismatches, shard_range, shard_sizes, topk_rows
from qaconv_ext.evaluation import score_blocks, self_score_blocks


@pytest.mark.parametrize("n,world,align", [(0, 2, 1), (1, 2, 1), (11, 2, 1), (10, 3, 1), (100, 4, 8), (5, 3, 4)])
def test_shard_range_covers_once_in_rank_order(n, world, align):
    parts = [shard_range(n, r, world, align) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert [len(p) for p in parts] == shard_sizes(n, world, align)
    for p in parts[:-1]:
        if len(p) and p.stop < n:
            assert (p.stop % align) == 0  # shards start on block boundaries
    blocks = [-(-len(p) // align) for p in parts]
    assert max(blocks) - min(blocks) <= 1


def test_shard_range_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard_range(4, 2, 2)


def test_topk_rows_best_first_ties_in_column_order():
    s = torch.tensor([[0.5, 0.75, 0.5, 0.125], [0.0, 0.0, 1.0, 0.0]])
    v, i = topk_rows(s, 3, offset=10)
    assert i.tolist() == [[11, 10, 12], [12, 10, 11]] and v.tolist() == [[0.75, 0.5, 0.5], [1.0, 0.0, 0.0]]
    assert topk_rows(s, 9)[0].shape == (2, 4)


def test_option_mismatches_names_the_differing_options():
    per_rank = [{"dataset": "a", "checkpoint": "x", "k": 1}, {"dataset": "b", "checkpoint": "x", "k": 1}]
    assert option_mismatches(per_rank) == {"dataset": ["a", "b"]}
    assert option_mismatches(per_rank[:1] * 2) == {}


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_sharded_scores_equal_one_process_bit_for_bit(tmp_path, layout):
    P, N = 5, 11  # shards of 6 and 5 gallery maps
    workers.spawn(workers.score_worker, 2, str(tmp_path), layout, P, N)
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    h = workers.head(layout)
    q, g = workers.maps(1, P), workers.maps(2, N)
    assert torch.equal(got["qg"], score_blocks(h, q, g, progress=False))
    assert torch.equal(got["gg"], self_score_blocks(h, g, chunk=3, progress=False))
    q6, g6 = workers.maps(3, P, h=3, w=2), workers.maps(4, 2 * N - 1, h=3, w=2)
    ref6 = score_blocks(workers.head(layout, hw=(3, 2)), q6, g6, progress=False)
    assert got["start6"] == 11 and got["qg6"].shape == ref6.shape
    assert torch.allclose(got["qg6"], ref6, rtol=1e-6, atol=1e-6)  # h * w not a multiple of 4: to rounding
    full_t = score_blocks(h, q, workers.tie_gallery(g), progress=False)
    for k, (values, index) in got["top"].items():
        ref_v, ref_i = topk_rows(full_t, k)
        assert values.shape == (P, min(k, N)) and torch.equal(values, ref_v) and torch.equal(index, ref_i)
    assert (got["top"][20][1] == 2).nonzero()[:, 1].lt((got["top"][20][1] == 8).nonzero()[:, 1]).all()
    rows = torch.cat([torch.arange(12.).view(6, 2), torch.arange(10.).view(5, 2) + 100])
    assert torch.equal(got["gathered"], rows)
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["everywhere"], rows)


def test_mismatched_options_stop_every_rank_with_one_line(tmp_path):
    workers.spawn(workers.options_worker, 2, str(tmp_path))
    for r in range(2):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert "\n" not in msg and "dataset" in msg and "'duke'" in msg and "checkpoint" not in msg


def test_dead_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    workers.spawn(workers.dead_rank_worker, 2, str(tmp_path), timeout_s=5.0)
    elapsed, msg = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert float(elapsed) < 20.0
    assert "another rank died" in msg


def test_stuck_rank_makes_the_others_fail_after_the_timeout(tmp_path):
    workers.spawn(workers.stuck_rank_worker, 2, str(tmp_path), 6.0, timeout_s=2.0)
    elapsed, msg = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert 1.5 < float(elapsed) < 6.0
    assert "did not answer within the timeout" in msg


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_self_scoring_deals_equal_pair_counts(tmp_path, layout):
    """The gallery x gallery blocks are dealt by pair count: with 1,151 maps (the demo's gallery) and
    blocks of up to 1,024, the two ranks' pair counts differ by at most one block and a few per cent of
    the total, and the matrix is that of one process."""
    import json

    n = 1151
    workers.spawn(workers.pair_count_worker, 2, str(tmp_path), n, 1024, layout)
    counts = [json.loads((tmp_path / f"pairs{r}.json").read_text()) for r in range(2)]
    assert abs(counts[0] - counts[1]) <= 0.05 * sum(counts), counts
    assert sum(counts) <= n * n and (layout == "eccv" or sum(counts) < 0.6 * n * n)  # v2: about half
    from qaconv_ext.distributed import self_score_shares

    jobs, shares = self_score_shares(workers._small_head(layout), n, 1024, 2)
    sizes = [(a1 - a0) * (b1 - b0) for (a0, a1), (b0, b1) in jobs]
    assert sorted(i for s in shares for i in s) == list(range(len(jobs)))
    assert counts == [sum(sizes[i] for i in s) for s in shares]
    assert abs(counts[0] - counts[1]) <= max(sizes)
    one = self_score_blocks(workers._small_head(layout), workers.maps(11, n, d=4, h=2, w=2), chunk=1024,
                            progress=False)
    assert torch.equal(torch.load(tmp_path / "full.pt"), one)
