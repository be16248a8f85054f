"""Correspondence and ranked-list pictures, the picture CLI commands, and the demo-picture helper."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

import qaconv_ext  # noqa: E402
from qaconv_ext import QAConv  # noqa: E402
from qaconv_ext.data import ImageReadError, Market1501, make_synthetic_network  # noqa: E402
from qaconv_ext.viz import (  # noqa: E402
    correspondence_segments,
    draw_correspondences,
    draw_matches,
    draw_ranked_list,
    head_contributions,
    relative_contributions,
    head_logit,
    infer_stride,
    rank_gallery,
)
from qaconv_ext.cli.pictures import rank_query, save_demo_pictures  # noqa: E402
from qaconv_ext.evaluation import extract_features  # noqa: E402

RED, BLACK = (255, 0, 0), (0, 0, 0)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def one_hot_pair(h, w, gen):
    """Maps whose matches are known: a's location s holds e_s, b's location r holds e_perm[r]."""
    L = h * w
    perm = torch.randperm(L, generator=gen)
    fa = torch.eye(L).reshape(L, h, w)
    fb = torch.eye(L)[:, perm].reshape(L, h, w)
    inv = torch.argsort(perm)  # a's location s matches b's location inv[s]
    return fa, fb, perm, inv


def plain(w, h, color=BLACK):
    return Image.new("RGB", (w, h), color)


def centre(idx, width, stride, ox=0.0):
    return ox + (idx % width + 0.5) * stride, (idx // width + 0.5) * stride


def randomise_head(head, gen):
    with torch.no_grad():
        head.fc.weight.copy_(torch.rand(head.fc.weight.shape, generator=gen) - 0.3)
        head.fc.bias.fill_(0.37)
        for bn in (head.bn, head.logit_bn):
            bn.running_mean.fill_(float(torch.rand(1, generator=gen)))
            bn.running_var.fill_(0.5 + float(torch.rand(1, generator=gen)))
            bn.weight.fill_(0.5 + float(torch.rand(1, generator=gen)))
            bn.bias.fill_(float(torch.rand(1, generator=gen)) - 0.5)
    return head.eval()


class TinyBackbone(torch.nn.Module):
    """Stride-16 stand-in backbone giving L2-normalised maps of ``neck`` channels."""

    def __init__(self, neck=16):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, neck, 4, stride=4))

    def forward(self, x):
        return torch.nn.functional.normalize(self.body(x), dim=1)


# ----------------------------------------------------------------------------------------------
# Geometry: lines land where the indices say
# ----------------------------------------------------------------------------------------------

def test_segments_follow_the_op_indices(gen):
    h, w, stride, gap = 4, 2, 16, 10
    fa, fb, perm, inv = one_hot_pair(h, w, gen)
    img, segs = draw_correspondences(plain(w * stride, h * stride), plain(w * stride, h * stride), fa, fb,
                                     max_lines=None, scale=1, gap=gap, caption=False, return_segments=True)
    L = h * w
    assert len(segs) == 2 * L and img.size == (2 * w * stride + gap, h * stride)
    ox = w * stride + gap
    for s in segs:
        if s.direction == "a_to_b":
            assert s.loc_b == int(inv[s.loc_a])
        else:
            assert s.loc_a == int(perm[s.loc_b])
        assert s.xy_a == centre(s.loc_a, w, stride)
        assert s.xy_b == centre(s.loc_b, w, stride, ox)
        assert s.value == pytest.approx(1.0)


@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
def test_pixels_on_the_line_and_nowhere_else(gen, direction):
    h, w, stride, gap = 6, 3, 12, 7
    La = Lb = h * w
    values = torch.rand(La + Lb, generator=gen)
    indices = torch.cat([torch.randint(0, Lb, (La,), generator=gen), torch.randint(0, La, (Lb,), generator=gen)])
    img, segs = draw_matches(plain(w * stride, h * stride), plain(w * stride, h * stride), values, indices,
                             (h, w), direction=direction, max_lines=1, scale=1, gap=gap, line_width=1,
                             markers=False, color=RED, return_segments=True)
    assert len(segs) == 1
    best = int(torch.argmax(values[:La] if direction == "a_to_b" else values[La:]))
    if direction == "a_to_b":
        loc_a, loc_b = best, int(indices[best])
    else:
        loc_a, loc_b = int(indices[La + best]), best
    pa = centre(loc_a, w, stride)
    pb = centre(loc_b, w, stride, w * stride + gap)
    px = img.load()
    on = [pa, pb, ((pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2)]
    for x, y in on:
        # Pillow may put a 1-pixel line's midpoint on either neighbour of a half-pixel position.
        near = [px[int(round(x)) + dx, int(round(y)) + dy] for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
        assert RED in near, (x, y)
    assert px[int(round(pa[0])), int(round(pa[1]))] == RED
    assert px[int(round(pb[0])), int(round(pb[1]))] == RED
    arr = np.asarray(img)
    red = np.all(arr == RED, axis=-1)
    # Every red pixel lies within a pixel of the segment pa -> pb.
    ys, xs = np.nonzero(red)
    d = np.array(pb) - np.array(pa)
    t = np.clip(((np.stack([xs, ys], 1) - pa) @ d) / (d @ d), 0, 1)
    dist = np.linalg.norm(np.stack([xs, ys], 1) - (np.array(pa) + t[:, None] * d), axis=1)
    assert dist.max() <= 1.5
    assert red.sum() >= int(np.abs(d).max())  # a continuous (Bresenham) line, not a few dots


def test_the_op_drives_the_picture(gen):
    """End to end: one-hot maps, real op, the pixel at each a->b line's midpoint is the line colour."""
    h, w, stride = 3, 2, 20
    fa, fb, perm, inv = one_hot_pair(h, w, gen)
    # All values tie at 1, so pick each line in turn by giving it the only high strength.
    values, indices = qaconv_ext.qaconv_match(fa[None], fb[None], return_indices=True)
    for s in range(h * w):
        strengths = torch.zeros(2 * h * w)
        strengths[s] = 1.0
        img, segs = draw_matches(plain(w * stride, h * stride), plain(w * stride, h * stride), values, indices,
                                 (h, w), strengths=strengths, threshold=0.5, scale=1, gap=0, line_width=3,
                                 color=RED, markers=False, return_segments=True)
        assert [(g.loc_a, g.loc_b) for g in segs] == [(s, int(inv[s]))]
        pa, pb = centre(s, w, stride), centre(int(inv[s]), w, stride, w * stride)
        mid = (int((pa[0] + pb[0]) / 2), int((pa[1] + pb[1]) / 2))
        px = img.load()
        assert px[mid] == RED and px[int(pa[0]), int(pa[1])] == RED and px[int(pb[0]), int(pb[1])] == RED
        assert np.all(np.asarray(img)[:, :, 1] == 0)  # nothing but red on black


