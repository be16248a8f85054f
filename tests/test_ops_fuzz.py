"""Property test of the ops: random shapes, dtypes, memory layouts and NaN/Inf positions, each case
against the float64 reference.

Every case is drawn from its own fixed seed. Sizes include 1 x 1 maps, one channel, empty batches and
lengths that are no multiple of the kernels' tiles (16 lanes on the CPU; 64-wide tiles, 16-channel
chunks and 8-channel copies on CUDA). The properties, as the README states them:

* values equal the reference maxima (within the dtype's rounding), NaN exactly where the reference
  has NaN, infinities exactly where it has them;
* an index points at a maximum: the reference similarity at the index equals the reference maximum,
  and in a row or column that holds a NaN it is the first NaN's;
* values without indices equal values with indices; scores equal ``values @ weight + bias``;
* for finite inputs, ``match_backward`` at the op's own indices equals the reference's scatter.
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import qaconv_ext
from helpers import rel_err
from qaconv_ext import reference

CASES = 40
# Absolute tolerance of values and scores of unit-norm maps (|S| <= 1), by input dtype: accumulation in
# float32 and, for float16/bfloat16, values rounded back to the input dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
LAYOUTS = ["contiguous", "channels_last", "channel_stride", "spatial_slice", "transposed", "offset"]


class Draw:
    """Choices made from one seeded generator."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def int(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def pick(self, items: List):
        return items[self.int(0, len(items) - 1)]

    def side(self) -> int:
        """A map side: 1 a quarter of the time, otherwise up to 12."""
        return 1 if self.int(0, 3) == 0 else self.int(2, 12)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` with the same values in another memory layout."""
    B, d, h, w = x.shape
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "channel_stride":  # every other channel of a wider map
        wide = torch.full((B, 2 * d, h, w), 5.0, dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    if layout == "spatial_slice":  # every other row, and columns from the second on, of a larger map
        big = torch.full((B, d, 2 * h, w + 1), 5.0, dtype=x.dtype, device=x.device)
        big[:, :, ::2, 1:] = x
        return big[:, :, ::2, 1:]
    if layout == "transposed":  # strides of neither standard layout
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "offset":  # a base one element past the start of its storage
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        return flat[1:].view(x.shape).copy_(x)
    return x.contiguous()


def _nonfinite(x: torch.Tensor, draw: Draw, kinds: List[float]) -> None:
    """Write NaN / +inf / -inf into up to three random entries of ``x`` (float64, in place)."""
    if x.numel() == 0:
        return
    for _ in range(draw.int(1, 3)):
        x.view(-1)[draw.int(0, x.numel() - 1)] = draw.pick(kinds)


def _case(seed: int, device: str) -> Dict:
    draw = Draw(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device == "cpu" else [])
    dtype = draw.pick(dtypes)
    P = 0 if draw.int(0, 11) == 0 else draw.int(1, 6)
    N = 0 if draw.int(0, 11) == 0 else draw.int(1, 9)
    d = 1 if draw.int(0, 4) == 0 else draw.int(2, 40)
    hq, wq, hg, wg = draw.side(), draw.side(), draw.side(), draw.side()
    q = torch.nn.functional.normalize(torch.randn(P, d, hq, wq, dtype=torch.float64, generator=draw.gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(N, d, hg, wg, dtype=torch.float64, generator=draw.gen), dim=1)
    special = draw.pick(["none", "none", "nan", "inf", "both"])
    kinds = {"nan": [float("nan")], "inf": [float("inf"), -float("inf")],
             "both": [float("nan"), float("inf"), -float("inf")]}.get(special)
    if kinds:
        _nonfinite(draw.pick([q, g]), draw, kinds)
        if draw.int(0, 1):
            _nonfinite(draw.pick([q, g]), draw, kinds)
    q, g = q.to(dtype), g.to(dtype)  # the values the kernel sees; the reference reads them in float64
    layouts = draw.pick(LAYOUTS), draw.pick(LAYOUTS)
    weight = torch.randn(hq * wq + hg * wg, dtype=torch.float64, generator=draw.gen)
    bias = draw.pick([None, 0.25, torch.tensor([-0.5])])
    upstream = torch.randn(P, N, hq * wq + hg * wg, dtype=torch.float64, generator=draw.gen)
    upstream[upstream.abs() < 0.3] = 0.0
    return dict(dtype=dtype, q=q, g=g, layouts=layouts, weight=weight, bias=bias, upstream=upstream,
                special=special, desc=f"seed {seed}: {dtype} P={P} N={N} d={d} q {hq}x{wq} {layouts[0]}, "
                                      f"g {hg}x{wg} {layouts[1]}, {special}")


def _check_values(values: torch.Tensor, ref: torch.Tensor, atol: float, desc: str) -> None:
    values = values.cpu().double()
    assert torch.equal(torch.isnan(values), torch.isnan(ref)), desc
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(values), inf) and torch.equal(values[inf], ref[inf]), desc
    finite = torch.isfinite(ref)
    assert (values[finite] - ref[finite]).abs().max().item() <= atol if finite.any() else True, desc


def _check_indices(S: torch.Tensor, indices: torch.Tensor, dim: int, atol: float, desc: str) -> None:
    """``indices`` [..., k] index dimension ``dim`` of S; each must point at a maximum (first NaN if any)."""
    indices = indices.cpu()
    assert indices.dtype == torch.long and int(indices.min()) >= 0 and int(indices.max()) < S.shape[dim], desc
    at = torch.gather(S, dim, indices.unsqueeze(dim)).squeeze(dim)
    best = S.amax(dim)  # NaN where the row holds a NaN
    nan_rows = torch.isnan(best)
    first_nan = torch.isnan(S).to(torch.uint8).argmax(dim)  # the first True along dim
    assert torch.equal(indices[nan_rows], first_nan[nan_rows]), desc
    ok = ~nan_rows
    exact = ok & torch.isinf(best)
    assert torch.equal(at[exact], best[exact]), desc
    close = ok & torch.isfinite(best)
    assert ((at[close] - best[close]).abs() <= 2 * atol).all(), desc


@pytest.mark.parametrize("case", range(CASES), ids=lambda i: f"case{i}")
def test_ops_against_reference(device, case):
    c = _case(1000 + case, device)
    dtype, desc = c["dtype"], c["desc"]
    q, g = (_layout(t.to(device), layout) for t, layout in zip((c["q"], c["g"]), c["layouts"]))
    qr, gr = c["q"].double(), c["g"].double()
    P, N, Lq, Lg = qr.shape[0], gr.shape[0], qr.shape[2] * qr.shape[3], gr.shape[2] * gr.shape[3]
    atol = ATOL[dtype]

    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    assert values.shape == (P, N, Lq + Lg) and values.dtype == dtype and indices.shape == values.shape, desc
    only_values = qaconv_ext.qaconv_match(q, g)
    torch.testing.assert_close(only_values, values, rtol=0, atol=0, equal_nan=True, msg=desc)
    w = c["weight"].to(device, torch.float32 if dtype != torch.float64 else dtype)
    bias = c["bias"].to(device) if isinstance(c["bias"], torch.Tensor) else c["bias"]
    score = qaconv_ext.qaconv_score(q, g, w, bias)
    assert score.shape == (P, N), desc
    if P == 0 or N == 0:
        return

    S = reference.similarity(qr, gr)  # [P, N, Lq, Lg] in float64
    ref = torch.cat([S.amax(3), S.amax(2)], dim=2)
    _check_values(values, ref, atol, desc)
    _check_indices(S, indices[..., :Lq], 3, atol, desc)
    _check_indices(S, indices[..., Lq:], 2, atol, desc)

    wr = w.cpu().double()
    ref_score = ref @ wr + (0.0 if bias is None else float(bias))
    score = score.cpu().double()
    assert torch.equal(torch.isnan(score), torch.isnan(ref_score)), desc
    inf = torch.isinf(ref_score)
    assert torch.equal(torch.isinf(score), inf) and torch.equal(score[inf], ref_score[inf]), desc
    finite = torch.isfinite(ref_score)
    scale = ref.abs().nan_to_num(0.0, 0.0, 0.0) @ wr.abs()  # what rounding errors grow with
    assert ((score - ref_score)[finite].abs() <= atol * scale[finite] + 1e-12).all(), desc

    if c["special"] == "none":
        upstream = c["upstream"]
        got = torch.ops.qaconv_ext.match_backward(upstream.to(device, values.dtype), indices, q, g)
        want = reference.match_backward(upstream, indices.cpu(), qr, gr)
        for out, ref_grad, like in zip(got, want, (q, g)):
            assert out.shape == like.shape and out.dtype == dtype, desc
            assert rel_err(out, ref_grad) <= max(atol, 1e-6), desc
