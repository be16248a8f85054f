"""The examples' library calls (the scripts themselves run end to end in seconds; here their functions)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from helpers import unit_maps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def drop_in():
    spec = importlib.util.spec_from_file_location("drop_in_example", os.path.join(ROOT, "examples", "drop_in.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_drop_in_reranks_a_valid_distance(drop_in):
    """The example re-ranks ``1 - sigmoid(score / 10)``, not the negated score it hands to evaluate_rank
    (re-ranking refuses negative distances): on an easy problem, every query's own gallery image stays
    first after re-ranking."""
    g = torch.Generator().manual_seed(0)
    ids = unit_maps(12, 32, 4, 2, generator=g)
    qf = torch.nn.functional.normalize(ids + 0.05 * torch.randn(ids.shape, generator=g), dim=1)
    gf = torch.nn.functional.normalize(ids + 0.05 * torch.randn(ids.shape, generator=g), dim=1)
    weight, bias, _ = drop_in.qaconv_head_weights(32, 4, 2)
    dist = drop_in.qaconv_distmat(qf, gf, weight, bias)
    rr = drop_in.qaconv_rerank(qf, gf, weight, bias, k1=4, k2=2)
    assert rr.shape == (12, 12) and np.isfinite(rr).all() and (rr >= 0).all()
    assert (torch.argmin(dist, dim=1) == torch.arange(12)).all()
    assert (np.argmin(rr, axis=1) == np.arange(12)).all()
