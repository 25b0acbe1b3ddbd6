"""Apply any method to a stock Hugging Face VLM: :func:`apply` (context manager / handle) and
:func:`compress_inputs` (the explicit form).

The machinery is split by concern; this module keeps every public name importable from where it always was:

* :mod:`~vtcompress.models.description`: :class:`ModelDescription` (``Adapter``), where things are in a family;
* :mod:`~vtcompress.models.registry`: the registry of families (:func:`register_adapter`, :func:`adapter_for`,
  :func:`list_families`, the ``vtcompress.models`` entry point group);
* :mod:`~vtcompress.models.layout`: :class:`ImageLayout`, the layout of one image's tokens;
* :mod:`~vtcompress.models.pipeline`: the projector-stage compression pipeline (:func:`compress_inputs`);
* :mod:`~vtcompress.models.sequence`: sequence surgery (placeholder runs, shortened ids / masks / positions);
* :mod:`~vtcompress.models.handle`: the hook lifecycle (:class:`ApplyHandle`, :func:`apply`).
"""

from __future__ import annotations

from .description import (
    Adapter,
    ExtraInjection,
    Injection,
    Modality,
    ModelDescription,
    PositionScheme,
    TokenLayout,
)
from .handle import ApplyHandle, apply
from .layout import ImageLayout
from .pipeline import CompressedInputs, compress_features, compress_inputs, feature_signal_layer, resolve_methods
from .registry import (
    FamilyInfo,
    adapter_for,
    description_for,
    list_families,
    register_adapter,
    register_family,
    supported_families,
)

__all__ = [
    "Adapter",
    "ModelDescription",
    "Modality",
    "PositionScheme",
    "TokenLayout",
    "Injection",
    "ExtraInjection",
    "ImageLayout",
    "CompressedInputs",
    "ApplyHandle",
    "apply",
    "compress_inputs",
    "compress_features",
    "adapter_for",
    "description_for",
    "feature_signal_layer",
    "resolve_methods",
    "register_adapter",
    "register_family",
    "supported_families",
    "list_families",
    "FamilyInfo",
]
