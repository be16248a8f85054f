"""Transforms: the two presets (public: bicubic, [0, 1]; imagenet: bilinear, mean/std), flip, Random Block,
random occlusion, the QAConv 2.x augmentations, seeding and workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from qaconv_ext.data import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, RandomBlock, RandomCrop, RandomHorizontalFlip,
                             RandomOcclusion, RandomRotation, build_test_transform, build_train_transform, denormalize)
from qaconv_ext.data.transforms import Compose, Normalize, Pad, Resize, ToTensor, _PILToUint8, _shift_hue

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


def test_imagenet_preset_shapes_dtype_and_bilinear_resize():
    img = _gradient_image()
    test_t = build_test_transform(128, 64, preprocess="imagenet")
    out = test_t(img)
    assert out.shape == (3, 128, 64) and out.dtype == torch.float32
    ref = np.asarray(img.resize((64, 128), Image.BILINEAR), dtype=np.float32) / 255.0
    back = denormalize(out).permute(1, 2, 0).numpy()
    assert np.abs(back - ref).max() < 1e-5
    train = build_train_transform(96, 32, preprocess="imagenet")(img)
    assert train.shape == (3, 96, 32) and train.dtype == torch.float32


def test_normalisation_exact():
    img = Image.new("RGB", (64, 128), (10, 128, 250))
    out = build_test_transform(128, 64, preprocess="imagenet")(img)
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
    train = build_train_transform(100, 50, random_block=False, preprocess="imagenet")
    plain = build_test_transform(100, 50, preprocess="imagenet")(img)
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
    t = build_train_transform(128, 64, flip=False, preprocess="imagenet")
    for _ in range(20):
        out = denormalize(t(_black()))
        sq = _white_square(out)
        assert sq is not None and 1 <= sq[2] < int(0.8 * 64)
        # everything else stays black
        mask = torch.ones(128, 64, dtype=torch.bool)
        top, left, side = sq
        mask[top:top + side, left:left + side] = False
        assert out[:, mask].abs().max() < 1e-5
    assert _white_square(denormalize(build_train_transform(128, 64, random_block=False, preprocess="imagenet")(
        _black()))) is None


@pytest.mark.parametrize("preprocess,augment", [("imagenet", "eccv"), ("public", "eccv"), ("public", "v2")])
def test_seeding_reproducible(preprocess, augment):
    img = _gradient_image()
    kw = dict(preprocess=preprocess, augment=augment)
    t = build_train_transform(64, 32, **kw)
    torch.manual_seed(123)
    a = [t(img) for _ in range(5)]
    torch.manual_seed(123)
    b = [t(img) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])
    g1, g2, g3 = torch.Generator(), torch.Generator(), torch.Generator()
    g1.manual_seed(7), g2.manual_seed(7), g3.manual_seed(8)
    o1 = [build_train_transform(64, 32, generator=g1, **kw)(img) for _ in range(3)]
    o2 = [build_train_transform(64, 32, generator=g2, **kw)(img) for _ in range(3)]
    o3 = [build_train_transform(64, 32, generator=g3, **kw)(img) for _ in range(3)]
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


# ----------------------------------------------------------------------------------------------
# The public preset and augmentations
# ----------------------------------------------------------------------------------------------

def _jpeg(w, h, seed):
    """A decoded JPEG of a smooth random field with noise (what a camera crop looks like to the resizer)."""
    import io

    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)).resize((w, h))
    arr = np.clip(np.asarray(base).astype(np.int16) + rng.integers(-30, 30, (h, w, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=85)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize("size", [(64, 128), (170, 420), (128, 384), (40, 90)])
def test_public_test_transform_is_pil_bicubic_exactly(size):
    img = _jpeg(*size, seed=size[0])
    out = build_test_transform(384, 128)(img)                      # "public" is the default
    assert out.shape == (3, 384, 128) and out.dtype == torch.float32
    ref = (np.asarray(img.resize((128, 384), Image.BICUBIC)) / 255).astype(np.float32)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), ref)
    assert torch.equal(out, build_test_transform(384, 128, preprocess="public")(img))
    # and it is not the bilinear resize
    bilinear = np.asarray(img.resize((128, 384), Image.BILINEAR)) / 255
    assert not np.array_equal(ref, bilinear.astype(np.float32)) or size == (128, 384)


def test_bad_names_are_one_line_errors():
    for call in (lambda: build_test_transform(8, 4, preprocess="torchvision"),
                 lambda: build_train_transform(8, 4, preprocess="torchvision")):
        with pytest.raises(ValueError, match=r"^unknown preprocess 'torchvision'; valid: public, imagenet$"):
            call()
    with pytest.raises(ValueError, match=r"^unknown augment 'v3'; valid: eccv, v2$"):
        build_train_transform(8, 4, augment="v3")


def test_imagenet_eccv_pipeline_is_the_original_draw_for_draw():
    """The demo's training transform: bilinear resize, flip, Random Block, normalise, same random draws."""
    img = _jpeg(70, 150, seed=3)
    original = Compose([Resize(128, 64), _PILToUint8(), RandomHorizontalFlip(0.5), RandomBlock(0.8), ToTensor(),
                        Normalize()])
    preset = build_train_transform(128, 64, preprocess="imagenet", augment="eccv")
    torch.manual_seed(9)
    a = [original(img) for _ in range(6)]
    torch.manual_seed(9)
    b = [preset(img) for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_public_eccv_is_flip_bicubic_occlusion_in_unit_range():
    img = _jpeg(70, 150, seed=4)
    plain = build_test_transform(128, 64)(img)
    mirrored = build_test_transform(128, 64)(img.transpose(Image.FLIP_LEFT_RIGHT))   # flipped before resizing
    t = build_train_transform(128, 64, random_block=False)
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        out = t(img)
        if torch.equal(out, plain):
            seen.add("plain")
        elif torch.equal(out, mirrored):
            seen.add("flipped")
        else:
            pytest.fail("the public ECCV transform without occlusion gave neither the image nor its mirror")
    assert seen == {"plain", "flipped"}
    t = build_train_transform(128, 64, flip=False)
    for _ in range(20):
        out = t(_black())
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0       # no mean/std
        top, left, side = _white_square(out)
        assert 1 <= side < int(0.8 * 64) and left + side < 64 and top + side < 128


@pytest.mark.parametrize("hw,min_size,max_size", [((128, 64), 0.0, 0.8), ((50, 90), 0.2, 0.6), ((64, 64), 0.5, 1.0)])
def test_random_occlusion_follows_the_public_draws(hw, min_size, max_size):
    """side in [max(1, int(min * S)), int(max * S)) of the shorter side S, corner in [0, W - s) x [0, H - s)."""
    h, w = hw
    S = min(h, w)
    low, high = max(1, int(S * min_size)), int(S * max_size)
    occ = RandomOcclusion(min_size, max_size, generator=torch.Generator().manual_seed(1))
    sides, lefts, tops = [], [], []
    for i in range(600):
        img = _black(w, h) if i % 2 else torch.zeros(3, h, w, dtype=torch.uint8)
        out = occ(img)
        out = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.array(out)).permute(2, 0, 1)
        top, left, side = _white_square(out)
        assert low <= side < high
        assert 0 <= left < w - side and 0 <= top < h - side
        sides.append(side), lefts.append(left), tops.append(top)
    assert min(sides) == low and max(sides) == high - 1           # the whole range is drawn
    assert min(lefts) == 0 and max(lefts) > 0 and max(tops) > 0
    assert np.array_equal(np.asarray(RandomOcclusion(0.0, 0.0)(_black())), np.asarray(_black()))


