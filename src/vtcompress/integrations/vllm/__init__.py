"""vLLM out-of-tree plugin: serve LLaVA-1.5 and Qwen2-VL with vtcompress's projector-stage methods.

vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point (installed with this package) in every
process it starts; it adds model classes, each a subclass of vLLM's own class for the family whose image path
compresses with the same :class:`~vtcompress.Compressor` objects and mechanics as ``vtcompress.apply``:

=========================================== ==================================================
architecture (``hf_overrides``)             vLLM class it extends
=========================================== ==================================================
``VtcompressLlavaForConditionalGeneration``   ``LlavaForConditionalGeneration`` (LLaVA-1.5)
``VtcompressQwen2VLForConditionalGeneration`` ``Qwen2VLForConditionalGeneration``
=========================================== ==================================================

Select one and the server-wide default with ``hf_overrides`` (:func:`hf_overrides` builds the dict)::

    LLM(model=path, hf_overrides={"architectures": ["VtcompressLlavaForConditionalGeneration"],
                                  "vtcompress": {"method": "visionzip", "budget": 0.25}})
    vllm serve PATH --hf-overrides '{"architectures": [...], "vtcompress": {"method": "tome", "budget": 64}}'

and per request with ``mm_processor_kwargs={"vtcompress_method": "divprune", "vtcompress_budget": 0.11}``. A bad
value fails that request with one ``ValueError`` naming it and what is allowed. Decoder-stage methods are refused
(vLLM's paged KV cache has one length per sequence for all layers), as are encoder-stage and trainable ones, and
methods whose kept count depends on the image (PruMerge): vLLM fixes an image's placeholder count when the
request is processed. ``tensor_parallel_size`` must be 1 (the signals' head mean needs every head; see
:mod:`.signals`).
"""

from __future__ import annotations

__all__ = ["register", "hf_overrides", "ARCHITECTURES", "VLLM_VERSION"]

#: the vLLM release this plugin is tested with (``make test-vllm``)
VLLM_VERSION = "0.32.0"

#: stock vLLM architecture -> the plugin's architecture
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "VtcompressLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "VtcompressQwen2VLForConditionalGeneration",
}
_MODULES = {
    "VtcompressLlavaForConditionalGeneration": "llava",
    "VtcompressQwen2VLForConditionalGeneration": "qwen2_vl",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the plugin's architectures with vLLM (lazily, by
    ``module:Class`` strings, so loading the plugin imports no model code)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, module in _MODULES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{__name__}.{module}:{arch}")


def hf_overrides(architecture: str, method: str | None = None, budget: int | float = 1.0) -> dict:
    """``hf_overrides`` selecting the plugin's class for a stock ``architecture`` (e.g.
    ``"LlavaForConditionalGeneration"``, the checkpoint's ``config.architectures[0]``) with a server default."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; the vtcompress vLLM plugin serves: "
                         f"{', '.join(ARCHITECTURES)}")
    out: dict = {"architectures": [ARCHITECTURES[architecture]]}
    if method is not None:
        from .spec import resolve

        resolve({"method": method, "budget": budget}, None)  # a bad default fails here, not at the first request
        out["vtcompress"] = {"method": method, "budget": budget}
    return out
