"""vtcompress: visual token compression for vision-language models."""

from .compressor import Compressor, ScoreCompressor, get, list_methods, method_info, register
from .tokens import VisualTokens

__version__ = "0.1.0"

__all__ = [
    "Compressor",
    "ScoreCompressor",
    "VisualTokens",
    "get",
    "list_methods",
    "method_info",
    "register",
]
