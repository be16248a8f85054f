"""Image transforms written with Pillow and torch.

Training (the paper's recipe): resize to ``height x width`` (bilinear), random horizontal flip
(p = 0.5), Random Block (a white square of side uniform in ``[1, 0.8 * width)`` pixels at a uniform
position inside the image, on every image), to tensor, ImageNet mean/std normalisation.
Testing: resize, to tensor, normalise.

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

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Resize",
    "ToTensor",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomBlock",
    "build_train_transform",
    "build_test_transform",
    "denormalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
    """Resize a PIL image to ``(height, width)`` with bilinear interpolation."""

    def __init__(self, height: int, width: int) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"size must be positive, got {height}x{width}")
        self.height, self.width = int(height), int(width)

    def __call__(self, img):
        from PIL import Image

        if img.size == (self.width, self.height):
            return img
        return img.resize((self.width, self.height), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"Resize({self.height}, {self.width})"


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


def build_train_transform(height: int, width: int, random_block: bool = True, flip: bool = True,
                          generator: Optional[torch.Generator] = None,
                          block_ratio: float = 0.8) -> Compose:
    """Training transform: PIL image -> normalised float tensor ``[3, height, width]``.

    Resize (bilinear) -> horizontal flip (p = 0.5) -> Random Block (white square, side in
    ``[1, block_ratio * width)``, every image) -> ``[0, 1]`` -> ImageNet mean/std.
    ``generator``: optional ``torch.Generator`` for the random draws (default: torch's global one).
    """
    steps: List[Callable] = [Resize(height, width), _PILToUint8()]
    if flip:
        steps.append(RandomHorizontalFlip(0.5, generator=generator))
    if random_block:
        steps.append(RandomBlock(block_ratio, generator=generator))
    steps += [ToTensor(), Normalize()]
    return Compose(steps)


def build_test_transform(height: int, width: int) -> Compose:
    """Test transform: PIL image -> resize (bilinear) -> normalised float tensor ``[3, H, W]``."""
    return Compose([Resize(height, width), _PILToUint8(), ToTensor(), Normalize()])
