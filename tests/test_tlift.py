"""tlift against a plain per-probe loop with the same semantics."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from qaconv_ext.postprocess import tlift


def loop_tlift(score, gal_cam, gal_time, prob_cam, prob_time, tau, sigma, K, alpha):
    """One probe and one gallery camera at a time, in float64."""
    score = np.asarray(score, dtype=np.float64)
    weight = np.zeros_like(score)
    for i in range(score.shape[0]):
        together = [j for j in range(score.shape[0])
                    if prob_cam[j] == prob_cam[i] and abs(prob_time[j] - prob_time[i]) < tau]
        assert i in together
        for g in np.unique(gal_cam):
            cols = np.flatnonzero(gal_cam == g)
            block = score[np.ix_(together, cols)]
            ordered = np.sort(block, axis=None)
            thr = ordered[-K] if ordered.size > K else ordered[0]
            _, pivot_pos = np.nonzero(block >= thr)  # one entry per block element, duplicates kept
            pivot_times = gal_time[cols[pivot_pos]]
            for x in cols:
                weight[i, x] = np.mean([math.exp(-((ty - gal_time[x]) ** 2) / sigma ** 2)
                                        for ty in pivot_times])
    return (weight + alpha) * score


def random_inputs(rng, n_p, n_g, n_cams, span, quantised=False):
    score = rng.random((n_p, n_g))
    if quantised:
        score = np.round(score * 8) / 8  # many ties, also at the threshold
    gal_cam = rng.integers(0, n_cams, n_g)
    prob_cam = rng.integers(0, n_cams, n_p)
    gal_time = rng.uniform(0, span, n_g)
    prob_time = rng.uniform(0, span, n_p)
    if quantised:
        gal_time = np.round(gal_time / 25) * 25
        prob_time = np.round(prob_time / 25) * 25  # time differences exactly at tau occur
    return score, gal_cam, gal_time, prob_cam, prob_time


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("K", [1, 3, 10])
def test_matches_loop(quantised, K, rng):
    s, gc, gt, pc, pt = random_inputs(rng, 30, 45, 3, 600, quantised)
    kw = dict(tau=100, sigma=200, K=K, alpha=0.2)
    out = tlift(s, gc, gt, pc, pt, **kw)
    ref = loop_tlift(s, gc, gt, pc, pt, **kw)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_small_gallery_cameras_and_float32_torch(rng):
    # gallery cameras with fewer than K entries, a probe camera absent from the gallery
    s, gc, gt, pc, pt = random_inputs(rng, 25, 12, 4, 300)
    pc[:3] = 7
    ref = loop_tlift(s, gc, gt, pc, pt, tau=80, sigma=150, K=10, alpha=0.1)
    out = tlift(torch.from_numpy(s).float(), torch.from_numpy(gc), torch.from_numpy(gt),
                torch.from_numpy(pc), torch.from_numpy(pt), tau=80, sigma=150, K=10, alpha=0.1)
    assert torch.is_tensor(out) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=1e-6)


def test_chunked(monkeypatch, rng):
    mod = importlib.import_module("qaconv_ext.postprocess.tlift")

    s, gc, gt, pc, pt = random_inputs(rng, 40, 50, 2, 400, quantised=True)
    ref = loop_tlift(s, gc, gt, pc, pt, 100, 200, 10, 0.2)
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 64)
    np.testing.assert_allclose(tlift(s, gc, gt, pc, pt), ref, rtol=0, atol=1e-6)


def test_weights_hand_checked():
    # one probe, one gallery camera with K >= block size: thr = smallest entry -> every gallery is a pivot
    score = np.array([[0.5, 0.25]])
    out = tlift(score, [0, 0], [0.0, 100.0], [0], [0.0], sigma=100, K=10, alpha=0.0)
    w = (1 + math.exp(-1)) / 2
    np.testing.assert_allclose(out, [[0.5 * w, 0.25 * w]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rng):
    s, gc, gt, pc, pt = random_inputs(rng, 60, 80, 3, 600, quantised=True)
    ref = loop_tlift(s, gc, gt, pc, pt, 100, 200, 10, 0.2)
    args = [torch.from_numpy(a).cuda() for a in (s, gc, gt, pc, pt)]
    out = tlift(*args)
    assert out.is_cuda
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=0, atol=1e-6)


def test_errors():
    s = np.random.default_rng(0).random((3, 4))
    cams_g, t_g, cams_p, t_p = np.zeros(4, int), np.zeros(4), np.zeros(3, int), np.zeros(3)
    with pytest.raises(ValueError, match="gal_cam"):
        tlift(s, np.zeros(5, int), t_g, cams_p, t_p)
    with pytest.raises(ValueError, match="prob_time"):
        tlift(s, cams_g, t_g, cams_p, np.zeros(2))
    with pytest.raises(ValueError, match="gal_time"):
        tlift(s, cams_g, np.array([0, 1, np.nan, 2]), cams_p, t_p)
    with pytest.raises(ValueError, match="score"):
        tlift(np.array([[np.inf] * 4] * 3), cams_g, t_g, cams_p, t_p)
    with pytest.raises(ValueError, match="prob_cam"):
        tlift(s, cams_g, t_g, np.array([0.5, 1, 2]), t_p)
    for tau in (0, -1):
        with pytest.raises(ValueError, match="tau: must be > 0"):
            tlift(s, cams_g, t_g, cams_p, t_p, tau=tau)


def test_nan_scores_are_rejected():
    s = np.random.default_rng(2).random((3, 4))
    s[2, 1] = np.nan
    for x in (s, torch.from_numpy(s).float()):
        with pytest.raises(ValueError, match="score: all entries must be finite"):
            tlift(x, np.zeros(4, int), np.zeros(4), np.zeros(3, int), np.zeros(3))
