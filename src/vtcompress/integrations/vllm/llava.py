"""LLaVA-1.5 in vLLM with per-request projector-stage compression: ``VtcompressLlavaForConditionalGeneration``.

A subclass of vLLM's own ``LlavaForConditionalGeneration`` (same weights, same modules); only its image path
changes: the vision tower runs as stock (a hook on the signal layer's ``qkv_proj`` records [CLS] attention / keys
when the method needs them), the method compresses each image's features through the same mechanics as
``vtcompress.apply`` (:func:`vtcompress.models.apply.compress_features`: methods acting on the vision features
before the projector -- VisionZip -- act there and the model's projector runs on the survivors; the others on
the projected features), and the placeholder run of the image holds the kept count. Positions are vLLM's
contiguous ones, i.e. the ``"compact"`` scheme the projector-stage references use (the Hugging Face path's default).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import Tensor
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...models.apply import ImageLayout, compress_features, feature_signal_layer
from .host import CompressingModelMixin, CompressingProcessorMixin, check_count, spec_rows
from .signals import capture_clip, check_parallel
from .spec import SPEC_FIELD, RequestSpec, kept_count

__all__ = ["VtcompressLlavaForConditionalGeneration", "VtcompressLlavaProcessor", "hub_layout"]

_TRANSFORMERS5_TOWER = re.compile(r"^((?:model\.)?)vision_tower\.(?!vision_model\.)")


def hub_layout(path) -> None:
    """Rewrite ``path/model.safetensors`` of a LLaVA saved by transformers 5 (``[model.]vision_tower.<encoder|...>``)
    in the Hub's llava-hf layout (``vision_tower.vision_model.*``), the one STOCK vLLM 0.32 loads (this plugin's
    class loads both)."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    f = Path(path) / "model.safetensors"
    weights = load_file(f)
    save_file({_TRANSFORMERS5_TOWER.sub(r"\g<1>vision_tower.vision_model.", k): v for k, v in weights.items()}, f,
              metadata={"format": "pt"})


def _grid(vision_config) -> tuple[int, int]:
    size, patch = vision_config.image_size, vision_config.patch_size
    size = size if isinstance(size, int) else size[0]
    patch = patch if isinstance(patch, int) else patch[0]
    return (size // patch, size // patch)


def _prefix(config) -> int:
    """Features before the patches in an image's run: the [CLS] feature with strategy ``"full"``."""
    return 1 if config.vision_feature_select_strategy == "full" else 0


class VtcompressLlavaProcessor(CompressingProcessorMixin, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor whose image placeholder runs hold the tokens each request's method keeps."""

    def _vtc_num_images(self, out) -> int:
        pv = out.get("pixel_values")
        return 0 if pv is None else len(pv)

    def _vtc_image_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_index)

    def placeholder_count(self, full: int, spec: RequestSpec, item_idx: int, items) -> int:
        cfg = self.info.get_hf_config()
        grid = _grid(cfg.vision_config)
        prefix = _prefix(cfg)
        if full != prefix + grid[0] * grid[1]:
            raise ValueError(f"an image of {full} placeholder tokens; the plugin expects {prefix + grid[0] * grid[1]} "
                             f"(grid {grid[0]}x{grid[1]}{' + [CLS]' if prefix else ''})")
        return prefix + kept_count(spec, grid)


@MULTIMODAL_REGISTRY.register_processor(
    VtcompressLlavaProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder)
class VtcompressLlavaForConditionalGeneration(CompressingModelMixin, LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration`` with vtcompress's projector-stage methods on its images."""

    # a LLaVA saved by transformers 5 holds its CLIP tower as ``[model.]vision_tower.<embeddings|encoder|...>`` while
    # vLLM 0.32 (and the Hub's llava-hf checkpoints) expect ``vision_tower.vision_model.*``: both layouts load
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_regex={
        _TRANSFORMERS5_TOWER: r"\g<1>vision_tower.vision_model."}) \
        | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        check_parallel(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def embed_multimodal(self, **kwargs: object):
        rows = kwargs.pop(SPEC_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)  # caller-given embeddings: served as they are
        pv = image_input["pixel_values"]
        specs = spec_rows(rows, len(pv))
        return self._vtc_embed(pv, specs)

    def compress_images(self, pixel_values, index: list[int], spec: RequestSpec) -> list[Tensor]:
        """Embeddings ``[M_i, D]`` of the images ``pixel_values[index]`` under ``spec``."""
        pv = pixel_values[index] if isinstance(pixel_values, Tensor) else torch.stack([pixel_values[i]
                                                                                      for i in index])
        cfg = self.config
        if spec.method is None:
            return list(self.multi_modal_projector(self._image_pixels_to_features(self.vision_tower, pv)))
        method = spec.build()
        needs = set(method.needs)
        layers = self.vision_tower.vision_model.encoder.layers
        capture = contextlib.nullcontext(None)
        if needs & {"cls_attn", "keys"}:
            n_layers = int(cfg.vision_config.num_hidden_layers)
            layer = method.signal_layer if getattr(method, "signal_layer", None) is not None else \
                feature_signal_layer(cfg.vision_feature_layer, n_layers)
            layer = int(layer) % n_layers
            if layer >= len(layers):
                raise ValueError(f"{spec.describe()} reads vision layer {layer}, but vLLM builds the tower only up to "
                                 f"the feature layer ({len(layers)} layers); set signal_layer below {len(layers)}")
            capture = capture_clip(layers[layer].self_attn, attn="cls_attn" in needs, keys="keys" in needs,
                                   heads=getattr(method, "signal_heads", "mean"))
        with torch.no_grad(), capture as rec:
            vision = self._image_pixels_to_features(self.vision_tower, pv)  # [B, N, C]
        prefix = _prefix(cfg)
        grid = _grid(cfg.vision_config)
        n = int(vision.shape[1])
        attn = keys = None
        if rec is not None:
            def align(sig: Tensor) -> list[Tensor]:  # drop the tower's [CLS] row; a kept [CLS] feature gets zeros
                sig = sig[:, 1:]
                return [torch.cat([s.new_zeros(prefix, s.shape[-1]), s]) for s in sig]
            attn = align(rec.attn[0][..., None]) if rec.attn else None
            keys = align(rec.keys[0]) if rec.keys else None
        on_vision = getattr(method, "acts_on", "projected") == "vision"
        work = list(vision) if on_vision else list(self.multi_modal_projector(vision))
        layouts = [ImageLayout.single(grid, n, vision.device, prefix=prefix) for _ in index]
        new, _kept, _tokens = compress_features(self, layouts, work, [method], attn=attn, keys=keys)
        expected = prefix + kept_count(spec, grid)
        for x in new:
            check_count(int(x.shape[0]), expected, spec)
        if on_vision:
            new = [self.multi_modal_projector(x[None])[0] for x in new]
        return new
