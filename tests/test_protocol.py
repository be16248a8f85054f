"""The junk rule of the Market-1501 protocol: one helper for the metrics and the pictures."""
from __future__ import annotations

import numpy as np
import torch

from qaconv_ext.evaluation import evaluate_rank, junk_mask


def test_junk_is_same_identity_and_same_camera():
    g_pids = np.array([1, 1, 2, 1, 0])
    g_cams = np.array([0, 1, 0, 0, 0])
    assert junk_mask(1, 0, g_pids, g_cams).tolist() == [True, False, False, True, False]
    assert junk_mask(2, 1, g_pids, g_cams).tolist() == [False] * 5


def test_junk_mask_broadcasts_blocks_of_queries_on_numpy_and_torch():
    rng = np.random.default_rng(3)
    q_pids, q_cams = rng.integers(0, 4, 6), rng.integers(0, 3, 6)
    g_pids, g_cams = rng.integers(0, 4, 20), rng.integers(0, 3, 20)
    want = np.array([[gp == qp and gc == qc for gp, gc in zip(g_pids, g_cams)] for qp, qc in zip(q_pids, q_cams)])
    block = junk_mask(q_pids[:, None], q_cams[:, None], g_pids[None, :], g_cams[None, :])
    assert np.array_equal(block, want)
    t = junk_mask(torch.from_numpy(q_pids)[:, None], torch.from_numpy(q_cams)[:, None],
                  torch.from_numpy(g_pids)[None, :], torch.from_numpy(g_cams)[None, :])
    assert t.dtype == torch.bool and np.array_equal(t.numpy(), want)


def test_metrics_ignore_exactly_the_junk():
    """Junk entries do not count: moving them anywhere in the ranking leaves CMC, mAP and mINP unchanged,
    and dropping them from the gallery gives the same numbers."""
    rng = np.random.default_rng(7)
    P, G = 5, 40
    q_pids, q_cams = np.arange(1, P + 1), np.zeros(P, dtype=np.int64)
    g_pids, g_cams = rng.integers(1, P + 1, G), rng.integers(0, 3, G)
    dist = rng.random((P, G))
    junk = junk_mask(q_pids[:, None], q_cams[:, None], g_pids[None, :], g_cams[None, :])
    assert junk.any() and (~junk & (g_pids[None, :] == q_pids[:, None])).any(axis=1).all()
    base = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, return_minp=True)
    moved = np.where(junk, -1.0, dist)   # every junk entry ranked first
    again = evaluate_rank(moved, q_pids, g_pids, q_cams, g_cams, max_rank=10, return_minp=True)
    np.testing.assert_array_equal(base[0], again[0])
    assert base[1:] == again[1:]
    for p in range(P):   # one query at a time, its junk removed from the gallery
        keep = ~junk[p]
        alone = evaluate_rank(dist[p:p + 1, keep], q_pids[p:p + 1], g_pids[keep], q_cams[p:p + 1], g_cams[keep],
                              max_rank=10, return_minp=True)
        one = evaluate_rank(dist[p:p + 1], q_pids[p:p + 1], g_pids, q_cams[p:p + 1], g_cams, max_rank=10,
                            return_minp=True)
        np.testing.assert_array_equal(alone[0], one[0])
        assert alone[1:] == one[1:]