def test_scale_and_image_size_move_the_points():
    values = torch.tensor([0.9, 0.1, 0.2, 0.8])  # a: 2 locations (1x2), b: 2 locations
    indices = torch.tensor([1, 0, 1, 0])
    img, segs = draw_matches(plain(40, 20), plain(40, 20), values, indices, (1, 2), image_size=(32, 64),
                             scale=2, gap=4, max_lines=1, return_segments=True)
    assert img.size == (2 * 64 * 2 + 4, 32 * 2)
    s = segs[0]
    assert (s.loc_a, s.loc_b) == (0, 1)
    assert s.xy_a == (16.0 * 2, 16.0 * 2)
    assert s.xy_b == (64 * 2 + 4 + 48.0 * 2, 16.0 * 2)


# ----------------------------------------------------------------------------------------------
# Threshold, max_lines, direction, colours
# ----------------------------------------------------------------------------------------------

def test_threshold_and_max_lines(gen):
    h, w = 4, 3
    L = h * w
    values = torch.rand(2 * L, generator=gen)
    indices = torch.randint(0, L, (2 * L,), generator=gen)
    common = dict(stride_a=(8, 8), stride_b=(8, 8))
    all_segs = correspondence_segments(values, indices, (h, w), (h, w), max_lines=None, **common)
    assert len(all_segs) == 2 * L
    strengths = [s.strength for s in all_segs]
    assert strengths == sorted(strengths, reverse=True)  # strongest first
    for thr in (0.25, 0.5, 0.9):
        segs = correspondence_segments(values, indices, (h, w), (h, w), threshold=thr, max_lines=None, **common)
        assert len(segs) == int((values >= thr).sum())
        assert all(s.strength >= thr for s in segs)
    for k in (0, 1, 5):
        segs = correspondence_segments(values, indices, (h, w), (h, w), max_lines=k, **common)
        assert len(segs) == k
        assert sorted(s.strength for s in segs) == sorted(torch.topk(values.double(), k).values.tolist())
    segs = correspondence_segments(values, indices, (h, w), (h, w), threshold=0.5, max_lines=3, **common)
    assert len(segs) == min(3, int((values >= 0.5).sum()))
    a2b = correspondence_segments(values, indices, (h, w), (h, w), direction="a_to_b", max_lines=None, **common)
    b2a = correspondence_segments(values, indices, (h, w), (h, w), direction="b_to_a", max_lines=None, **common)
    assert len(a2b) == len(b2a) == L
    assert {s.direction for s in a2b} == {"a_to_b"} and {s.direction for s in b2a} == {"b_to_a"}
    # Colours: strongest line red end of the map, weakest blue end.
    assert all_segs[0].color[0] > all_segs[0].color[2] and all_segs[-1].color[2] > all_segs[-1].color[0]


