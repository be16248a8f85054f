"""The torch-free bottom module: it imports only the standard library, the command line and the
library read their names from it, and the input preset's rule for checkpoints that record none."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from qaconv_ext import config

REPO = Path(__file__).resolve().parents[1]


def test_imports_only_the_standard_library():
    tree = ast.parse((REPO / "qaconv_ext" / "config.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert all(n in sys.stdlib_module_names or n == "__future__" for n in names), names
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


def test_the_parsers_read_it_without_torch():
    code = ("import sys; import qaconv_ext.cli as c; p = c.build_parser(); "
            "p.parse_args(['train', '--arch', 'small', '--preprocess', 'imagenet', '--recipe', 'gs']); "
            "assert 'torch' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_one_owner_of_the_names():
    from qaconv_ext.cli import common
    from qaconv_ext.data import transforms
    from qaconv_ext.engine import TrainConfig
    from qaconv_ext.models import ARCHITECTURES, NECK_TYPES, RESNET_SPECS

    assert common.ARCHITECTURE_CHOICES is config.ARCHITECTURES is ARCHITECTURES
    assert common.NECK_TYPE_CHOICES is config.NECK_TYPES is NECK_TYPES
    assert common.PREPROCESS_CHOICES is config.PRESETS is transforms.PREPROCESS_PRESETS
    assert common.RECIPE_CHOICES is config.RECIPES and common.GS_DEFAULTS is config.RECIPE_DEFAULTS["gs"]
    assert TrainConfig is config.TrainConfig
    assert set(RESNET_SPECS) == set(config.ARCHITECTURES)   # every name has a specification


def test_preset_rule():
    assert config.preset_of({"preprocess": "imagenet"}) == "imagenet"
    assert config.preset_of({"preprocess": "public"}, own_format=True) == "public"
    assert config.preset_of({}, own_format=True) == config.LEGACY_PRESET == "imagenet"
    assert config.preset_of(None, own_format=False) == config.DEFAULT_PRESET == "public"
    assert config.TrainConfig().preprocess == config.DEFAULT_PRESET
    with pytest.raises(ValueError, match="unknown preprocess 'raw'"):
        config.preset_of({"preprocess": "raw"})