def test_pad_and_random_crop_shift_by_at_most_ten_pixels():
    img = _jpeg(40, 80, seed=5)
    arr = np.asarray(img)
    t = Compose([Pad(10), RandomCrop(80, 40, generator=torch.Generator().manual_seed(2))])
    padded = np.zeros((100, 60, 3), np.uint8)
    padded[10:90, 10:50] = arr
    offsets = set()
    for _ in range(200):
        out = np.asarray(t(img))
        assert out.shape == (80, 40, 3)
        hits = [(y, x) for y in range(21) for x in range(21) if np.array_equal(padded[y:y + 80, x:x + 40], out)]
        assert hits, "the crop is not a window of the padded image"
        offsets.add(hits[0])
    ys, xs = zip(*offsets)
    assert min(ys) == 0 and max(ys) == 20 and min(xs) == 0 and max(xs) == 20


def test_random_rotation_is_pil_nearest_within_five_degrees():
    img = _jpeg(64, 128, seed=6)
    rot = RandomRotation(5.0, generator=torch.Generator().manual_seed(4))
    twin = torch.Generator().manual_seed(4)
    for _ in range(5):
        angle = -5.0 + 10.0 * float(torch.rand((), generator=twin))
        out = rot(img)
        ref = img.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=(0, 0, 0))
        assert out.size == img.size and np.array_equal(np.asarray(out), np.asarray(ref))
        assert -5.0 <= angle <= 5.0


def test_color_jitter_factors():
    gray = Image.new("RGB", (16, 32), (100, 100, 100))
    # brightness x0.5 only (contrast and saturation x1, no hue shift): grey stays grey, halves
    half = ColorJitter((0.5, 0.5), (1.0, 1.0), (1.0, 1.0), (0.0, 0.0), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(half(gray)), np.full((32, 16, 3), 50, np.uint8))
    # saturation 0 removes colour; a hue turn of 1/3 moves red towards green
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    desat = ColorJitter((1.0, 1.0), (1.0, 1.0), (0.0, 0.0), (0.0, 0.0))(red)
    px = np.asarray(desat)[0, 0]
    assert px[0] == px[1] == px[2]
    g = np.asarray(_shift_hue(red, 1 / 3))[0, 0]
    assert g[1] > 200 and g[0] < 60 and g[2] < 60
    jit = ColorJitter(generator=torch.Generator().manual_seed(3))
    outs = [np.asarray(jit(_jpeg(32, 64, seed=7))) for _ in range(4)]
    assert all(o.shape == (64, 32, 3) for o in outs) and not np.array_equal(outs[0], outs[1])


def test_public_v2_pipeline_on_a_black_image_leaves_only_the_occlusion_white():
    """Pad, crop, flip, rotation and colour jitter keep a black image black; the white square comes last."""
    t = build_train_transform(96, 48, augment="v2", generator=torch.Generator().manual_seed(8))
    for _ in range(10):
        out = t(_black(30, 70))
        assert out.shape == (3, 96, 48) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        top, left, side = _white_square(out)
        mask = torch.ones(96, 48, dtype=torch.bool)
        mask[top:top + side, left:left + side] = False
        assert float(out[:, mask].max()) == 0.0
    imagenet = build_train_transform(96, 48, preprocess="imagenet", augment="v2")(_black(30, 70))
    assert float(imagenet.min()) < 0.0                            # normalised
