"""Transforms: shapes, bilinear resize, normalisation, flip, Random Block, seeding and workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from qaconv_ext.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomBlock,
    RandomHorizontalFlip,
    build_test_transform,
    build_train_transform,
    denormalize,
)

Image = pytest.importorskip("PIL.Image")


def _gradient_image(w=50, h=100):
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[..., 2] = 40
    return Image.fromarray(a)


def _black(w=64, h=128):
    return Image.new("RGB", (w, h), (0, 0, 0))


def _white_square(t: torch.Tensor):
    """(top, left, side) of the all-white pixels of a [3, H, W] uint8 or [0,1] tensor; None if none."""
    white = (t >= (255 if t.dtype == torch.uint8 else 1.0 - 1e-5)).all(0)
    if not white.any():
        return None
    ys, xs = torch.nonzero(white, as_tuple=True)
    top, left = int(ys.min()), int(xs.min())
    h, w = int(ys.max()) - top + 1, int(xs.max()) - left + 1
    assert h == w, "block is not a square"
    assert int(white.sum()) == h * w, "block is not filled"
    return top, left, h


def test_shapes_dtype_and_bilinear_resize():
    img = _gradient_image()
    test_t = build_test_transform(128, 64)
    out = test_t(img)
    assert out.shape == (3, 128, 64) and out.dtype == torch.float32
    ref = np.asarray(img.resize((64, 128), Image.BILINEAR), dtype=np.float32) / 255.0
    back = denormalize(out).permute(1, 2, 0).numpy()
    assert np.abs(back - ref).max() < 1e-5
    train = build_train_transform(96, 32)(img)
    assert train.shape == (3, 96, 32) and train.dtype == torch.float32


def test_normalisation_exact():
    img = Image.new("RGB", (64, 128), (10, 128, 250))
    out = build_test_transform(128, 64)(img)
    for c, v in enumerate((10, 128, 250)):
        expect = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], torch.full_like(out[c], expect), atol=1e-6)


def test_flip_flips():
    img = _gradient_image()
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert torch.equal(RandomHorizontalFlip(1.0)(t), t.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(t), t)
    mirrored = np.asarray(RandomHorizontalFlip(1.0)(img))
    assert np.array_equal(mirrored, np.asarray(img)[:, ::-1])
    torch.manual_seed(0)
    flip = RandomHorizontalFlip(0.5)
    flips = sum(bool(torch.equal(flip(t), t.flip(-1))) for _ in range(400))
    assert 150 < flips < 250
    # in the full train transform (no block), output is either the plain or the mirrored image
    train = build_train_transform(100, 50, random_block=False)
    plain = build_test_transform(100, 50)(img)
    seen = set()
    for _ in range(40):
        out = train(img)
        if torch.equal(out, plain):
            seen.add("plain")
        elif torch.equal(out, plain.flip(-1)):
            seen.add("flipped")
        else:
            pytest.fail("train transform produced neither the image nor its mirror")
    assert seen == {"plain", "flipped"}


@pytest.mark.parametrize("as_pil", [False, True])
def test_random_block_is_white_square_of_allowed_size(as_pil):
    torch.manual_seed(1)
    block = RandomBlock(0.8)
    h, w = 128, 64
    limit = int(0.8 * w)                      # side in [1, 0.8 * width)
    sides, lefts, tops = [], [], []
    for _ in range(300):
        if as_pil:
            out = torch.from_numpy(np.array(block(_black(w, h)))).permute(2, 0, 1)
        else:
            out = block(torch.zeros(3, h, w, dtype=torch.uint8))
        sq = _white_square(out)
        assert sq is not None, "Random Block must hit every image"
        top, left, side = sq
        assert 1 <= side < limit
        assert top + side <= h and left + side <= w
        sides.append(side), lefts.append(left), tops.append(top)
    assert min(sides) < 8 and max(sides) > limit - 8   # roughly uniform over the range
    assert min(lefts) == 0 or min(lefts) < 3
    assert max(tops) > h - limit


def test_train_transform_block_white_after_normalise():
    torch.manual_seed(2)
    t = build_train_transform(128, 64, flip=False)
    for _ in range(20):
        out = denormalize(t(_black()))
        sq = _white_square(out)
        assert sq is not None and 1 <= sq[2] < int(0.8 * 64)
        # everything else stays black
        mask = torch.ones(128, 64, dtype=torch.bool)
        top, left, side = sq
        mask[top:top + side, left:left + side] = False
        assert out[:, mask].abs().max() < 1e-5
    assert _white_square(denormalize(build_train_transform(128, 64, random_block=False)(_black()))) is None


def test_seeding_reproducible():
    img = _gradient_image()
    t = build_train_transform(64, 32)
    torch.manual_seed(123)
    a = [t(img) for _ in range(5)]
    torch.manual_seed(123)
    b = [t(img) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])
    g1, g2, g3 = torch.Generator(), torch.Generator(), torch.Generator()
    g1.manual_seed(7), g2.manual_seed(7), g3.manual_seed(8)
    o1 = [build_train_transform(64, 32, generator=g1)(img) for _ in range(3)]
    o2 = [build_train_transform(64, 32, generator=g2)(img) for _ in range(3)]
    o3 = [build_train_transform(64, 32, generator=g3)(img) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(o1, o2))
    assert not all(torch.equal(x, y) for x, y in zip(o1, o3))


class _BlockDataset(Dataset):
    def __init__(self, block):
        self.block = block

    def __len__(self):
        return 8

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        top, left, side = self.block.sample(128, 64)
        return torch.tensor([info.id if info else -1, i, top, left, side])


@pytest.mark.parametrize("use_generator", [False, True])
def test_workers_differ_and_are_reproducible(use_generator):
    def run():
        torch.manual_seed(5)
        g = None
        if use_generator:
            g = torch.Generator()
            g.manual_seed(11)
        loader = DataLoader(_BlockDataset(RandomBlock(0.8, generator=g)), batch_size=4,
                            num_workers=2, multiprocessing_context="fork")
        return torch.cat(list(loader))

    a, b = run(), run()
    assert torch.equal(a, b)
    w0 = a[a[:, 0] == 0][:, 2:]
    w1 = a[a[:, 0] == 1][:, 2:]
    assert len(w0) == len(w1) == 4
    assert not torch.equal(w0, w1), "two workers drew the same blocks"
