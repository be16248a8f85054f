"""Graph sampling (QAConv 2.x, "QAConv-GS"): batches of mutually similar classes, chosen afresh every epoch.

Each epoch :class:`GraphSampler` picks one random image per class, asks for the ``[C, C]`` distances among
these images (QAConv distances from the current model: :func:`qaconv_ext.scoring.qaconv_distance_fn`), and for
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

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["GraphSampler"]

DistanceFn = Callable[[List[int]], Any]


def _pid(record: Any) -> int:
    pid = getattr(record, "pid", None)
    return int(record[1] if pid is None else pid)


class GraphSampler(Sampler):
    """Graph sampling of QAConv 2.x: one batch per class, made of the class and its nearest classes.

    Args:
        records: the training set, items with a ``pid`` (:class:`~qaconv_ext.data.Record`) or ``(path, pid,
            ...)`` tuples. Classes are ordered by first appearance.
        batch_size: images per batch, a multiple of ``num_instance`` (public default 64).
        num_instance: images per class in a batch (public default 2).
        distance_fn: ``distance_fn(indices) -> [C, C]`` distances (lower = closer) among the images
            ``records[indices[c]]``, one per class in class order, e.g. the current model's QAConv
            distances, :func:`qaconv_ext.scoring.qaconv_distance_fn`.
        generator: the source of every random choice (default: a new one seeded with ``seed``).

    ``len(sampler)`` is ``C * batch_size``, the indices of one epoch; every ``iter`` computes new
    distances. Raises ``ValueError`` when ``batch_size`` is not a positive multiple of ``num_instance``
    or the set has fewer than ``batch_size / num_instance`` classes.
    """

    def __init__(self, records: Sequence[Any], batch_size: int = 64, num_instance: int = 2,
                 distance_fn: Optional[DistanceFn] = None, *, generator: Optional[torch.Generator] = None,
                 seed: int = 0) -> None:
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
            raise ValueError("GraphSampler: give distance_fn, e.g. qaconv_ext.scoring.qaconv_distance_fn(model, "
                             "matcher, records, height, width, preprocess=...)")
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
