"""Image transforms written with Pillow and torch, in two input presets.

Presets (``preprocess``, :data:`PREPROCESS_PRESETS`):

* ``"public"`` -- what the paper's public code feeds its networks in every version: resize with
  Pillow's *bicubic* filter (what torchvision's ``Resize`` does on PIL images), ``[0, 1]`` floats,
  no mean/std normalisation. The default, and the preset of checkpoints of the public code.
* ``"imagenet"`` -- this package's earlier pipeline, kept exactly: bilinear resize, ``[0, 1]``, then
  ImageNet mean/std. ``qaconv demo`` uses it.

Training augmentation (``augment``, :data:`AUGMENTATIONS`):

* ``"eccv"`` (the ECCV 2020 recipe). ``public``: horizontal flip (p = 0.5), bicubic resize, random
  occlusion (:class:`RandomOcclusion`: a white square of side in ``[min_size * S, max_size * S)``,
  ``S`` the shorter image side), to tensor. ``imagenet``: resize, flip, Random Block
  (:class:`RandomBlock`: side in ``[1, 0.8 * width)``), to tensor, normalise.
* ``"v2"`` (the QAConv 2.x recipe): resize, pad 10 black pixels + random crop back to size, flip,
  rotation by up to 5 degrees (nearest neighbour, black corners), colour jitter (brightness,
  contrast and saturation factors in ``[0.5, 2]``, hue shift in ``[-0.1, 0.1]``, in random order),
  random occlusion, to tensor (normalised for ``imagenet``).

Randomness: by default the random transforms draw from torch's global generator, which a
``DataLoader`` seeds differently in every worker (from ``torch.manual_seed`` of the main
process), so runs are reproducible and workers differ. A ``torch.Generator`` can be passed
instead; inside a ``DataLoader`` worker that generator is re-seeded once per worker from the
worker's seed, so worker copies never repeat each other's draws.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..config import AUGMENTATIONS, DEFAULT_PRESET, PRESETS, check_preset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESS_PRESETS",
    "AUGMENTATIONS",
    "check_preprocess",
    "Compose",
    "Resize",
    "ToTensor",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomBlock",
    "RandomOcclusion",
    "Pad",
    "RandomCrop",
    "RandomRotation",
    "ColorJitter",
    "build_train_transform",
    "build_test_transform",
    "denormalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The input presets (:data:`qaconv_ext.config.PRESETS`) and the check of a name.
PREPROCESS_PRESETS = PRESETS
check_preprocess = check_preset
_INTERPOLATION = {"public": "bicubic", "imagenet": "bilinear"}

ImageLike = Union["PIL.Image.Image", torch.Tensor]  # noqa: F821


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms: List[Callable] = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class Resize:
    """Resize a PIL image to ``(height, width)`` with Pillow's ``bilinear`` or ``bicubic`` filter."""

    def __init__(self, height: int, width: int, interpolation: str = "bilinear") -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"size must be positive, got {height}x{width}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.height, self.width = int(height), int(width)
        self.interpolation = interpolation

    def __call__(self, img):
        from PIL import Image

        if img.size == (self.width, self.height):
            return img
        return img.resize((self.width, self.height),
                          Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR)

    def __repr__(self) -> str:
        return f"Resize({self.height}, {self.width}, {self.interpolation!r})"


