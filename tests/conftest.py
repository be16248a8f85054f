"""Fixtures shared by the test suite (helper functions live in tests/helpers.py).

Every test draws from seeds derived from its own id (name and parameters): a run repeats the
previous one exactly, and a failure reproduces with the same command.
"""
from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from helpers import BENCH_DIR, DEVICES, seed_of


@pytest.fixture(autouse=True)
def _seeded_global_rngs(request):
    """Seed torch's, numpy's and Python's global generators per test (model init, shuffles, dropout)."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's id and parameters: fixed per case, different across cases."""
    return torch.Generator().manual_seed(seed_of(request.node.nodeid))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy generator seeded from the test's id and parameters."""
    return np.random.default_rng(seed_of(request.node.nodeid))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a contract test runs on: "cpu", and "cuda" when a device is present."""
    return request.param


@pytest.fixture
def bench_path(monkeypatch):
    """The benchmark scripts importable by name; the modules they loaded are forgotten afterwards."""
    monkeypatch.syspath_prepend(BENCH_DIR)
    yield BENCH_DIR
    for name in [m for m in sys.modules if m.startswith("bench_") or m == "_machine"]:
        sys.modules.pop(name, None)
