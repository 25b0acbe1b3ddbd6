"""vtcompress: visual token compression for vision-language models."""

from .compressor import Compressor, ScoreCompressor, get, list_methods, method_info, register
from .models.apply import apply, compress_inputs
from .tokens import VisualTokens

__version__ = "0.1.0"

__all__ = [
    "Compressor",
    "ScoreCompressor",
    "VisualTokens",
    "apply",
    "compress_inputs",
    "get",
    "list_methods",
    "method_info",
    "register",
]