class ToTensor:
    """PIL RGB image -> float32 tensor ``[3, H, W]`` in ``[0, 1]``; uint8 tensors are scaled too."""

    def __call__(self, img: ImageLike) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            t = img
        else:
            if img.mode != "RGB":
                img = img.convert("RGB")
            t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        if t.dtype == torch.uint8:
            return t.float().div_(255.0)
        return t.float()

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Per-channel ``(x - mean) / std`` on a float tensor ``[3, H, W]``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def denormalize(t: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo :class:`Normalize` (``[3, H, W]`` or ``[B, 3, H, W]``); values clamped to ``[0, 1]``."""
    m = torch.tensor(mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    return (t * s + m).clamp_(0.0, 1.0)


class _RandomTransform:
    """Random source shared by the random transforms (see the module doc)."""

    def __init__(self, generator: Optional[torch.Generator] = None) -> None:
        self._base = generator
        self._worker_key: Optional[Tuple[int, int]] = None
        self._worker_gen: Optional[torch.Generator] = None

    def _generator(self) -> Optional[torch.Generator]:
        if self._base is None:
            return None
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self._base
        key = (info.id, info.seed)
        if key != self._worker_key:
            g = torch.Generator()
            g.manual_seed((info.seed * 1_000_003 + self._base.initial_seed()) % (2 ** 63))
            self._worker_key, self._worker_gen = key, g
        return self._worker_gen

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self._generator()))

    def _randint(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high)``."""
        return int(torch.randint(low, high, (), generator=self._generator()))

    def _uniform_in(self, low: float, high: float) -> float:
        """Uniform float in ``[low, high)``."""
        return low + (high - low) * self._uniform()

    def __getstate__(self):
        state = dict(self.__dict__)
        # torch.Generator pickles; the worker cache is per process and is rebuilt on demand.
        state["_worker_key"] = None
        state["_worker_gen"] = None
        return state


class RandomHorizontalFlip(_RandomTransform):
    """Mirror a PIL image or a ``[C, H, W]`` tensor left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(generator)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, img: ImageLike) -> ImageLike:
        if self._uniform() >= self.p:
            return img
        if isinstance(img, torch.Tensor):
            return img.flip(-1)
        from PIL import Image

        return img.transpose(Image.FLIP_LEFT_RIGHT)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomBlock(_RandomTransform):
    """Random Block: paint a ``fill`` (white) square at a uniform position, on every image.

    The side is uniform in ``[1, max(2, int(max_ratio * width)))`` pixels (also capped by the
    height), the top-left corner uniform among the positions that keep the square inside the image.
    Works on PIL images and on ``[C, H, W]`` tensors (``fill`` is then in the tensor's units:
    255 for uint8, 1.0 for float in ``[0, 1]``).
    """

    def __init__(self, max_ratio: float = 0.8, fill: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(generator)
        if not 0.0 < max_ratio <= 1.0:
            raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio}")
        self.max_ratio = float(max_ratio)
        self.fill = fill

    def sample(self, height: int, width: int) -> Tuple[int, int, int]:
        """Draw ``(top, left, side)`` for an image of ``height x width``."""
        high = max(2, int(self.max_ratio * width))
        high = min(high, min(height, width) + 1)
        side = self._randint(1, high)
        top = self._randint(0, height - side + 1)
        left = self._randint(0, width - side + 1)
        return top, left, side

    def __call__(self, img: ImageLike) -> ImageLike:
        if isinstance(img, torch.Tensor):
            h, w = img.shape[-2:]
            top, left, side = self.sample(h, w)
            fill = self.fill if self.fill is not None else (255 if img.dtype == torch.uint8 else 1.0)
            img = img.clone()
            img[..., top:top + side, left:left + side] = fill
            return img
        w, h = img.size
        top, left, side = self.sample(h, w)
        fill = int(self.fill) if self.fill is not None else 255
        img = img.copy()
        img.paste((fill,) * len(img.getbands()), (left, top, left + side, top + side))
        return img

    def __repr__(self) -> str:
        return f"RandomBlock(max_ratio={self.max_ratio})"


class _PILToUint8:
    """PIL RGB image -> uint8 tensor ``[3, H, W]`` (keeps flip/block cheap and exact)."""

    def __call__(self, img) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)

    def __repr__(self) -> str:
        return "PILToUint8()"


class RandomOcclusion(_RandomTransform):
    """Paint a white square on every image: side ``s`` uniform among the integers of
    ``[max(1, int(min_size * S)), int(max_size * S))`` with ``S = min(height, width)``, top-left
    corner ``x0`` uniform in ``[0, width - s)``, ``y0`` in ``[0, height - s)`` (the public code's
    random occlusion). ``max_size = 0`` leaves the image unchanged. PIL images or ``[C, H, W]``
    tensors (white: 255 for uint8, 1.0 for float)."""

    def __init__(self, min_size: float = 0.0, max_size: float = 0.8,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(generator)
        if not 0.0 <= min_size <= max_size <= 1.0:
            raise ValueError(f"need 0 <= min_size <= max_size <= 1, got {min_size}, {max_size}")
        self.min_size, self.max_size = float(min_size), float(max_size)

    def sample(self, height: int, width: int) -> Tuple[int, int, int]:
        """Draw ``(top, left, side)`` for an image of ``height x width``."""
        short = min(height, width)
        low, high = max(1, int(short * self.min_size)), int(short * self.max_size)
        if high <= low:
            raise ValueError(f"RandomOcclusion: no side in [{low}, {high}) for a {height}x{width} image")
        side = self._randint(low, high)
        left = self._randint(0, width - side)
        top = self._randint(0, height - side)
        return top, left, side

    def __call__(self, img: ImageLike) -> ImageLike:
        if self.max_size == 0:
            return img
        if isinstance(img, torch.Tensor):
            top, left, side = self.sample(*img.shape[-2:])
            img = img.clone()
            img[..., top:top + side, left:left + side] = 255 if img.dtype == torch.uint8 else 1.0
            return img
        w, h = img.size
        top, left, side = self.sample(h, w)
        img = img.copy()
        img.paste((255,) * len(img.getbands()), (left, top, left + side, top + side))
        return img

    def __repr__(self) -> str:
        return f"RandomOcclusion(min_size={self.min_size}, max_size={self.max_size})"


class Pad:
    """Add ``padding`` black pixels on every side of a PIL image."""

    def __init__(self, padding: int = 10) -> None:
        self.padding = int(padding)

    def __call__(self, img):
        from PIL import Image

        p = self.padding
        out = Image.new(img.mode, (img.width + 2 * p, img.height + 2 * p))
        out.paste(img, (p, p))
        return out

    def __repr__(self) -> str:
        return f"Pad({self.padding})"


class RandomCrop(_RandomTransform):
    """Crop a ``height x width`` window at a uniform position (every position equally likely)."""

    def __init__(self, height: int, width: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(generator)
        self.height, self.width = int(height), int(width)

    def __call__(self, img):
        w, h = img.size
        if h < self.height or w < self.width:
            raise ValueError(f"RandomCrop: {w}x{h} image is smaller than the {self.width}x{self.height} crop")
        top = self._randint(0, h - self.height + 1)
        left = self._randint(0, w - self.width + 1)
        return img.crop((left, top, left + self.width, top + self.height))

    def __repr__(self) -> str:
        return f"RandomCrop({self.height}, {self.width})"


class RandomRotation(_RandomTransform):
    """Rotate a PIL image about its centre by an angle uniform in ``[-degrees, degrees]`` (nearest
    neighbour, same size, uncovered corners black)."""

    def __init__(self, degrees: float = 5.0, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(generator)
        self.degrees = float(degrees)

    def __call__(self, img):
        from PIL import Image

        angle = self._uniform_in(-self.degrees, self.degrees)
        return img.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=(0,) * len(img.getbands()))

    def __repr__(self) -> str:
        return f"RandomRotation({self.degrees})"


def _shift_hue(img, hue: float):
    """Rotate the hue of an RGB PIL image by ``hue`` turns (in [-0.5, 0.5]) in Pillow's 8-bit HSV."""
    from PIL import Image

    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.int64) + int(hue * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert(img.mode)


class ColorJitter(_RandomTransform):
    """Random brightness, contrast and saturation factors (uniform in their ranges) and a hue shift,
    applied in a random order with Pillow's ``ImageEnhance`` (``Brightness``, ``Contrast``, ``Color``)
    and an HSV hue rotation."""

    def __init__(self, brightness: Tuple[float, float] = (0.5, 2.0), contrast: Tuple[float, float] = (0.5, 2.0),
                 saturation: Tuple[float, float] = (0.5, 2.0), hue: Tuple[float, float] = (-0.1, 0.1),
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(generator)
        if not -0.5 <= hue[0] <= hue[1] <= 0.5:
            raise ValueError(f"hue range must lie in [-0.5, 0.5], got {hue}")
        self.ranges = (tuple(brightness), tuple(contrast), tuple(saturation), tuple(hue))

    def __call__(self, img):
        from PIL import ImageEnhance

        order = torch.randperm(4, generator=self._generator()).tolist()
        factors = [self._uniform_in(lo, hi) for lo, hi in self.ranges]
        ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for i in order:
            img = ops[i](img).enhance(factors[i]) if i < 3 else _shift_hue(img, factors[3])
        return img

    def __repr__(self) -> str:
        b, c, s, h = self.ranges
        return f"ColorJitter(brightness={b}, contrast={c}, saturation={s}, hue={h})"


def build_train_transform(height: int, width: int, random_block: bool = True, flip: bool = True,
                          generator: Optional[torch.Generator] = None, block_ratio: float = 0.8, *,
                          preprocess: str = DEFAULT_PRESET, augment: str = "eccv",
                          block_min_ratio: float = 0.0) -> Compose:
    """Training transform: PIL image -> float tensor ``[3, height, width]`` (see the module doc).

    Args:
        preprocess: ``"public"`` (bicubic, ``[0, 1]``) or ``"imagenet"`` (bilinear, ImageNet mean/std).
        augment: ``"eccv"`` or ``"v2"`` (the QAConv 2.x augmentations).
        random_block: paint the white square (``public`` and ``v2``: :class:`RandomOcclusion` with
            sides in ``[block_min_ratio, block_ratio)`` of the shorter side; ``imagenet`` + ``eccv``:
            :class:`RandomBlock` with sides in ``[1, block_ratio * width)``).
        flip: random horizontal flips (p = 0.5).
        generator: optional ``torch.Generator`` for the random draws (default: torch's global one).
    """
    check_preprocess(preprocess)
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    resize = Resize(height, width, _INTERPOLATION[preprocess])
    if preprocess == "imagenet" and augment == "eccv":
        # this package's original pipeline, kept draw for draw
        steps: List[Callable] = [resize, _PILToUint8()]
        if flip:
            steps.append(RandomHorizontalFlip(0.5, generator=generator))
        if random_block:
            steps.append(RandomBlock(block_ratio, generator=generator))
        return Compose(steps + [ToTensor(), Normalize()])
    occlusion = RandomOcclusion(block_min_ratio, block_ratio, generator=generator)
    flipper = RandomHorizontalFlip(0.5, generator=generator)
    if augment == "eccv":  # the public v1.0 order: flip, resize, occlusion
        steps = ([flipper] if flip else []) + [resize] + ([occlusion] if random_block else [])
    else:
        steps = [resize, Pad(10), RandomCrop(height, width, generator=generator)]
        steps += ([flipper] if flip else []) + [RandomRotation(5.0, generator=generator),
                                                ColorJitter(generator=generator)]
        steps += [occlusion] if random_block else []
    steps += [_PILToUint8(), ToTensor()]
    if preprocess == "imagenet":
        steps.append(Normalize())
    return Compose(steps)


def build_test_transform(height: int, width: int, preprocess: str = DEFAULT_PRESET) -> Compose:
    """Test transform: PIL image -> float tensor ``[3, H, W]``.

    ``"public"``: bicubic resize, ``[0, 1]`` (equals ``np.asarray(img.resize((W, H), Image.BICUBIC)) / 255``);
    ``"imagenet"``: bilinear resize, ``[0, 1]``, ImageNet mean/std.
    """
    check_preprocess(preprocess)
    steps: List[Callable] = [Resize(height, width, _INTERPOLATION[preprocess]), _PILToUint8(), ToTensor()]
    if preprocess == "imagenet":
        steps.append(Normalize())
    return Compose(steps)