def test_fixed_colour_scale():
    values = torch.tensor([0.5, 0.2, 0.9, 0.1])
    indices = torch.tensor([1, 0, 1, 0])
    kw = dict(stride_a=(8, 8), stride_b=(8, 8), max_lines=None)
    segs = correspondence_segments(values, indices, (1, 2), (1, 2), vmin=0.0, vmax=1.0, **kw)
    from qaconv_ext.viz import strength_colormap

    assert [s.color for s in segs] == [strength_colormap(v) for v in (0.9, 0.5, 0.2, 0.1)]
    # Outside the range: clipped to the ends of the map.
    segs = correspondence_segments(values, indices, (1, 2), (1, 2), vmin=0.3, vmax=0.6, **kw)
    assert segs[0].color == strength_colormap(1.0) and segs[-1].color == strength_colormap(0.0)


def test_max_lines_counts_drawn_lines(gen):
    h, w, stride = 4, 2, 16
    fa = torch.nn.functional.normalize(torch.randn(8, h, w, generator=gen), dim=0)
    fb = torch.nn.functional.normalize(torch.randn(8, h, w, generator=gen), dim=0)
    for k in (1, 3, 7):
        img, segs = draw_correspondences(plain(w * stride, h * stride), plain(w * stride, h * stride), fa, fb,
                                         max_lines=k, scale=1, return_segments=True)
        assert len(segs) == k
    values, _ = qaconv_ext.qaconv_match(fa[None], fb[None], return_indices=True)
    v = torch.unique(values.reshape(-1))  # sorted, distinct (mutual matches repeat a value)
    k = len(v) // 2
    thr = float(v[k - 1] + v[k]) / 2  # between two values: immune to rounding of the re-normalised maps
    _, segs = draw_correspondences(plain(w * stride, h * stride), plain(w * stride, h * stride), fa, fb,
                                   threshold=thr, max_lines=None, return_segments=True)
    assert len(segs) == int((values >= thr).sum())


