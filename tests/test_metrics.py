"""evaluate_rank against a plain per-query loop and a hand-checked case."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qaconv_ext.evaluation import evaluate_rank


def loop_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank):
    """One query at a time, written for clarity."""
    max_rank = min(max_rank, dist.shape[1])
    curves, aps, inps = [], [], []
    for i in range(dist.shape[0]):
        order = sorted(range(dist.shape[1]), key=lambda j: (dist[i, j], j))
        ranked = [j for j in order if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        hits = [1 if g_pids[j] == q_pids[i] else 0 for j in ranked]
        if sum(hits) == 0:
            continue
        first = hits.index(1)
        curves.append([1.0 if r >= first else 0.0 for r in range(max_rank)])
        found, precisions, last = 0, [], 0
        for r, h in enumerate(hits):
            if h:
                found += 1
                precisions.append(found / (r + 1))
                last = r + 1
        aps.append(sum(precisions) / len(precisions))
        inps.append(sum(hits) / last)
    return np.mean(np.array(curves), axis=0), float(np.mean(aps)), float(np.mean(inps))


def random_problem(rng, num_q, num_g, num_ids, num_cams, distinct=True):
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    if distinct:
        dist = rng.permutation(num_q * num_g).reshape(num_q, num_g).astype(np.float64) / (num_q * num_g)
    else:
        dist = rng.integers(0, 5, (num_q, num_g)).astype(np.float32)  # many ties: stable order in both
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("distinct", [True, False])
def test_matches_loop(distinct, rng):
    dist, qp, gp, qc, gc = random_problem(rng, 40, 120, 15, 4, distinct)
    cmc, mAP, mINP = evaluate_rank(dist, qp, gp, qc, gc, max_rank=50, return_minp=True)
    ref_cmc, ref_map, ref_inp = loop_rank(dist, qp, gp, qc, gc, 50)
    assert cmc.dtype == np.float32 and cmc.shape == (50,)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert abs(mAP - ref_map) < 1e-9
    assert abs(mINP - ref_inp) < 1e-9


def test_torch_inputs_and_blocks(monkeypatch, rng):
    import qaconv_ext.evaluation.metrics as metrics

    dist, qp, gp, qc, gc = random_problem(rng, 30, 70, 10, 3)
    ref = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 150)  # several row blocks
    out = evaluate_rank(torch.from_numpy(dist), torch.from_numpy(qp), torch.from_numpy(gp),
                        torch.from_numpy(qc), torch.from_numpy(gc), max_rank=10)
    np.testing.assert_array_equal(out[0], ref[0])
    assert abs(out[1] - ref[1]) < 1e-12


def test_hand_checked():
    # one query, pid 1 camera 0; gallery sorted by distance:
    #   g0 pid 1 cam 0 (junk: same pid and camera, removed), g1 pid 2, g2 pid 1 cam 1, g3 pid 3, g4 pid 1 cam 2
    # cleaned ranking: pid2, pid1, pid3, pid1 -> first hit at rank 2, hits at 2 and 4
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    cmc, mAP, mINP = evaluate_rank(dist, [1], [1, 2, 1, 3, 1], [0], [0, 0, 1, 1, 2], max_rank=4,
                                   return_minp=True)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1])
    assert mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert mINP == pytest.approx(2 / 4)


def test_skips_queries_without_match_and_clips_rank():
    dist = np.array([[0.3, 0.1, 0.2], [0.1, 0.2, 0.3]])
    # query 1 (pid 9) has no match; query 0 (pid 1) matches g2 at rank 2
    cmc, mAP = evaluate_rank(dist, [1, 9], [2, 3, 1], [0, 0], [1, 1, 1], max_rank=50)
    assert cmc.shape == (3,)
    np.testing.assert_allclose(cmc, [0, 1, 1])
    assert mAP == pytest.approx(0.5)


def test_errors():
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_rank(np.zeros((2, 3)), [0, 1], [0, 1], [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(np.zeros((1, 2)), [0], [1, 2], [0], [0, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_distances_are_rejected(bad):
    """A NaN/Inf distance matrix used to give plausible metrics; now one line says how many and where."""
    rng = np.random.default_rng(3)
    dist = rng.random((4, 6))
    dist[1, 2] = bad
    dist[3, 0] = bad
    with pytest.raises(ValueError, match=r"^distmat: 2 of 24 distances are not finite \(NaN or Inf\); "
                                         r"the first at query 1, gallery 2") as err:
        evaluate_rank(dist, [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0] * 4, [1] * 6)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="2 of 24"):
        evaluate_rank(torch.from_numpy(dist).float(), [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0] * 4, [1] * 6)
