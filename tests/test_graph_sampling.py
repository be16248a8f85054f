"""QAConv 2.x pieces: the graph sampler, the hard triplet and pairwise matching losses, and the class
memory matched in chunks (``mem_batch_size``), each against a plain re-derivation written here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qaconv_ext import ClassMemoryLoss, PairwiseMatchingLoss, QAConv, TripletLoss
from qaconv_ext.data import GraphSampler, Record
from helpers import unit_maps


def _records(sizes):
    """Hand-made records: class ``c`` (pid ``10 + c``) has ``sizes[c]`` images, interleaved."""
    recs, left = [], list(sizes)
    k = 0
    while any(left):
        for c, n in enumerate(left):
            if n:
                recs.append(Record(f"img{k}.jpg", 10 + c, 0, None))
                left[c] -= 1
                k += 1
    return recs


def _points(num_classes, gen):
    """A fixed 2-D position per class; the distance of two classes is that of their points."""
    return torch.rand(num_classes, 2, generator=gen, dtype=torch.float64)


def _distance_fn(points, records, calls):
    def fn(indices):
        calls.append(list(indices))
        return torch.cdist(points, points)
    return fn


SIZES = [1, 2, 3, 4, 5, 2, 3, 7]


def _sampler(gen, batch_size=8, num_instance=2, seed=0, calls=None):
    recs = _records(SIZES)
    points = _points(len(SIZES), gen)
    calls = [] if calls is None else calls
    return GraphSampler(recs, batch_size, num_instance, _distance_fn(points, recs, calls), seed=seed), recs, points


def test_every_class_anchors_one_batch_of_its_nearest_classes(gen):
    calls = []
    s, recs, points = _sampler(gen, calls=calls)
    C, B, K = len(SIZES), 8, 2
    assert len(s) == C * B
    flat = list(s)
    assert len(flat) == C * B and len(calls) == 1
    # the distances were asked among one image per class, in class order
    assert [recs[i].pid for i in calls[0]] == [10 + c for c in range(C)]
    dist = torch.cdist(points, points)
    anchors = []
    for b in range(C):
        batch = flat[b * B:(b + 1) * B]
        pids = [recs[i].pid - 10 for i in batch]
        groups = [pids[j:j + K] for j in range(0, B, K)]
        assert all(len(set(g)) == 1 for g in groups), groups        # num_instance images of one class each
        classes = [g[0] for g in groups]
        anchor = classes[-1]                                         # the anchor comes last
        anchors.append(anchor)
        d = dist[anchor].clone()
        d[anchor] = float("inf")
        expected = torch.argsort(d, stable=True)[:B // K - 1].tolist()
        assert classes[:-1] == expected                              # its nearest classes, nearest first
    assert sorted(anchors) == list(range(C))                         # each class anchors exactly one batch
    assert anchors != list(range(C))                                 # batches shuffled (fixed seed)


def test_images_are_drawn_round_robin(gen):
    s, recs, _ = _sampler(gen)
    seen = {c: [] for c in range(len(SIZES))}
    for _ in range(3):
        batches = s.epoch_batches().tolist()
        batches.sort(key=lambda b: recs[b[-1]].pid)       # drawn anchor by anchor, before the shuffle
        for batch in batches:
            for j in range(0, len(batch), 2):
                c = recs[batch[j]].pid - 10
                seen[c].extend(batch[j:j + 2])
    for c, drawn in seen.items():
        n = SIZES[c]
        own = sorted(i for i, r in enumerate(recs) if r.pid == 10 + c)
        assert set(drawn) <= set(own)
        # every full pass over the class's images shows each image once (a pass ends where the list
        # runs out; a class with one image repeats it within the pair)
        passes, pos = [], 0
        for k in range(len(drawn) // n):
            passes.append(sorted(drawn[pos:pos + n]))
            pos += n
        assert passes and all(p == own for p in passes), (c, drawn)


def test_round_robin_reshuffles_at_the_end_of_a_class(gen):
    """The public rule: take what is left, reshuffle, continue from the start of the new order."""
    recs = _records([3, 3])
    s = GraphSampler(recs, 4, 2, lambda idx: torch.zeros(2, 2), seed=1)
    order = list(s.images[0])
    first = s._draw(0)
    assert first == order[:2] and s.pointers[0] == 2
    second = s._draw(0)
    assert second[0] == order[2] and s.pointers[0] == 1
    assert second[1] == s.images[0][0] and sorted(s.images[0]) == sorted(order)
    single = GraphSampler(_records([1, 1]), 4, 2, lambda idx: torch.zeros(2, 2))
    assert single._draw(0) == [0, 0]


def test_deterministic_fresh_each_epoch_and_state_round_trip(gen):
    s1, recs, points = _sampler(gen, seed=5)
    s2 = GraphSampler(recs, 8, 2, _distance_fn(points, recs, []), seed=5)
    e1, e2 = list(s1), list(s2)
    assert e1 == e2
    assert list(s1) != e1                                           # a new epoch, new draws
    state = s1.state_dict()
    after = list(s1)
    s3 = GraphSampler(recs, 8, 2, _distance_fn(points, recs, []), seed=123)
    s3.load_state_dict(state)
    assert list(s3) == after
    s4 = GraphSampler(recs, 8, 2, _distance_fn(points, recs, []), seed=6)
    assert list(s4) != e1
    with pytest.raises(ValueError, match="another training set"):
        GraphSampler(_records(SIZES[:-1] + [6]), 8, 2, lambda i: torch.zeros(8, 8)).load_state_dict(state)


class _UnitMaps(nn.Module):
    """A tiny trunk: a strided conv, L2-normalised over channels, with a BatchNorm to watch the modes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return nn.functional.normalize(self.bn(self.conv(x)), dim=1)