# ----------------------------------------------------------------------------------------------
# Head contributions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_head_contributions(gen, layout):
    h, w, d = 4, 2, 8
    L = h * w
    head = randomise_head(QAConv(d, h, w, layout=layout), gen)
    fa = torch.nn.functional.normalize(torch.randn(1, d, h, w, generator=gen), dim=1)
    fb = torch.nn.functional.normalize(torch.randn(1, d, h, w, generator=gen), dim=1)
    values = qaconv_ext.qaconv_match(fa, fb)[0, 0]
    c = head_contributions(values, head)
    # The formula, written out for location slots: fc weight x BN-normalised maximum.
    bn = head.bn
    norm = (values.double() - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    norm = norm * bn.weight.detach().double() + bn.bias.detach().double()
    fw = head.fc.weight.detach().double().reshape(-1)
    slot = torch.cat([fw, fw]) if layout == "v2" else torch.cat([fw[L:], fw[:L]])
    assert torch.allclose(c, slot * norm, atol=1e-12)
    # Sum of contributions -> the head's eval-mode logit; unit steps in a maximum -> the folded weights.
    with torch.no_grad():
        logit = head(fa, fb)[0, 0]
        weight, _ = head.folded()
    assert float(head_logit(values, head)) == pytest.approx(float(logit), abs=1e-4)
    a2 = float(head.logit_bn.weight.detach()) / float(torch.sqrt(head.logit_bn.running_var + head.logit_bn.eps))
    c1 = head_contributions(values + 1.0, head) - head_contributions(values, head)
    assert torch.allclose(c1 * a2, weight.double().reshape(-1), atol=1e-5)
    # Lines are ranked by contribution, not by raw similarity.
    _, segs = draw_correspondences(plain(32, 64), plain(32, 64), fa, fb, head=head, max_lines=None,
                                   return_segments=True)
    got = sorted(((s.direction, s.loc_a if s.direction == "a_to_b" else s.loc_b), s.strength) for s in segs)
    want = sorted([(("a_to_b", i), float(c[i])) for i in range(L)]
                  + [(("b_to_a", i), float(c[L + i])) for i in range(L)])
    assert [g[0] for g in got] == [x[0] for x in want]
    # draw_correspondences re-normalises the (already unit) maps: float32 rounding differs slightly
    assert np.allclose([g[1] for g in got], [x[1] for x in want], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_relative_contributions(gen, layout):
    h, w, d, M = 4, 2, 8, 9
    head = randomise_head(QAConv(d, h, w, layout=layout), gen)
    fa = torch.nn.functional.normalize(torch.randn(1, d, h, w, generator=gen), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(M, d, h, w, generator=gen), dim=1)
    ref = qaconv_ext.qaconv_match(fa, gallery)[0]  # [M, 2L]: the query against the reference images
    values = ref[3]
    rel = relative_contributions(values, ref, head)
    assert torch.allclose(rel, head_contributions(values, head) - head_contributions(ref, head).mean(0),
                          atol=1e-12)
    assert torch.allclose(rel, relative_contributions(values, ref.double().mean(0), head), atol=1e-12)
    # They sum to the pair's logit minus the average match's, before the final BatchNorm's scale.
    a2 = float(head.logit_bn.weight.detach()) / float(torch.sqrt(head.logit_bn.running_var + head.logit_bn.eps))
    want = (float(head_logit(values, head)) - float(head_logit(ref.mean(0), head))) / a2
    assert float(rel.sum()) == pytest.approx(want, rel=1e-6, abs=1e-6)  # a2 above is float32 arithmetic
    # draw_correspondences ranks the lines by them and says so.
    img, segs = draw_correspondences(plain(32, 64), plain(32, 64), fa, gallery[3], head=head, reference=ref,
                                     max_lines=5, return_segments=True, font_size=8)
    # (it re-normalises the unit maps: float32 rounding differs slightly)
    assert np.allclose([sg.strength for sg in segs], torch.sort(rel, descending=True).values[:5].numpy(),
                       rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="need the QAConv head"):
        draw_correspondences(plain(32, 64), plain(32, 64), fa, gallery[3], reference=ref)
    with pytest.raises(ValueError, match="reference"):
        relative_contributions(values, ref[:, :5], head)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------

def test_inconsistent_sizes_are_named(gen):
    fa = torch.randn(8, 24, 8, generator=gen)
    with pytest.raises(ValueError, match=r"image_a is 64x128.*feature map is 8x24"):
        draw_correspondences(plain(64, 128), plain(64, 128), fa, fa)
    with pytest.raises(ValueError, match="larger than the image"):
        draw_correspondences(plain(4, 12), plain(4, 12), fa, fa)
    with pytest.raises(ValueError, match="inconsistent"):
        draw_correspondences(plain(128, 384), plain(128, 384), fa, fa, stride=8)
    # The cure the message suggests works.
    img = draw_correspondences(plain(64, 128), plain(64, 128), fa, fa, image_size=(384, 128), scale=1)
    assert img.height >= 384
    assert infer_stride((384, 128), (24, 8)) == (16.0, 16.0)
    assert infer_stride((130, 64), (9, 4), stride=16) == (16.0, 16.0)


def test_bad_features_and_arguments(gen):
    fa = torch.randn(8, 4, 2, generator=gen)
    with pytest.raises(ValueError, match="channel counts differ"):
        draw_correspondences(plain(32, 64), plain(32, 64), fa, torch.zeros(6, 4, 2))
    with pytest.raises(ValueError, match=r"fea_b: expected a feature map \[d, h, w\]"):
        draw_correspondences(plain(32, 64), plain(32, 64), fa, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="batch of 2"):
        draw_correspondences(plain(32, 64), plain(32, 64), fa, torch.zeros(2, 8, 4, 2))
    with pytest.raises(ValueError, match="direction"):
        draw_correspondences(plain(32, 64), plain(32, 64), fa, fa, direction="sideways")
    with pytest.raises(ValueError, match="max_lines"):
        draw_correspondences(plain(32, 64), plain(32, 64), fa, fa, max_lines=-2)
    values, indices = torch.rand(16, generator=gen), torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError, match=r"values: expected La \+ Lb = 8 \+ 8 = 16"):
        draw_matches(plain(32, 64), plain(32, 64), torch.zeros(15), indices, (4, 2))
    bad = indices.clone()
    bad[3] = 8
    with pytest.raises(ValueError, match="must index b's 8 locations"):
        draw_matches(plain(32, 64), plain(32, 64), values, bad, (4, 2))
    with pytest.raises(ValueError, match="one pair"):
        draw_matches(plain(32, 64), plain(32, 64), torch.zeros(2, 1, 16), indices.expand(2, 1, 16), (4, 2))
    # A head of another map size.
    head = QAConv(8, 6, 2).eval()
    with pytest.raises(ValueError, match="head's height x width"):
        draw_correspondences(plain(32, 64), plain(32, 64), fa, fa, head=head)


def test_missing_files_are_named(tmp_path, gen):
    fa = torch.randn(8, 4, 2, generator=gen)
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="nope.jpg"):
        draw_correspondences(missing, plain(32, 64), fa, fa)
    with pytest.raises(ImageReadError, match="nope.jpg"):
        draw_ranked_list(missing, [plain(32, 64)], [0.5])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="junk.jpg"):
        draw_correspondences(plain(32, 64), str(junk), fa, fa)


