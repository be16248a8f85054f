"""Feature extraction and blocked QAConv scoring: the primitives evaluation, training's graph sampler,
the gallery search and the sharded evaluation are built from.

* :func:`extract_features`: a model over images, with an explicit input preset;
* :func:`blocks`: the one way a range is cut into consecutive blocks;
* :func:`score_blocks`, :func:`self_score_blocks`, :func:`score_rows`: the fused
  :func:`~qaconv_ext.qaconv_score` with the folded head (``head.folded(dtype=, device=)``), block by
  block; :func:`self_score_jobs` lists the blocks of a self-scoring, :func:`deal_by_pairs` deals them
  to ranks by pair count;
* :func:`select_topk`: the one top-k order (score descending, ties by the smaller index);
* :func:`qaconv_distance_fn`: the graph sampler's class distances.

Nothing here changes the training mode of a module it is given: extraction switches the model to
eval mode for its pass and gives every submodule back its own mode; scoring reads the folded head,
which is built from the running statistics in any mode.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_PRESET
from .data import ImageDataset, build_test_transform
from .ops import qaconv_score

__all__ = ["blocks", "extract_features", "head_weights", "score_blocks", "self_score_jobs", "job_pairs", "score_jobs",
           "assemble_self_scores", "self_score_blocks", "deal_by_pairs", "score_rows", "select_topk",
           "qaconv_distance_fn", "ScoreRows", "BlockJob"]

Records = Sequence[Any]
ScoreRows = Callable[[int, int], torch.Tensor]
#: One block of a self-scoring: rows ``a0:a1`` against columns ``b0:b1``.
BlockJob = Tuple[Tuple[int, int], Tuple[int, int]]


def blocks(n: int, size: int) -> List[Tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``size`` (at least 1) covering ``range(n)``."""
    size = max(1, int(size))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair", unit_scale=True, leave=False, disable=not progress,
                dynamic_ncols=True)