def test_the_default_distances_are_qaconv_scores(tmp_path, gen):
    """qaconv_distance_fn: the model's maps of the chosen images with the given input preset, scored by the
    folded head through the fused op (negated), as the evaluation scores them; the modules' modes (a
    frozen BN too) are kept."""
    import numpy as np
    from PIL import Image

    from qaconv_ext.evaluation import extract_features, self_score_blocks
    from qaconv_ext.scoring import qaconv_distance_fn

    rng = np.random.default_rng(0)
    recs = []
    for k, pid in enumerate([1, 1, 2, 2, 3, 3, 4, 4]):
        path = str(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (16, 8, 3), dtype=np.uint8)).save(path)
        recs.append(Record(path, pid, 0, None))
    model, head = _UnitMaps(), QAConv(8, 4, 2)
    model.bn.eval()                                  # as the trainer's frozen BatchNorms
    s = GraphSampler(recs, 4, 2, qaconv_distance_fn(model, head, recs, 16, 8, preprocess="imagenet", progress=False))
    idx = [0, 3, 5, 6]
    got = s.distance_fn(idx)
    assert model.training and not model.bn.training and head.training
    fea = extract_features(model, [recs[i] for i in idx], 16, 8, progress=False, preprocess="imagenet")
    want = -self_score_blocks(head, fea, progress=False)
    assert torch.allclose(got, want, atol=1e-5)
    assert len(list(s)) == 4 * 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=7, num_instance=2), "not a multiple of num_instance 2"),
    (dict(batch_size=20, num_instance=2), "needs 10 classes, the training set has 8"),
    (dict(batch_size=8, num_instance=0), "num_instance must be positive"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GraphSampler(_records(SIZES), distance_fn=lambda i: torch.zeros(8, 8), **kwargs)
    with pytest.raises(ValueError, match="distance_fn returned shape"):
        list(GraphSampler(_records(SIZES), 8, 2, lambda i: torch.zeros(3, 3)))


# ----------------------------------------------------------------------------------------------
# Losses against float64 re-derivations
# ----------------------------------------------------------------------------------------------

class Plain(nn.Module):
    """A matcher returning a fixed score matrix (and its gradient path) for the loss tests."""

    def __init__(self, score):
        super().__init__()
        self.score = nn.Parameter(score)

    def forward(self, q, g):
        return self.score + 0 * q.sum() * g.sum()


def _targets(gen, n=12):
    t = torch.randint(0, 4, (n,), generator=gen)
    t[0] = 9                                       # a class with one sample: no positive pair
    return t


def test_triplet_loss_matches_a_float64_rederivation(gen):
    t = _targets(gen)
    n = t.numel()
    score = torch.randn(n, n, generator=gen, dtype=torch.float64) * 20
    crit = TripletLoss(Plain(score.clone()), margin=16)
    loss, acc = crit(torch.randn(n, 1, 1, 1, dtype=torch.float64), t)
    ref_loss, ref_acc = [], []
    for i in range(n):
        pos = [score[i, j].item() for j in range(n) if t[j] == t[i] and j != i]
        neg = [score[i, j].item() for j in range(n) if t[j] != t[i]]
        mp, mn = (min(pos) if pos else 1e15), (max(neg) if neg else -1e15)
        ref_loss.append(max(0.0, mn - mp + 16))
        ref_acc.append(float(mp >= mn))
    assert torch.allclose(loss, torch.tensor(ref_loss, dtype=torch.float64))
    assert acc.tolist() == ref_acc
    assert loss[0] == 0 and acc[0] == 1
    loss.sum().backward()   # the gradient reaches exactly the hardest pairs
    g = crit.matcher.score.grad
    assert int((g != 0).sum()) == 2 * int((loss > 0).sum())


def test_pairwise_matching_loss_matches_a_float64_rederivation(gen):
    import math
    t = _targets(gen)
    n = t.numel()
    score = torch.randn(n, n, generator=gen, dtype=torch.float64) * 3
    loss, acc = PairwiseMatchingLoss(Plain(score.clone()))(torch.randn(n, 1, 1, 1, dtype=torch.float64), t)
    ref_loss, ref_acc = [], []
    for i in range(n):
        total = 0.0
        for j in range(n):
            y, s = float(t[i] == t[j]), score[i, j].item()
            p = 1 / (1 + math.exp(-s))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))   # every pair, itself included
        ref_loss.append(total)
        pos = [score[i, j].item() for j in range(n) if t[j] == t[i] and j != i]
        neg = [score[i, j].item() for j in range(n) if t[j] != t[i]]
        ref_acc.append(float((min(pos) if pos else 1e15) > (max(neg) if neg else -1e15)))
    assert torch.allclose(loss, torch.tensor(ref_loss, dtype=torch.float64), rtol=1e-10)
    assert acc.tolist() == ref_acc


