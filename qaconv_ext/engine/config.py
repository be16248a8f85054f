"""Training settings: :class:`TrainConfig` and the recipes, which live in the torch-free
:mod:`qaconv_ext.config` (the command line reads them without importing PyTorch)."""
from __future__ import annotations

from ..config import RECIPE_DEFAULTS, RECIPES, TrainConfig

__all__ = ["TrainConfig", "RECIPES", "RECIPE_DEFAULTS"]
