"""Applying methods to stock Hugging Face VLMs: one description file per family (``models/<family>.py``), the
shared stage engines (``pipeline``, ``encoder``, ``decoder``), sequence surgery and the hook lifecycle."""

from .apply import (
    Adapter,
    ApplyHandle,
    CompressedInputs,
    ExtraInjection,
    ImageLayout,
    Injection,
    Modality,
    ModelDescription,
    PositionScheme,
    TokenLayout,
    adapter_for,
    apply,
    compress_inputs,
    description_for,
    list_families,
    register_adapter,
    register_family,
    supported_families,
)

__all__ = [
    "Adapter",
    "ApplyHandle",
    "CompressedInputs",
    "ExtraInjection",
    "ImageLayout",
    "Injection",
    "Modality",
    "ModelDescription",
    "PositionScheme",
    "TokenLayout",
    "adapter_for",
    "apply",
    "compress_inputs",
    "description_for",
    "list_families",
    "register_adapter",
    "register_family",
    "supported_families",
]