# ----------------------------------------------------------------------------------------------
# Class memory in chunks
# ----------------------------------------------------------------------------------------------

def _memory_pair(gen, C=7, mem_batch_size=None):
    d, h, w = 8, 3, 2
    head = QAConv(d, h, w)
    a = ClassMemoryLoss(head, C, d, h, w)
    torch.manual_seed(0)
    b = ClassMemoryLoss(QAConv(d, h, w), C, d, h, w, mem_batch_size=mem_batch_size)
    b.load_state_dict(a.state_dict())
    mem = unit_maps(C, d, h, w, generator=gen)
    for crit in (a, b):
        crit.class_memory.copy_(mem)
        crit.valid_class[:C - 1] = 1
    return a, b, unit_maps(5, d, h, w, generator=gen), torch.tensor([0, 3, 6, 3, 1])


def test_mem_batch_size_none_is_one_call(gen):
    a, b, fea, t = _memory_pair(gen)
    assert b.mem_batch_size is None
    la, aa = a(fea, t)
    lb, ab = b(fea, t)
    assert torch.equal(la, lb) and torch.equal(aa, ab)
    c = ClassMemoryLoss(QAConv(8, 3, 2), 7, 8, 3, 2, mem_batch_size=7)   # as many as classes: one call
    c.load_state_dict(_memory_pair(gen)[0].state_dict())


