"""Applying methods to stock Hugging Face VLMs: one adapter per family, shared mechanics in ``apply``."""

from .apply import ApplyHandle, CompressedInputs, adapter_for, apply, compress_inputs, supported_families

__all__ = ["ApplyHandle", "CompressedInputs", "adapter_for", "apply", "compress_inputs", "supported_families"]
