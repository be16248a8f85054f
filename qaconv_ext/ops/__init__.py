"""Fused QAConv matching ops, registered as ``torch.ops.qaconv_ext.*``."""
from . import reference
from .centroid import QuantizedTable, centroid_score, centroid_table, quantize_centroid_table
from .match import build_info, cpu_kernel, native_available, qaconv_match, qaconv_score

__all__ = ["qaconv_match", "qaconv_score", "native_available", "cpu_kernel", "build_info", "reference",
           "centroid_score", "centroid_table", "quantize_centroid_table", "QuantizedTable"]
