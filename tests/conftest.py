"""Shared helpers for the test suite."""
from __future__ import annotations

import pytest
import torch


def unit_maps(batch: int, channels: int, height: int, width: int, dtype=torch.float32,
              generator: torch.Generator | None = None, device: str = "cpu") -> torch.Tensor:
    """Fresh random feature maps, L2-normalised over channels at every location (as QAConv feeds them)."""
    x = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device=device, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def score_err(out: torch.Tensor, query: torch.Tensor, gallery: torch.Tensor, weight: torch.Tensor,
              bias=None) -> float:
    """Error of ``qaconv_score`` output against the float64 reference, relative to ``||values| @ |w|||``.

    A signed weighted sum can cancel, so a plain relative error fails on lucky cancellations; the sum
    of the terms' magnitudes is the scale that rounding errors grow with.
    """
    from qaconv_ext import reference

    dev = query.device  # the float64 reference runs where the inputs are (fast on a GPU)
    q, g, w = query.detach().double(), gallery.detach().double(), weight.detach().to(dev, torch.float64)
    b = bias.to(dev, torch.float64) if isinstance(bias, torch.Tensor) else bias
    ref = reference.qaconv_score(q, g, w, b)
    scale = reference.qaconv_match(q, g).abs() @ w.abs()
    return float((out.to(dev, torch.float64) - ref).norm() / scale.norm().clamp_min(1e-300))


@pytest.fixture
def gen() -> torch.Generator:
    """A generator seeded differently in every run: inputs are fresh, never the same fixed sample."""
    g = torch.Generator()
    g.seed()
    return g
