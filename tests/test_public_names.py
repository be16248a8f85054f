"""The names the package promises at its top level import from there, and each is the object of its part."""
import importlib

import pytest

import qaconv_ext

PROMISED = {
    "qaconv_match": "ops", "qaconv_score": "ops", "native_available": "ops", "reference": "ops",
    "cpu_kernel": "ops", "build_info": "ops",
    "QAConv": "head", "ClassMemoryLoss": "losses", "TripletLoss": "losses", "PairwiseMatchingLoss": "losses", "build_backbone": "models", "evaluate_rank": "evaluation",
    "tlift": "postprocess", "k_reciprocal_rerank": "postprocess",
}


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_top_level_name_is_the_parts_object(name):
    assert name in qaconv_ext.__all__
    part = importlib.import_module(f"qaconv_ext.{PROMISED[name]}")
    assert getattr(qaconv_ext, name) is getattr(part, name)


def test_parts_are_attributes_and_unknown_names_fail():
    for part in ("search", "distributed", "postprocess", "engine"):
        assert getattr(qaconv_ext, part) is importlib.import_module(f"qaconv_ext.{part}")
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        qaconv_ext.nonexistent  # noqa: B018
