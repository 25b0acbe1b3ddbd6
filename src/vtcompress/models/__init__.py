"""Applying methods to stock Hugging Face VLMs: one adapter per family, shared mechanics in ``apply``."""

from .apply import (
    Adapter,
    ApplyHandle,
    CompressedInputs,
    ImageLayout,
    adapter_for,
    apply,
    compress_inputs,
    register_adapter,
    supported_families,
)

__all__ = [
    "Adapter",
    "ApplyHandle",
    "CompressedInputs",
    "ImageLayout",
    "adapter_for",
    "apply",
    "compress_inputs",
    "register_adapter",
    "supported_families",
]