def test_mem_batch_size_matches_a_chunked_rederivation(gen):
    """Each chunk of classes is one call of the head in training mode: its own batch statistics, and the
    running statistics updated chunk after chunk."""
    a, b, fea, t = _memory_pair(gen, C=7, mem_batch_size=3)
    fea64 = fea.double().requires_grad_()
    ref_bn = {k: v.double().clone() for k, v in a.matcher.state_dict().items()}
    head = a.matcher
    w_fc, b_fc = head.fc.weight.double().reshape(-1), head.fc.bias.double()
    mem = a.class_memory.double()
    logits, mom, eps = [], head.bn.momentum, head.bn.eps
    for i in range(0, 7, 3):
        g = mem[i:i + 3]
        q = fea64.flatten(2)                               # [B, d, L]
        s = torch.einsum("bdl,cdm->bclm", q, g.flatten(2))  # [B, c, L, L]
        vals = torch.cat([s.max(dim=3).values, s.max(dim=2).values], dim=2)  # v2: query-location maxima first
        x = vals.reshape(-1)
        m, v = x.mean(), x.var(unbiased=False)
        y = (vals - m) / torch.sqrt(v + eps) * head.bn.weight.double() + head.bn.bias.double()
        L = y.shape[2] // 2
        z = y[..., :L] @ w_fc + y[..., L:] @ w_fc + 2 * b_fc
        zm, zv = z.mean(), z.var(unbiased=False)
        out = (z - zm) / torch.sqrt(zv + head.logit_bn.eps) * head.logit_bn.weight.double() + head.logit_bn.bias.double()
        logits.append(out)
        n1, n2 = x.numel(), z.numel()
        ref_bn["bn.running_mean"] = (1 - mom) * ref_bn["bn.running_mean"] + mom * m
        ref_bn["bn.running_var"] = (1 - mom) * ref_bn["bn.running_var"] + mom * v * n1 / (n1 - 1)
        ref_bn["logit_bn.running_mean"] = (1 - mom) * ref_bn["logit_bn.running_mean"] + mom * zm
        ref_bn["logit_bn.running_var"] = (1 - mom) * ref_bn["logit_bn.running_var"] + mom * zv * n2 / (n2 - 1)
    score = torch.cat(logits, dim=1)
    onehot = torch.zeros_like(score).scatter_(1, t[:, None], 1.0)
    p = torch.sigmoid(score)
    bce = nn.functional.binary_cross_entropy_with_logits(score, onehot, reduction="none")
    ref = (bce * torch.where(onehot > 0, 1 - p, p) ** 2 * b.valid_class.double()).sum(1)

    loss, acc = b(fea, t)
    assert torch.allclose(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    assert acc.tolist() == (score.argmax(1) == t).double().tolist()
    for key in ("bn.running_mean", "bn.running_var", "logit_bn.running_mean", "logit_bn.running_var"):
        assert torch.allclose(b.matcher.state_dict()[key].double(), ref_bn[key], rtol=1e-4, atol=1e-6), key
    assert int(b.matcher.bn.num_batches_tracked) == 3
    # the chunked loss differs from the one-call loss (other statistics), and so do the running stats
    la, _ = a(fea, t)
    assert not torch.allclose(la, loss)


def test_mem_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="mem_batch_size must be None or a positive integer"):
        ClassMemoryLoss(QAConv(8, 3, 2), 7, 8, 3, 2, mem_batch_size=0)


# ----------------------------------------------------------------------------------------------
# The gs recipe: the schedule, the command, exact resume, bad input
# ----------------------------------------------------------------------------------------------

def test_loss_drop_schedule_follows_the_public_rule():
    from qaconv_ext.engine import LossDropSchedule

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.005)
    s = LossDropSchedule(opt)
    fired = [s.step(x) for x in (9.0, 5.0, 4.0, 3.6, 3.4, 1.0)]
    # the second epoch's loss (5.0) is the reference; 3.4 < 0.7 x 5 after epoch 5 -> x0.1, end after 5 + 2
    assert fired == [False, False, False, False, True, False]
    assert (s.base_loss, s.stepped_at, s.final_epochs) == (5.0, 5, 7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0005)
    t = LossDropSchedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


