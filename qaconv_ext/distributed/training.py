"""Data-parallel training across ranks with the class memory kept identical on every rank.

What each step does with ``W`` ranks and a global batch of ``B`` images (``B / W`` per rank):

* :class:`ShardedBatchSampler`: every rank draws the same global order and takes its contiguous
  slice of each global batch, so the ranks together see exactly the batches of one process. With the
  ``gs`` recipe the global order is the graph sampler's epoch (the same on every rank: the same
  generator, and the class distances computed on the main rank and broadcast, :meth:`DistributedTraining.from_main`).
* The backbone runs on the local slice, wrapped in ``DistributedDataParallel``. With ``sync_bn`` its
  BatchNorms use the statistics of the global batch (``torch.nn.SyncBatchNorm`` on CUDA,
  :class:`CrossRankBatchNorm` on the CPU, where the former does not run).
* :func:`gather_batch` concatenates the feature maps and labels of all ranks in rank order. The loss
  (head and class memory, also wrapped in ``DistributedDataParallel``) is computed on every rank over
  the whole global batch: the head's first BatchNorm, which in training normalises over every
  maximum of the call, therefore sees the same values as with one process, and the memory update
  (last sample of a class wins, in global order) is the same on every rank. The head's matching is
  computed redundantly on every rank; that is the price of identical statistics and memory.
* The gradient of the gathered features flows back to the rank's own slice, multiplied by ``W`` so
  that the averaging of ``DistributedDataParallel`` yields the gradient of the global loss.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .collectives import all_gather_objects, collective
from .env import DistEnv

__all__ = ["ShardedBatchSampler", "CrossRankBatchNorm", "convert_sync_batchnorm", "gather_batch",
           "DistributedTraining"]


class ShardedBatchSampler:
    """This rank's part of each global batch: the ``batch_sampler`` of a ``DataLoader`` built with the
    same ``generator``, it yields the batches of ``DataLoader(shuffle=True, drop_last=True,
    batch_size=global_batch, generator=generator)`` (same order on every rank), each cut into
    ``world`` contiguous slices.

    ``global_batch`` must be a multiple of ``world``. The generator's state advances as in one
    process, so it can be checkpointed and restored the same way.

    ``sampler``: the global order comes from this sampler instead (e.g. the graph sampler, whose epoch is
    a whole number of global batches), cut into ``global_batch`` pieces in the same way; every rank must
    hold an identical copy.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int,
                 generator: Optional[torch.Generator] = None, sampler: Optional[Any] = None) -> None:
        if global_batch % world:
            raise ValueError(f"the batch size {global_batch} is not a multiple of the {world} processes")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.rank, self.world = int(rank), int(world)
        self.generator = generator
        self.sampler = sampler
        self.local_batch = self.global_batch // self.world

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else self.num_samples
        return n // self.global_batch

    def __iter__(self) -> Iterator[List[int]]:
        from torch.utils.data import BatchSampler, RandomSampler

        order = self.sampler if self.sampler is not None else RandomSampler(range(self.num_samples),
                                                                            generator=self.generator)
        batches = BatchSampler(order, self.global_batch, drop_last=True)
        lo = self.rank * self.local_batch
        for batch in batches:
            yield batch[lo:lo + self.local_batch]


class CrossRankBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the batch of all ranks together
    (differentiable all-reduces of the sums; equal batch sizes on every rank). In eval mode, or in one
    process, it is ``BatchNorm2d``. Parameters, buffers and state-dict keys are BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        world = dist.get_world_size()
        count = x.numel() // x.shape[1] * world
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (count / max(count - 1, 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorms with the statistics of the global batch: ``torch.nn.SyncBatchNorm`` on CUDA; on the
    CPU every ``BatchNorm2d`` becomes a :class:`CrossRankBatchNorm` (same parameters and buffers)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = CrossRankBatchNorm
    return module


class _GatherRows(torch.autograd.Function):
    """All ranks' equal-sized ``[b, ...]`` tensors concatenated in rank order; backward: this rank's
    slice of the gradient times the number of ranks (see the module's notes)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.world, ctx.rows = rank, world, local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        lo = ctx.rank * ctx.rows
        return grad[lo:lo + ctx.rows] * ctx.world


def gather_batch(feature: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global batch: every rank's features (differentiable, see :class:`_GatherRows`) and labels,
    concatenated in rank order. Every rank must pass the same number of samples."""

    with collective("gathering the batch"):
        labels = [torch.empty_like(target) for _ in range(dist.get_world_size())]
        dist.all_gather(labels, target.contiguous())
        return _GatherRows.apply(feature), torch.cat(labels)


class DistributedTraining:
    """What a :class:`~qaconv_ext.engine.Trainer` needs to train across ranks (its ``dist`` argument):
    :meth:`prepare` wraps the model and the criterion, :meth:`gather` builds the global batch,
    :attr:`is_main` says which rank writes checkpoints and logs."""

    def __init__(self, env: DistEnv, sync_bn: bool = False) -> None:
        self.env = env
        self.sync_bn = bool(sync_bn)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def prepare(self, model: nn.Module, criterion: nn.Module) -> Tuple[nn.Module, nn.Module]:
        """``(model, criterion)`` for the training step: BatchNorms synchronised on request, each
        wrapped in ``DistributedDataParallel`` (the criterion only when it has parameters). The
        modules themselves (state dicts, optimiser's parameters) stay those passed in."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        if self.sync_bn:
            model = convert_sync_batchnorm(model, self.env.device)
        step_model = DDP(model, device_ids=ids)
        has_params = any(p.requires_grad for p in criterion.parameters())
        # the memory and head statistics are equal on every rank by construction: no buffer broadcast
        step_criterion = DDP(criterion, device_ids=ids, broadcast_buffers=False) if has_params else criterion
        return step_model, step_criterion

    def gather(self, feature: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`gather_batch`."""
        return gather_batch(feature, target)

    def batch_sampler(self, num_samples: int, global_batch: int, generator: torch.Generator,
                      sampler: Optional[Any] = None) -> ShardedBatchSampler:
        """This rank's :class:`ShardedBatchSampler` (the loader must use the same ``generator``)."""
        return ShardedBatchSampler(num_samples, global_batch, self.env.rank, self.env.world_size, generator,
                                   sampler=sampler)

    def shard_loader(self, loader: Any, global_batch: int, generator: torch.Generator) -> Any:
        """A loader over ``loader``'s dataset (same workers, pinning) yielding this rank's part of each
        global batch (:meth:`batch_sampler`); ``generator`` must be ``loader``'s. A loader with its own
        sampler (not a plain shuffle: the graph sampler) keeps it as the global order."""
        from torch.utils.data import DataLoader, RandomSampler

        own = loader.sampler if loader.batch_sampler is not None and not isinstance(loader.sampler, RandomSampler) \
            else None
        return DataLoader(loader.dataset, batch_sampler=self.batch_sampler(len(loader.dataset), global_batch,
                                                                           generator, sampler=own),
                          num_workers=loader.num_workers, generator=generator, pin_memory=loader.pin_memory,
                          persistent_workers=False)

    def from_main(self, fn: Any) -> Any:
        """``fn`` computed on the main rank only and broadcast to every rank: a function of the same
        arguments returning the main rank's tensor (all ranks must call it together; the graph sampler's
        class distances, so that every rank samples the same epoch)."""

        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            value = torch.as_tensor(fn(*args, **kwargs)) if self.is_main else None
            shape, dtype = all_gather_objects(None if value is None else (tuple(value.shape), value.dtype))[0]
            comm = self.env.device if dist.get_backend() == "nccl" else torch.device("cpu")
            buf = value.to(comm).contiguous() if value is not None else torch.empty(shape, dtype=dtype, device=comm)
            with collective("broadcasting the graph sampler's distances"):
                dist.broadcast(buf, src=0)
            return buf.cpu()

        return wrapped

    def seed_rank(self, seed: int) -> None:
        """Seed the global generators per rank (rank 0 keeps ``seed``): each rank draws its own
        augmentations. Call after the model is built (every rank builds the same one)."""
        if self.env.rank:
            s = int(seed) + 1_000_003 * self.env.rank
            random.seed(s)
            np.random.seed(s % (2 ** 32))
            torch.manual_seed(s)

    def checkpoint_state(self, state: dict) -> Optional[dict]:
        """On the main rank ``state`` with ``rng_ranks`` (every rank's RNG states, in rank order) added;
        ``None`` on the others. Every rank must call it (the states are gathered)."""
        states = all_gather_objects(state["rng"])
        if not self.env.is_main:
            return None
        return {**state, "rng_ranks": states, "world_size": self.env.world_size}

    def rank_rng_state(self, ckpt: dict, default: Any) -> Any:
        """This rank's RNG states from a checkpoint written across the same number of ranks, else
        ``default`` (the main rank's)."""
        ranks = ckpt.get("rng_ranks")
        if ranks and len(ranks) == self.env.world_size:
            return ranks[self.env.rank]
        return default