def test_paths_and_arrays_as_images(tmp_path, gen):
    p = tmp_path / "a.png"
    plain(32, 64, (10, 20, 30)).save(p)
    fa = torch.randn(1, 8, 4, 2, generator=gen)
    arr = np.full((64, 32, 3), 200, dtype=np.uint8)
    img = draw_correspondences(str(p), arr, fa, fa[0], scale=1, caption=True)
    assert img.width == 32 + 10 + 32 and img.height > 64  # a caption strip was added
    assert img.getpixel((0, 0)) == (10, 20, 30) and img.getpixel((img.width - 1, 0)) == (200, 200, 200)


# ----------------------------------------------------------------------------------------------
# Ranked lists
# ----------------------------------------------------------------------------------------------

def test_ranked_list_frames_and_order(gen):
    n = 12
    gallery = [plain(32, 64, (i * 20, 100, 100)) for i in range(n)]
    scores = torch.rand(n, generator=gen)
    matches = np.zeros(n, dtype=bool)
    matches[[1, 4, 7]] = True
    green, red = (0, 170, 60), (220, 30, 30)
    img, cells = draw_ranked_list(plain(32, 64), gallery, scores, matches, k=5, return_cells=True,
                                  true_color=green, false_color=red, cell_height=64, frame=4)
    order = torch.argsort(scores, descending=True)[:5].tolist()
    assert [c.index for c in cells] == order and [c.rank for c in cells] == [1, 2, 3, 4, 5]
    px = img.load()
    for c in cells:
        x0, y0, x1, y1 = c.box
        want = green if matches[c.index] else red
        for (x, y) in ((x0, y0), (x1, y1), (x0 + 1, (y0 + y1) // 2), ((x0 + x1) // 2, y1 - 1)):
            assert px[x, y] == want
        assert px[x0 + 4, y0 + 4] == (c.index * 20, 100, 100)  # the right image inside the frame
        assert c.match == bool(matches[c.index])
    assert len(cells) == 5
    # Distances: lower is better; ignore removes entries; k larger than the gallery is clipped.
    _, cells = draw_ranked_list(plain(32, 64), gallery, scores, matches, k=50, higher_is_better=False,
                                ignore=np.arange(n) == int(torch.argmin(scores)), return_cells=True)
    assert len(cells) == n - 1
    assert [c.index for c in cells] == torch.argsort(scores)[1:].tolist()
    assert list(rank_gallery([0.2, float("nan"), 0.9], None)) == [2, 0, 1]


def test_ranked_list_bad_inputs():
    g = [plain(32, 64)] * 3
    with pytest.raises(ValueError, match="3 images"):
        draw_ranked_list(plain(32, 64), g, [0.1, 0.2])
    with pytest.raises(ValueError, match="matches: has 2 entries"):
        draw_ranked_list(plain(32, 64), g, [0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="k: must be >= 1"):
        draw_ranked_list(plain(32, 64), g, [0.1, 0.2, 0.3], k=0)


# ----------------------------------------------------------------------------------------------
# Synthetic data: demo pictures and the CLI
# ----------------------------------------------------------------------------------------------

TINY = dict(num_train_ids=4, num_test_ids=8, num_distractors=4, num_junk=2, images_per_visit=(1, 2),
            group_interval=60.0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz_synthetic")
    paths = make_synthetic_network(str(root), seed=5, workers=0, progress=False, **TINY)
    return Market1501(paths["domain_b"])


def test_ranked_list_of_records(synthetic):
    q = synthetic.query[0]
    gallery = synthetic.gallery
    scores = np.array([1.0 if g.pid == q.pid else 0.0 for g in gallery]) + np.linspace(0, 0.5, len(gallery))
    img, cells = draw_ranked_list(q, gallery, scores, k=4, return_cells=True)  # matches from the pids
    n_true = sum(g.pid == q.pid for g in gallery)
    assert [c.match for c in cells] == [True] * min(4, n_true) + [False] * (4 - min(4, n_true))
    assert img.height > 128


def test_save_demo_pictures(synthetic, tmp_path, gen):
    model = TinyBackbone()
    head = randomise_head(QAConv(16, 8, 4), gen)
    paths = save_demo_pictures(model, head, synthetic, str(tmp_path / "pics"), k=5, preprocess="public")
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["correspondences_match.png", "correspondences_nonmatch.png", "overview.png",
                     "ranked_list.png"]
    sizes = {}
    for p in paths:
        with Image.open(p) as im:
            assert im.width > 100 and im.height > 100
            sizes[os.path.basename(p)] = im.size
    # The overview holds the two correspondence pictures side by side above the ranked list.
    (mw, mh), (nw, nh), (rw, rh) = (sizes["correspondences_match.png"], sizes["correspondences_nonmatch.png"],
                                    sizes["ranked_list.png"])
    assert sizes["overview.png"] == (max(mw + nw + 16, rw), max(mh, nh) + 16 + rh)


def test_rank_query(synthetic, gen):
    """One query against the gallery: the head's scores, the same-identity-and-camera junk left out of
    an order that is best first."""
    model = TinyBackbone()
    head = randomise_head(QAConv(16, 8, 4), gen)
    gallery = synthetic.gallery
    g_fea = extract_features(model, gallery, 128, 64, progress=False)
    for qi in (0, len(synthetic.query) - 1):
        q = synthetic.query[qi]
        r = rank_query(model, head, q, gallery, g_fea, 128, 64, preprocess="public")
        assert r.features.shape == (1, 16, 8, 4)
        with torch.no_grad():
            want = head(r.features, g_fea).reshape(-1).numpy()
        np.testing.assert_allclose(r.scores, want, rtol=1e-5, atol=1e-5)
        pids, cams = np.array([g.pid for g in gallery]), np.array([g.camid for g in gallery])
        assert np.array_equal(r.junk, (pids == q.pid) & (cams == q.camid))
        assert np.array_equal(r.matches, pids == q.pid)
        assert sorted(r.order.tolist()) == np.flatnonzero(~r.junk).tolist()
        assert np.all(np.diff(r.scores[r.order]) <= 0)
        assert r.top_is_match == bool(r.matches[r.order[0]])


def test_cli_missing_checkpoint_says_run_demo(tmp_path, monkeypatch):
    from qaconv_ext.cli import match as cli_match
    from qaconv_ext.cli import rank as cli_rank

    parser = argparse.ArgumentParser(prog="qaconv")
    sub = parser.add_subparsers(dest="command")
    cli_match.register(sub)
    cli_rank.register(sub)
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["match", "a.jpg", "b.jpg"])
    with pytest.raises(SystemExit, match="qaconv demo"):
        args.func(args)
    args = parser.parse_args(["rank", "--query-index", "0"])
    with pytest.raises(SystemExit, match="qaconv demo"):
        args.func(args)
    args = parser.parse_args(["rank", "--checkpoint", "other.pt"])
    with pytest.raises(SystemExit, match="checkpoint not found: other.pt"):
        args.func(args)


def test_cli_round_trip(synthetic, tmp_path, monkeypatch, capsys):
    """Checkpoint -> `qaconv match` and `qaconv rank` pictures."""
    from qaconv_ext.cli import match as cli_match
    from qaconv_ext.cli import rank as cli_rank
    from qaconv_ext.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone(name="small", pretrained_path=None, neck=16).eval()
    H, W = 128, 64
    with torch.no_grad():
        d, fh, fw = model(torch.zeros(1, 3, H, W)).shape[1:]
    head = QAConv(d, fh, fw).eval()
    ckpt = tmp_path / "runs" / "demo" / "qaconv.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "head": head.state_dict(),
                "config": {"backbone": "small", "neck": 16, "height": H, "width": W}}, ckpt)
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="qaconv")
    sub = parser.add_subparsers(dest="command")
    cli_match.register(sub)
    cli_rank.register(sub)
    q, g = synthetic.query[0].path, synthetic.gallery[0].path
    args = parser.parse_args(["match", q, g, "-o", "m.png", "--max-lines", "7"])
    assert args.func(args) == 0
    assert "7 lines drawn" in capsys.readouterr().out and os.path.isfile("m.png")
    args = parser.parse_args(["rank", "--dataset", synthetic.root, "--query-index", "1", "-k", "4",
                              "-o", "r.png", "--correspondences"])
    assert args.func(args) == 0
    assert os.path.isfile("r.png") and os.path.isfile("r_top1.png")
    args = parser.parse_args(["rank", "--dataset", synthetic.root, "--query-index", "9999"])
    with pytest.raises(SystemExit, match="out of range"):
        args.func(args)


