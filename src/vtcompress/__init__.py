"""vtcompress: visual token compression for vision-language models."""

from .compressor import (
    Compressor,
    DecoderCompressor,
    EncoderCompressor,
    QueryKind,
    ScoreCompressor,
    Signal,
    Stage,
    TemporalCompressor,
    get,
    list_methods,
    method_class,
    method_info,
    register,
)
from .models.apply import apply, compress_inputs
from .tokens import VisualTokens

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``vtcompress.list_models`` without importing the support module (and the model registry) at package import
    if name == "list_models":
        from .support import list_models

        return list_models
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Compressor",
    "ScoreCompressor",
    "TemporalCompressor",
    "EncoderCompressor",
    "DecoderCompressor",
    "Stage",
    "Signal",
    "QueryKind",
    "VisualTokens",
    "apply",
    "compress_inputs",
    "get",
    "list_methods",
    "list_models",
    "method_class",
    "method_info",
    "register",
]