@pytest.fixture(scope="module")
def tiny_market(tmp_path_factory):
    from helpers import write_tiny_market

    root = tmp_path_factory.mktemp("gsmarket") / "Market-1501-v15.09.15"
    return str(write_tiny_market(root, seed=2, train_ids=range(1, 7), test_ids=range(10, 12), size=(32, 16)))


def _gs(market, *extra):
    from qaconv_ext import cli

    argv = ["train", "--recipe", "gs", "--dataset", "market1501", "--data-root", market, "--arch", "small",
            "--neck", "16", "--height", "32", "--width", "16", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--no-progress", *extra]
    return cli.main([str(a) for a in argv])


def test_gs_recipe_trains_and_resumes_exactly(tiny_market, tmp_path, capsys):
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    assert _gs(tiny_market, "--epochs", 3, "--checkpoint-dir", straight) == 0
    out = capsys.readouterr().out
    assert "recipe=gs" in out
    assert _gs(tiny_market, "--epochs", 2, "--checkpoint-dir", parted) == 0
    from qaconv_ext import cli
    assert cli.main(["train", "--resume", str(parted), "--epochs", "3", "--device", "cpu", "--no-progress"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(parted / "checkpoint.pt", weights_only=True)
    cfg = a["config"]
    assert (cfg["recipe"], cfg["batch_size"], cfg["lr"], cfg["clip_grad"], cfg["augment"], cfg["freeze_bn"]) == \
        ("gs", 8, 0.005, 8.0, "v2", True)
    assert a["scheduler"]["kind"] == "loss_drop" and a["epoch"] == 3
    assert set(a["criterion"]) == {"matcher." + k for k in a["head"]}      # triplet loss: no class memory
    assert [h["batches"] for h in a["history"]] == [6, 6, 6]                # 6 classes x 8 images / 8
    for part in ("model", "criterion"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)
    for key, value in a["sampler"].items():
        assert torch.equal(b["sampler"][key], value), key
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.parametrize("extra, match", [
    (["--batch-size", "7"], "the gs batch size 7 is not a multiple of num_instance 2"),
    (["--batch-size", "16"], "needs 8 classes, market1501 in .* has 6"),
    (["--mem-batch-size", "4"], "--mem-batch-size applies to the class memory of --recipe eccv"),
])
def test_gs_bad_input_is_one_line(tiny_market, tmp_path, capsys, extra, match):
    import re

    with pytest.raises(SystemExit) as err:
        _gs(tiny_market, "--epochs", 1, "--checkpoint-dir", tmp_path / "run", *extra)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qaconv train: ") and re.search(match, lines[0]), lines


def test_unknown_recipe_is_refused(capsys):
    from qaconv_ext import cli
    from qaconv_ext.engine import TrainConfig, build_model

    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        TrainConfig.for_recipe("fast")
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        build_model(TrainConfig(recipe="fast", arch="small"), 4)
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--recipe", "fast", "--dataset", "market1501"])
    assert err.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_sharded_graph_sampler_batches_join_to_the_one_process_epoch():
    """Under DDP each rank takes its slice of every global batch of the same graph-sampled epoch."""
    from qaconv_ext.distributed import ShardedBatchSampler

    expected = _sampler(torch.Generator().manual_seed(11), seed=4)[0].epoch_batches().tolist()
    for world in (1, 2, 4):
        parts = []
        for r in range(world):
            s = _sampler(torch.Generator().manual_seed(11), seed=4)[0]
            parts.append(list(ShardedBatchSampler(0, 8, r, world, sampler=s)))
        assert all(len(p) == len(SIZES) for p in parts)
        assert [sum((p[i] for p in parts), []) for i in range(len(SIZES))] == expected