# ----------------------------------------------------------------------------------------------
# The pictures' numbers are the head's
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_contributions_add_up_to_the_heads_score(layout):
    gen = torch.Generator().manual_seed(31 if layout == "v2" else 32)
    d, h, w = 8, 4, 2
    head = randomise_head(QAConv(d, h, w, layout=layout).double(), gen)
    q = torch.nn.functional.normalize(torch.randn(3, d, h, w, generator=gen, dtype=torch.float64), dim=1)
    g = torch.nn.functional.normalize(torch.randn(5, d, h, w, generator=gen, dtype=torch.float64), dim=1)
    values = qaconv_ext.qaconv_match(q, g)  # [3, 5, 2L]
    c = head_contributions(values, head)
    assert c.dtype == torch.float64 and not c.requires_grad
    _, bias_total = head.slot_weights()
    with torch.no_grad():
        through_logit_bn = head.logit_bn((c.sum(-1) + bias_total).reshape(1, 1, -1)).reshape(3, 5)
        score = head.eval()(q, g)  # the fused, folded eval-mode score
        assert torch.equal(c, head.contributions(values))
    err = (through_logit_bn - score).abs().max() / score.abs().max()
    assert float(err) < 1e-13
    assert float((head_logit(values, head) - score).abs().max() / score.abs().max()) < 1e-13
    # relative contributions: this pair's minus the average reference match's
    rel = relative_contributions(values[0, 2], values[0], head)
    assert torch.equal(rel, c[0, 2] - head_contributions(values[0].mean(0), head))


def test_pictures_take_the_heads_layout_names_and_errors():
    from qaconv_ext.head import normalize_layout

    with pytest.raises(ValueError) as info:
        normalize_layout("symmetric")
    expected = str(info.value)
    fa = torch.nn.functional.normalize(torch.randn(8, 4, 2, generator=torch.Generator().manual_seed(5)), dim=0)
    head = QAConv(8, 4, 2).eval()
    values, _ = qaconv_ext.viz.match_pair(fa, fa)
    head.layout = "symmetric"  # a name the head's table does not hold
    for draw in (lambda: head_contributions(values, head), lambda: head_logit(values, head),
                 lambda: relative_contributions(values, values, head),
                 lambda: draw_correspondences(plain(32, 64), plain(32, 64), fa, fa, head=head)):
        with pytest.raises(ValueError) as info:
            draw()
        assert str(info.value) == expected
    # only a QAConv head (a state dict becomes one with QAConv.from_state_dict)
    lookalike = torch.nn.Module()
    lookalike.bn, lookalike.fc, lookalike.logit_bn = head.bn, head.fc, head.logit_bn
    with pytest.raises(TypeError, match="expected a qaconv_ext.QAConv.*from_state_dict"):
        head_contributions(values, lookalike)
