"""Memory-bounded re-ranking in evaluation: ``rerank_mode="sparse"`` (gallery-gallery rows from the fused op
in blocks, no [G, G] matrix) gives the dense mode's distances and metrics; ``qaconv eval --rerank-mode``."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from helpers import pair_order, put_market_views, uneven_head
from qaconv_ext import QAConv, cli

Image = pytest.importorskip("PIL.Image")

IMG_H, IMG_W, NECK = 32, 16, 8


def test_sparse_rerank_mode_equals_dense():
    from qaconv_ext.data import Record
    from qaconv_ext.evaluation import evaluate_qaconv_features, rerank_distance, score_rows, self_score_blocks

    gen = torch.Generator().manual_seed(8)
    head = uneven_head(16, 2, 2)
    ids = 20
    base = torch.randn(ids, 16, 2, 2, generator=gen)

    def sample(n):
        pid = torch.randint(0, ids, (n,), generator=gen)
        cam = torch.randint(0, 4, (n,), generator=gen)
        fea = torch.nn.functional.normalize(base[pid] + 1.2 * torch.randn(n, 16, 2, 2, generator=gen), dim=1)
        return fea, [Record("", int(p) + 1, int(c), None) for p, c in zip(pid, cam)]

    qf, qr = sample(30)
    gf, gr = sample(160)
    dense = evaluate_qaconv_features(head, qf, gf, qr, gr, rerank=True, progress=False)
    sparse = evaluate_qaconv_features(head, qf, gf, qr, gr, rerank=True, rerank_mode="sparse", progress=False)
    assert "gg" in dense.scores and "gg" not in sparse.scores
    for row in dense.rows:
        for m in ("rank1", "rank5", "mAP", "mINP"):
            assert sparse.rows[row][m] == pytest.approx(dense.rows[row][m], abs=1e-6), (row, m)
    assert 0.2 < dense.rows["QAConv + RR"]["mAP"] < 0.95  # not a trivial problem
    # the distances themselves, with the rows computed on demand
    rows = score_rows(head, gf, gallery_chunk=64)
    s_gg = self_score_blocks(head, gf, progress=False)
    block = rows(10, 50)
    assert torch.allclose(block, s_gg[10:50], rtol=1e-5, atol=1e-5)
    r, c = torch.tensor([10, 49, 10, 33]), torch.tensor([5, 159, 7, 33])
    assert torch.equal(rows.entries(r.numpy(), c.numpy()), block[r - 10, c])  # the same values as the rows
    d_dense = rerank_distance(dense.scores["qg"], dense.scores["qq"], s_gg)
    d_sparse = rerank_distance(dense.scores["qg"], dense.scores["qq"], rows, mode="sparse")
    assert np.allclose(d_sparse, d_dense, atol=1e-5)



@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A tiny Market-1501 tree (6 identities, 2 cameras) and a tiny untrained QAConv checkpoint."""
    from qaconv_ext.models import build_backbone

    root = tmp_path_factory.mktemp("market")
    data = root / "Market-1501-v15.09.15"
    put_market_views(data, range(1, 7), [("query", 1), ("bounding_box_test", 2), ("bounding_box_test", 2),
                                          ("bounding_box_test", 1), ("bounding_box_train", 1)],
                     seed=3, noise=40, size=(IMG_H, IMG_W))
    torch.manual_seed(0)
    backbone = build_backbone("small", neck=NECK).eval()
    head = QAConv(NECK, IMG_H // 8, IMG_W // 8).eval()
    ck = root / "model.pt"
    torch.save({"format": "qaconv-ext/1", "model": backbone.state_dict(), "head": head.state_dict(),
                "config": {"method": "qaconv", "arch": "small", "neck": NECK, "height": IMG_H, "width": IMG_W}}, ck)
    return {"root": str(root), "ck": str(ck)}


def test_eval_command_rerank_mode(market, tmp_path):
    outs = {}
    for mode in ("dense", "sparse"):
        out = tmp_path / f"{mode}.json"
        argv = ["eval", "--checkpoint", market["ck"], "--dataset", "market1501", "--data-root", market["root"],
                "--device", "cpu", "--workers", 0, "--no-progress", "--rerank", "--rerank-mode", mode, "--json", out]
        assert cli.main([str(a) for a in argv]) == 0
        outs[mode] = json.loads(out.read_text())
    assert list(outs["sparse"]) == ["QAConv", "QAConv + RR"]
    for row in outs["dense"]:
        for m, v in outs["dense"][row].items():
            assert outs["sparse"][row][m] == pytest.approx(v, abs=1e-6)
    assert outs["dense"]["QAConv + RR"]["mAP"] < 1.0  # the problem is not trivial


def test_rerank_mode_is_checked():
    from qaconv_ext.evaluation import evaluate_qaconv_features

    with pytest.raises(ValueError, match="rerank_mode"):
        evaluate_qaconv_features(uneven_head(4, 2, 2), torch.randn(2, 4, 2, 2), torch.randn(3, 4, 2, 2), [], [],
                                 rerank=True, rerank_mode="blocks")


def test_amp_evaluation_on_the_cpu_scores_bfloat16_maps(market, tmp_path, monkeypatch):
    """``--amp`` on the CPU keeps the feature maps in bfloat16 and the fused op scores them as they are, with
    its bfloat16 kernel (channel pairs): the scores are the bits of the float32 kernel on the same maps in
    that kernel's channel order (helpers.pair_order)."""
    from qaconv_ext import ops
    from qaconv_ext.data import Market1501
    from qaconv_ext.engine import load_trained
    from qaconv_ext.evaluation import evaluate_qaconv, evaluate_qaconv_features, extract_features

    backbone, head, cfg = load_trained(market["ck"])
    ds = Market1501(os.path.join(market["root"], "Market-1501-v15.09.15"))
    seen = []
    real_score = ops.qaconv_score
    monkeypatch.setattr("qaconv_ext.scoring.qaconv_score",
                        lambda q, g, *a: (seen.append((q.dtype, g.dtype)), real_score(q, g, *a))[1])
    amp = evaluate_qaconv(backbone, head, ds.query, ds.gallery, IMG_H, IMG_W, rerank=True, progress=False, amp=True,
                          preprocess=cfg["preprocess"])
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    q, g = (extract_features(backbone, recs, IMG_H, IMG_W, progress=False, dtype=torch.bfloat16,
                             preprocess=cfg["preprocess"])
            for recs in (ds.query, ds.gallery))
    assert q.dtype == torch.bfloat16
    ref = evaluate_qaconv_features(head, pair_order(q), pair_order(g), ds.query, ds.gallery, rerank=True,
                                   progress=False)
    assert amp.rows == ref.rows
    assert torch.equal(amp.scores["qg"], ref.scores["qg"])
    widened = evaluate_qaconv_features(head, q.float(), g.float(), ds.query, ds.gallery, progress=False)
    assert torch.allclose(amp.scores["qg"], widened.scores["qg"], rtol=0, atol=1e-5)
    argv = ["eval", "--checkpoint", market["ck"], "--dataset", "market1501", "--data-root", market["root"],
            "--device", "cpu", "--workers", 0, "--no-progress", "--amp", "--json", tmp_path / "amp.json"]
    seen.clear()
    assert cli.main([str(a) for a in argv]) == 0
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    row = json.loads((tmp_path / "amp.json").read_text())["QAConv"]
    assert (row["rank1"], row["mAP"]) == pytest.approx((amp.rows["QAConv"]["rank1"], amp.rows["QAConv"]["mAP"]))
