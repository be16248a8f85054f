"""float64 references and exact inputs for the emulated kernels (torch.max semantics: NaN propagates
with the first NaN's index, ties keep the first index)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def int_maps(n: int, L: int, d: int, gen: torch.Generator, hi: int = 3) -> torch.Tensor:
    """Integer-valued maps [n, L, d] in [-hi, hi]: products and sums of them are exact in float32."""
    return torch.randint(-hi, hi + 1, (n, L, d), generator=gen).float()


def similarity(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """S [P, N, Lq, Lg] in float64 of the maps [P, Lq, d], [N, Lg, d] as the kernels see them."""
    return torch.einsum("pld,nmd->pnlm", q.double(), g.double())


def max_torch_semantics(S: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """max and argmax along dim as torch.max: NaN propagates (first NaN's index), ties -> first index."""
    nan = torch.isnan(S)
    filled = torch.where(nan, torch.full_like(S, float("inf")), S)
    idx = torch.where(nan.any(dim, keepdim=True), nan.double().argmax(dim, keepdim=True),
                      torch.from_numpy(np.argmax(filled.numpy(), axis=dim)).unsqueeze(dim))
    return torch.gather(S, dim, idx).squeeze(dim), idx.squeeze(dim)


def match_reference(q: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """values [P, N, Lq + Lg] (float64) and int64 indices of match_forward."""
    S = similarity(q, g)
    rv, ri = max_torch_semantics(S, 3)
    cv, ci = max_torch_semantics(S, 2)
    return torch.cat([rv, cv], 2), torch.cat([ri, ci], 2)


def score_reference(q: torch.Tensor, g: torch.Tensor, w: torch.Tensor, bias: Optional[float]) -> torch.Tensor:
    """[P, N] float64: the maxima times the head's weights, plus the bias."""
    values, _ = match_reference(q, g)
    return (values * w.double()).sum(-1) + (0.0 if bias is None else float(bias))


def backward_reference(grad_values: torch.Tensor, indices: torch.Tensor, q: torch.Tensor,
                       g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 grad_q [P, Lq, d] and grad_g [N, Lg, d]: the gradient scattered through the argmax."""
    Lq, Lg = q.shape[1], g.shape[1]
    gv = grad_values.double()
    rows = torch.nn.functional.one_hot(indices[..., :Lq], Lg).double() * gv[..., :Lq, None]
    cols = torch.nn.functional.one_hot(indices[..., Lq:], Lq).double() * gv[..., Lq:, None]
    W = rows + cols.transpose(2, 3)  # [P, N, Lq, Lg]: the weight of each (query, gallery location) pair
    return torch.einsum("pnij,njd->pid", W, g.double()), torch.einsum("pnij,pid->njd", W, q.double())


def assert_same(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bit-exact agreement (NaN exactly where the reference has NaN)."""
    out, ref = out.double(), ref.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{what}: NaN positions differ"
    ok = ~torch.isnan(ref)
    diff = (out[ok] - ref[ok]).abs()
    assert diff.numel() == 0 or diff.max().item() == 0.0, f"{what}: max |diff| {diff.max().item()}"
