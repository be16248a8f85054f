"""Drop QAConv matching into another code base's backbone, in a few lines (runs on a CPU in seconds).

What a torchreid / fast-reid / own-code user does:

1. take the backbone's spatial feature maps instead of the pooled vector -- any ResNet's ``layer3``
   output, or torchreid's ``model.featuremaps(x)`` -- and L2-normalise them over channels;
2. score every query/gallery pair with the fused op, ``qaconv_ext.qaconv_score`` (one float per pair,
   the ``[P, N, L, L]`` similarities are never stored), using a trained QAConv head folded into a
   weight vector and a bias, or a plain average of the maxima when there is no head yet;
3. hand ``-score`` to a torchreid-style ``evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)``;
4. for k-reciprocal re-ranking, turn the scores into distances that are >= 0 first,
   ``1 - sigmoid(score / 10)`` (``-score`` is negative, and the re-ranking's column-max normalisation
   would turn its order around, so ``k_reciprocal_rerank`` refuses it).

Here the backbone is a randomly initialised tiny ResNet-like network (so the numbers are those of an
untrained model) and the data are the built-in synthetic camera network, made in a temporary folder.

    python examples/drop_in.py [--out correspondences.png]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import qaconv_ext
from qaconv_ext import QAConv
from qaconv_ext.data import Market1501, build_test_transform, make_synthetic_network, read_image
from qaconv_ext.evaluation import evaluate_rank, score_to_distance
from qaconv_ext.postprocess import k_reciprocal_rerank


# ----------------------------------------------------------------------------------------------
# Someone else's backbone: a tiny ResNet-like network with torchreid's featuremaps() convention
# ----------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """stem (stride 4) -> layer1 -> layer2 (stride 8) -> layer3 (stride 16) -> layer4 -> pooled vector."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.layer4 = BasicBlock(4 * width, 8 * width, 2)

    def featuremaps(self, x: torch.Tensor) -> torch.Tensor:
        """torchreid's convention returns the last stage; QAConv uses the stride-16 ``layer3`` maps."""
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the usual pooled embedding, unused here
        return F.adaptive_avg_pool2d(self.layer4(self.featuremaps(x)), 1).flatten(1)


# ----------------------------------------------------------------------------------------------
# The drop-in part
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def feature_maps(backbone: nn.Module, paths, height: int, width: int, batch_size: int = 64) -> torch.Tensor:
    """[B, d, h, w] channel-L2-normalised maps, as QAConv expects."""
    tf = build_test_transform(height, width, preprocess="imagenet")   # torchreid-style models expect mean/std
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([tf(read_image(p)) for p in paths[i:i + batch_size]])
        out.append(F.normalize(backbone.featuremaps(x), dim=1))
    return torch.cat(out)


def qaconv_head_weights(d: int, h: int, w: int):
    """(weight [2L], bias, head) of a QAConv head folded for evaluation. In real use the head is trained
    (``head.load_state_dict(...)``); here it is freshly initialised, which weights every maximum alike."""
    head = QAConv(d, h, w, layout="v2").eval()
    weight, bias = head.folded()
    return weight.detach(), bias.detach(), head


def qaconv_distmat(qf: torch.Tensor, gf: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Distance matrix (lower = more similar) for torchreid-style evaluation: the negated QAConv score."""
    return -qaconv_ext.qaconv_score(qf, gf, weight, bias)


def qaconv_rerank(qf: torch.Tensor, gf: torch.Tensor, weight: torch.Tensor, bias, k1: int = 20, k2: int = 6,
                  lambda_value: float = 0.3):
    """k-reciprocal re-ranked distances [P, N] (numpy). Re-ranking needs distances >= 0, so the three score
    matrices go in as ``1 - sigmoid(score / 10)``, not negated."""
    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return score_to_distance(qaconv_ext.qaconv_score(a, b, weight, bias))

    return k_reciprocal_rerank(dist(qf, gf), dist(qf, qf), dist(gf, gf), k1=k1, k2=k2, lambda_value=lambda_value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also draw the correspondences of query 0 and its rank-1 image")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic_network(tmp, seed=0, workers=0, progress=False, num_train_ids=4, num_test_ids=24,
                                       num_distractors=20, num_junk=2, images_per_visit=(1, 3))
        ds = Market1501(paths["domain_b"])
        backbone = TinyResNet().eval()
        H, W = 128, 64
        qf = feature_maps(backbone, [r.path for r in ds.query], H, W)
        gf = feature_maps(backbone, [r.path for r in ds.gallery], H, W)
        d, h, w = qf.shape[1:]
        weight, bias, head = qaconv_head_weights(d, h, w)
        distmat = qaconv_distmat(qf, gf, weight, bias)  # [num_query, num_gallery]
        ids = ([r.pid for r in ds.query], [r.pid for r in ds.gallery], [r.camid for r in ds.query],
               [r.camid for r in ds.gallery])
        cmc, mAP = evaluate_rank(distmat, *ids, max_rank=10)
        print(f"{len(ds.query)} queries x {len(ds.gallery)} gallery, maps {d}x{h}x{w} (layer3, stride 16), "
              "head: qaconv_ext.QAConv (untrained)")
        print(f"untrained backbone: Rank-1 {100 * cmc[0]:.1f} %, Rank-5 {100 * cmc[4]:.1f} %, mAP {100 * mAP:.1f} %")
        cmc_rr, mAP_rr = evaluate_rank(qaconv_rerank(qf, gf, weight, bias), *ids, max_rank=10)
        print(f"  + re-ranking:     Rank-1 {100 * cmc_rr[0]:.1f} %, Rank-5 {100 * cmc_rr[4]:.1f} %, "
              f"mAP {100 * mAP_rr:.1f} %")
        if args.out:
            from qaconv_ext.viz import draw_correspondences

            top = int(torch.argmin(distmat[0]))
            draw_correspondences(ds.query[0].path, ds.gallery[top].path, qf[0], gf[top], head=head,
                                 max_lines=30).save(args.out)
            print(f"correspondences -> {args.out}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