def extract_features(model: nn.Module, records: Records, height: int, width: int, batch_size: int = 64,
                     device: Union[str, torch.device] = "cpu", workers: int = 0, progress: bool = True,
                     desc: str = "features", amp: Optional[bool] = None,
                     out_device: Union[str, torch.device] = "cpu", preprocess: str = DEFAULT_PRESET,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run ``model`` (eval mode, no grad) over the images of ``records`` -> ``[N, ...]`` in ``dtype``.

    ``records`` are :class:`~qaconv_ext.data.Record` s or image paths; images are resized to
    ``height x width`` and scaled with the test transform of the input preset ``preprocess`` (the one
    the model was trained with: :func:`qaconv_ext.engine.load_trained` returns it). ``amp``: float16
    autocast on CUDA (default on for CUDA). The result is on ``out_device``, each batch converted to
    ``dtype`` as it is produced (``torch.bfloat16`` halves the memory of stored maps). Every submodule
    of ``model`` gets its own training mode back afterwards (frozen BatchNorms stay frozen).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = torch.device(device)
    use_amp = bool(device.type == "cuda" if amp is None else amp) and device.type == "cuda"
    loader = DataLoader(ImageDataset(list(records), build_test_transform(height, width, preprocess)),
                        batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    parts: List[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    out = model(batch[0].to(device, non_blocking=True))
                parts.append(out.to(out_device, dtype))
    finally:
        for m, mode in modes:
            m.training = mode
    if not parts:
        raise ValueError("extract_features: no images")
    return torch.cat(parts)


def head_weights(head: nn.Module, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The folded head as the op takes it for maps of ``dtype`` on ``device`` (no gradient)."""
    with torch.no_grad():
        weight, bias = head.folded(dtype=dtype, device=device)
    return weight.detach(), bias.detach()


def _device(device: Union[str, torch.device, None], fea: torch.Tensor) -> torch.device:
    return torch.device(device) if device is not None else fea.device


def score_blocks(head: nn.Module, query_fea: torch.Tensor, gallery_fea: torch.Tensor,
                 query_chunk: int = 512, gallery_chunk: int = 2048, progress: bool = True,
                 desc: str = "QAConv scores", device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """QAConv logits ``[P, N]`` (float32, CPU) of every query against every gallery image: the op
    :func:`qaconv_ext.qaconv_score` with the folded head, called block by block.

    Works in ``query_chunk x gallery_chunk`` blocks (on ``device``, default: the features' device)
    so that only the features and one block of scores are resident on the device.
    """
    device = _device(device, query_fea)
    weight, bias = head_weights(head, query_fea.dtype, device)
    P, N = query_fea.shape[0], gallery_fea.shape[0]
    out = torch.empty(P, N, dtype=torch.float32)
    bar = _bar(P * N, desc, progress)
    with torch.no_grad():
        for g0, g1 in blocks(N, gallery_chunk):
            g = gallery_fea[g0:g1].to(device, non_blocking=True)
            for q0, q1 in blocks(P, query_chunk):
                q = query_fea[q0:q1].to(device, non_blocking=True)
                out[q0:q1, g0:g1] = qaconv_score(q, g, weight, bias).float().cpu()
                bar.update((q1 - q0) * (g1 - g0))
    bar.close()
    return out


def _symmetric(head: nn.Module) -> bool:
    return getattr(head, "layout", "eccv") == "v2"


def self_score_jobs(head: nn.Module, n: int, chunk: int) -> List[BlockJob]:
    """The blocks of ``n`` maps scored against themselves in blocks of ``chunk``: with the symmetric
    ``v2`` head those on and above the diagonal (mirrored when assembled), else all of them."""
    bs = blocks(n, chunk)
    if _symmetric(head):
        return [(a, b) for i, a in enumerate(bs) for b in bs[i:]]
    return [(a, b) for b in bs for a in bs]


def job_pairs(job: BlockJob) -> int:
    """The pairs a block scores."""
    (a0, a1), (b0, b1) = job
    return (a1 - a0) * (b1 - b0)


def score_jobs(head: nn.Module, fea: torch.Tensor, jobs: Sequence[BlockJob], device: torch.device,
               on_block: Optional[Callable[[int], None]] = None) -> List[torch.Tensor]:
    """The scores ``[a1 - a0, b1 - b0]`` (float32, CPU) of each block of ``jobs`` among ``fea``."""
    weight, bias = head_weights(head, fea.dtype, device)
    out = []
    with torch.no_grad():
        for (a0, a1), (b0, b1) in jobs:
            a = fea[a0:a1].to(device, non_blocking=True)
            b = fea[b0:b1].to(device, non_blocking=True)
            out.append(qaconv_score(a, b, weight, bias).float().cpu())
            if on_block is not None:
                on_block((a1 - a0) * (b1 - b0))
    return out


def assemble_self_scores(head: nn.Module, n: int, jobs: Sequence[BlockJob], scores: Sequence[torch.Tensor]
                         ) -> torch.Tensor:
    """The ``[n, n]`` matrix from the blocks of :func:`self_score_jobs` and their scores."""
    out = torch.empty(n, n, dtype=torch.float32)
    symmetric = _symmetric(head)
    for ((a0, a1), (b0, b1)), s in zip(jobs, scores):
        out[a0:a1, b0:b1] = s
        if symmetric and b0 != a0:
            out[b0:b1, a0:a1] = s.t()
    return out


def self_score_blocks(head: nn.Module, fea: torch.Tensor, chunk: int = 1024, progress: bool = True,
                      desc: str = "QAConv self scores", device: Union[str, torch.device, None] = None
                      ) -> torch.Tensor:
    """QAConv logits ``[N, N]`` among one set (e.g. gallery-gallery for re-ranking), block by block
    like :func:`score_blocks`. With the symmetric ``v2`` head only the blocks on and above the
    diagonal are computed and mirrored (about half the pairs)."""
    device = _device(device, fea)
    jobs = self_score_jobs(head, fea.shape[0], chunk)
    bar = _bar(sum(job_pairs(j) for j in jobs), desc, progress)
    scores = score_jobs(head, fea, jobs, device, bar.update)
    bar.close()
    return assemble_self_scores(head, fea.shape[0], jobs, scores)


def deal_by_pairs(jobs: Sequence[BlockJob], world: int) -> List[List[int]]:
    """Deal the blocks to ``world`` ranks by pair count: each rank takes a contiguous run of ``jobs``
    (indices returned), the runs cut where the running pair count crosses ``r * total / world``, so the
    ranks' pair counts differ by at most the largest block's."""
    total = sum(job_pairs(j) for j in jobs)
    out: List[List[int]] = [[] for _ in range(world)]
    before = 0
    for i, job in enumerate(jobs):
        k = job_pairs(job)
        # the rank whose share holds this block's middle pair
        r = min(world - 1, (2 * before + k) * world // (2 * total)) if total else i % world
        out[r].append(i)
        before += k
    return out


def score_rows(head: nn.Module, fea: torch.Tensor, gallery_chunk: int = 8192,
               device: Union[str, torch.device, None] = None) -> ScoreRows:
    """``rows(start, stop)`` -> QAConv logits ``[stop - start, N]`` (float32, CPU) of ``fea[start:stop]``
    against all of ``fea``, computed on demand by :func:`qaconv_ext.qaconv_score` with the folded head
    (``gallery_chunk`` maps per call). Feeds the memory-bounded re-ranking: the ``[N, N]`` matrix
    never exists, only the row blocks asked for. ``rows.entries(r, c)`` gives single logits."""
    device = _device(device, fea)
    weight, bias = head_weights(head, fea.dtype, device)
    N = fea.shape[0]
    column_blocks = blocks(N, gallery_chunk)

    def rows(start: int, stop: int) -> torch.Tensor:
        out = torch.empty(stop - start, N, dtype=torch.float32)
        with torch.no_grad():
            a = fea[start:stop].to(device, non_blocking=True)
            for g0, g1 in column_blocks:
                out[:, g0:g1] = qaconv_score(a, fea[g0:g1].to(device, non_blocking=True), weight, bias).float().cpu()
        return out

    def entries(r: np.ndarray, c: np.ndarray) -> torch.Tensor:
        """The single logits ``[r[i], c[i]]`` (the same values as in ``rows``), one call per distinct row."""
        r_t, c_t = torch.as_tensor(np.asarray(r), dtype=torch.int64), torch.as_tensor(np.asarray(c), dtype=torch.int64)
        out = torch.empty(r_t.shape[0], dtype=torch.float32)
        if r_t.numel() == 0:
            return out
        order = torch.argsort(r_t, stable=True)
        rs, counts = torch.unique_consecutive(r_t[order], return_counts=True)
        with torch.no_grad():
            at = 0
            for row, n in zip(rs.tolist(), counts.tolist()):
                sel = order[at:at + n]
                out[sel] = qaconv_score(fea[row:row + 1].to(device), fea[c_t[sel]].to(device), weight, bias
                                        ).float().cpu().reshape(-1)
                at += n
        return out

    rows.entries = entries  # type: ignore[attr-defined]
    return rows


def select_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best ``(value, index)`` entries of every row, ordered by value descending and, among
    equal values, by index ascending (NaN first, as in ``torch.sort``): the order of a stable
    descending sort of the dense score matrix. ``values`` and ``indices`` are ``[P, n]`` (columns in any
    order); returns ``[P, min(k, n)]`` each."""
    by_index = torch.sort(indices, dim=1, stable=True)
    v = torch.gather(values, 1, by_index.indices)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(v, 1, order), torch.gather(by_index.values, 1, order)


def qaconv_distance_fn(model: nn.Module, matcher: nn.Module, records: Sequence[Any], height: int, width: int, *,
                       preprocess: str = DEFAULT_PRESET, device: Union[str, torch.device] = "cpu",
                       batch_size: int = 64, chunk: int = 512, progress: bool = True
                       ) -> Callable[[List[int]], torch.Tensor]:
    """``distance_fn`` for :class:`~qaconv_ext.data.GraphSampler`: the negated QAConv score among the
    images ``records[i]`` of the given indices -- :func:`extract_features` with the test transform of
    ``preprocess`` (float32 maps), then :func:`score_blocks` of the set against itself in ``chunk`` x
    ``chunk`` blocks."""
    device = torch.device(device)

    def distances(indices: List[int]) -> torch.Tensor:
        fea = extract_features(model, [records[i] for i in indices], height, width, batch_size, device,
                               progress=progress, desc="graph sampler: features", out_device=device,
                               preprocess=preprocess, amp=False)
        return -score_blocks(matcher, fea, fea, chunk, chunk, progress, "graph sampler: class distances", device)

    return distances
