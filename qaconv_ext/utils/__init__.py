"""Small helpers below every other part of the package: checks of score/distance matrices and safe
reading of PyTorch files."""
from .matrix_checks import check_matrix
from .torch_files import TorchFileError, load_torch_file

__all__ = ["check_matrix", "TorchFileError", "load_torch_file"]
