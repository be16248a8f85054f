"""Graph sampling (QAConv 2.x, "QAConv-GS"): batches of mutually similar classes, chosen afresh every epoch.

Each epoch :class:`GraphSampler` picks one random image per class, asks for the ``[C, C]`` distances among
these images (by default QAConv distances from the current model, computed with the fused op), and for
every class builds one batch: the ``batch_size / num_instance - 1`` nearest other classes and the class
itself, ``num_instance`` images each. The batches are shuffled and flattened into one epoch of
``C * batch_size`` dataset indices, to be cut into batches of ``batch_size`` by the loader.

Images of a class are drawn round-robin through a shuffled list of its images: a pointer moves over the
list, and when it reaches the end the list is shuffled again and the pointer starts over (a class with
fewer images than ``num_instance`` therefore repeats images within one batch, as in the public code).
Every random choice comes from the sampler's own ``torch.Generator``; :meth:`GraphSampler.state_dict`
holds it with the lists and pointers, so a run restored from a checkpoint draws the same epochs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Sampler

__all__ = ["GraphSampler", "qaconv_distance_fn"]

DistanceFn = Callable[[List[int]], Any]


def _pid(record: Any) -> int:
    pid = getattr(record, "pid", None)
    return int(record[1] if pid is None else pid)


def qaconv_distance_fn(model: nn.Module, matcher: nn.Module, records: Sequence[Any], height: int, width: int, *,
                       device: Union[str, torch.device] = "cpu", batch_size: int = 64, chunk: int = 512,
                       progress: bool = True) -> DistanceFn:
    """``distance_fn`` for :class:`GraphSampler`: the negated QAConv score among the images
    ``records[i]`` of the given indices. The model runs in eval mode without gradient on the test
    transform of its preset (its ``preprocess`` attribute); the head (``matcher``) in eval mode is folded
    into the fused :func:`~qaconv_ext.qaconv_score` (``matcher.folded()``), called in ``chunk`` x ``chunk``
    blocks, with progress bars. Both modules' training modes are restored afterwards.
    (:func:`qaconv_ext.evaluation.self_score_blocks` computes the same scores; the data layer does not
    import the evaluation.)"""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..ops import qaconv_score
    from .records import ImageDataset
    from .transforms import build_test_transform

    device = torch.device(device)

    def distances(indices: List[int]) -> torch.Tensor:
        preprocess = getattr(model, "preprocess", None) or "public"
        loader = DataLoader(ImageDataset([records[i] for i in indices], build_test_transform(height, width, preprocess)),
                            batch_size=batch_size, shuffle=False, num_workers=0)
        modes = [(m, m.training) for module in (model, matcher) for m in module.modules()]  # frozen BNs stay so
        model.eval()
        matcher.eval()
        try:
            with torch.no_grad():
                parts = [model(batch[0].to(device)).float() for batch in
                         tqdm(loader, desc="graph sampler: features", leave=False, disable=not progress,
                              dynamic_ncols=True)]
                fea = torch.cat(parts)
                weight, bias = matcher.folded()
                weight, bias = weight.detach().to(device, torch.float32), bias.detach().to(device, torch.float32)
                n = fea.shape[0]
                score = torch.empty(n, n, dtype=torch.float32)
                bounds = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
                bar = tqdm(total=n * n, desc="graph sampler: class distances", unit="pair", unit_scale=True,
                           leave=False, disable=not progress, dynamic_ncols=True)
                for a0, a1 in bounds:
                    for b0, b1 in bounds:
                        score[a0:a1, b0:b1] = qaconv_score(fea[a0:a1], fea[b0:b1], weight, bias).float().cpu()
                        bar.update((a1 - a0) * (b1 - b0))
                bar.close()
        finally:
            for m, mode in modes:
                m.training = mode
        return -score

    return distances


class GraphSampler(Sampler):
    """Graph sampling of QAConv 2.x: one batch per class, made of the class and its nearest classes.

    Args:
        records: the training set, items with a ``pid`` (:class:`~qaconv_ext.data.Record`) or ``(path, pid,
            ...)`` tuples. Classes are ordered by first appearance.
        batch_size: images per batch, a multiple of ``num_instance`` (public default 64).
        num_instance: images per class in a batch (public default 2).
        distance_fn: ``distance_fn(indices) -> [C, C]`` distances (lower = closer) among the images
            ``records[indices[c]]``, one per class in class order. Default: :func:`qaconv_distance_fn` of
            ``model`` and ``matcher`` (both required then, with ``height``, ``width``, ``device``).
        generator: the source of every random choice (default: a new one seeded with ``seed``).
        progress: progress bars of the default distance computation.

    ``len(sampler)`` is ``C * batch_size``, the indices of one epoch; every ``iter`` computes new
    distances. Raises ``ValueError`` when ``batch_size`` is not a positive multiple of ``num_instance``
    or the set has fewer than ``batch_size / num_instance`` classes.
    """

    def __init__(self, records: Sequence[Any], batch_size: int = 64, num_instance: int = 2,
                 distance_fn: Optional[DistanceFn] = None, *, model: Optional[nn.Module] = None,
                 matcher: Optional[nn.Module] = None, height: Optional[int] = None, width: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu", generator: Optional[torch.Generator] = None,
                 seed: int = 0, progress: bool = True) -> None:
        batch_size, num_instance = int(batch_size), int(num_instance)
        if num_instance < 1:
            raise ValueError(f"GraphSampler: num_instance must be positive, got {num_instance}")
        if batch_size < num_instance or batch_size % num_instance:
            raise ValueError(f"GraphSampler: the batch size {batch_size} is not a multiple of num_instance "
                             f"{num_instance}")
        self.batch_size, self.num_instance = batch_size, num_instance
        self.classes_per_batch = batch_size // num_instance
        members: Dict[int, List[int]] = {}
        for index, record in enumerate(records):
            members.setdefault(_pid(record), []).append(index)
        self.pids = list(members)
        self.num_classes = len(self.pids)
        if self.num_classes < self.classes_per_batch:
            raise ValueError(f"GraphSampler: a batch of {batch_size} images with num_instance {num_instance} needs "
                             f"{self.classes_per_batch} classes, the training set has {self.num_classes}")
        if distance_fn is None:
            if model is None or matcher is None or height is None or width is None:
                raise ValueError("GraphSampler: give distance_fn, or model, matcher, height and width for the "
                                 "default QAConv distances")
            distance_fn = qaconv_distance_fn(model, matcher, records, int(height), int(width), device=device,
                                             progress=progress)
        self.distance_fn = distance_fn
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(seed))
        self.generator = generator
        self.images = [self._shuffled(members[pid]) for pid in self.pids]
        self.pointers = [0] * self.num_classes
        self.last_neighbours: Optional[torch.Tensor] = None   # [C, B/K - 1] of the latest epoch

    # ------------------------------------------------------------------------------------------
    def _shuffled(self, items: List[int]) -> List[int]:
        order = torch.randperm(len(items), generator=self.generator).tolist()
        return [items[i] for i in order]

    def __len__(self) -> int:
        return self.num_classes * self.batch_size

    def class_distances(self) -> torch.Tensor:
        """``[C, C]`` float64 distances among one randomly chosen image per class (``distance_fn``)."""
        sizes = torch.tensor([len(x) for x in self.images], dtype=torch.float64)
        picks = (torch.rand(self.num_classes, generator=self.generator, dtype=torch.float64) * sizes).long()
        picks = torch.minimum(picks, sizes.long() - 1)
        chosen = [self.images[c][int(k)] for c, k in enumerate(picks)]
        dist = torch.as_tensor(self.distance_fn(chosen)).detach().to("cpu", torch.float64)
        if tuple(dist.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"GraphSampler: distance_fn returned shape {tuple(dist.shape)}, expected "
                             f"({self.num_classes}, {self.num_classes})")
        return dist

    def neighbours(self, dist: torch.Tensor) -> torch.Tensor:
        """``[C, B/K - 1]``: each class's nearest other classes, nearest first (ties: smaller class index)."""
        dist = dist.to(torch.float64).clone()
        dist.fill_diagonal_(float("inf"))
        dist = torch.nan_to_num(dist, nan=float("inf"))
        order = torch.sort(dist, dim=1, stable=True).indices
        return order[:, :self.classes_per_batch - 1]

    def _draw(self, c: int) -> List[int]:
        """``num_instance`` images of class ``c``, round-robin through its shuffled list."""
        images, out = self.images[c], []
        remain = self.num_instance
        while remain > 0:
            start = self.pointers[c]
            taken = images[start:start + remain]
            out.extend(taken)
            remain -= len(taken)
            end = start + len(taken)
            if end >= len(images):
                images = self.images[c] = self._shuffled(images)
                end = 0
            self.pointers[c] = end
        return out

    def epoch_batches(self) -> torch.Tensor:
        """One epoch: ``[C, batch_size]`` dataset indices, a batch per anchor class, in shuffled order.
        Each batch lists the anchor's nearest classes (nearest first), then the anchor, ``num_instance``
        images each."""
        nbrs = self.neighbours(self.class_distances())
        self.last_neighbours = nbrs
        batches = []
        for anchor in range(self.num_classes):
            batch: List[int] = []
            for c in nbrs[anchor].tolist() + [anchor]:
                batch.extend(self._draw(c))
            batches.append(batch)
        table = torch.tensor(batches, dtype=torch.long)
        return table[torch.randperm(self.num_classes, generator=self.generator)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_batches().reshape(-1).tolist())

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The generator, every class's current image order and pointer (tensors only)."""
        return {"generator": self.generator.get_state(),
                "images": torch.tensor([i for x in self.images for i in x], dtype=torch.long),
                "sizes": torch.tensor([len(x) for x in self.images], dtype=torch.long),
                "pointers": torch.tensor(self.pointers, dtype=torch.long)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output of a sampler over the same records."""
        sizes = [int(s) for s in state["sizes"]]
        if sizes != [len(x) for x in self.images]:
            raise ValueError("GraphSampler: the saved state is of another training set (classes or images differ)")
        flat, images, start = [int(i) for i in state["images"]], [], 0
        for size, own in zip(sizes, self.images):
            part = flat[start:start + size]
            if sorted(part) != sorted(own):
                raise ValueError("GraphSampler: the saved state is of another training set (images differ)")
            images.append(part)
            start += size
        self.images = images
        self.pointers = [int(p) for p in state["pointers"]]
        self.generator.set_state(state["generator"])
