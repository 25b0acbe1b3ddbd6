"""LLaVA-1.5 description (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, one 24x24 grid per image.

``get_image_features`` returns one ``[N, D]`` tensor per image (``N = H*W`` patches, plus the [CLS] feature
first when ``vision_feature_select_strategy="full"``); the placeholder run of an image holds exactly these.
The projector's input maps 1:1 onto them, so ``acts_on="vision"`` methods act before it, and encoder-stage
merging flows through the stock feature path. The embedded testbed is this family.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .description import IMAGE, ModelDescription, PositionScheme
from .layout import ImageLayout
from .registry import register_adapter

__all__ = ["LlavaAdapter"]


class LlavaAdapter(ModelDescription):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    position_scheme = PositionScheme.ROPE_1D
    modalities = (IMAGE,)  # layout GRID, with [CLS] first under strategy "full"
    projector_one_to_one = True
    encoder_stage = True

    def layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        h, w = self.grid(model)
        out = []
        for f in feats:
            n = int(f.shape[0])
            prefix = n - h * w
            if prefix not in (0, 1):
                raise ValueError(f"LLaVA image features have {n} tokens; expected {h * w} (grid {h}x{w}) or "
                                 f"{h * w + 1} (with [CLS])")
            out.append(ImageLayout.single((h, w), n, f.device, prefix=prefix))
        return out

    def signal_to_features(self, model, inputs, records, reduce, feats):
        sig = torch.cat(records, dim=0)[:, self.num_prefix_tokens(model):]  # [images, H*W, C]
        # a kept [CLS] feature (strategy "full") carries no patch signal
        return [torch.cat([s.new_zeros(int(f.shape[0]) - s.shape[0], s.shape[1]), s])
                for s, f in zip(sig, feats, strict=True)]

    def prefill_arch(self, config):
        """A ``LlavaConfig`` (CLIP or SigLIP tower, Llama / Mistral / Qwen2-style LLM) as a
        :class:`~vtcompress.bench.flops.VLMArch`."""
        return llava_style_arch(config)


def llava_style_arch(config):
    """The :class:`~vtcompress.bench.flops.VLMArch` of a LLaVA-style config (``vision_config`` of a CLIP or SigLIP
    tower, ``text_config``, ``vision_feature_layer``, ``vision_feature_select_strategy``): one tower pass per image
    (or per video frame), an MLP projector, the LLM. LLaVA-1.5's images and LLaVA-OneVision's video frames (single
    crops of the tower) are counted by it."""
    from ..bench.flops import TextArch, VisionArch, VLMArch

    vc, tc = config.vision_config, config.text_config
    vtype = getattr(vc, "model_type", "")
    if vtype not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"vision tower {vtype!r} is not modelled; allowed: clip_vision_model, siglip_vision_model")
    vision = VisionArch.from_config(vc, prefix=1 if vtype == "clip_vision_model" else 0,
                                    pooling_head=vtype == "siglip_vision_model" and getattr(vc, "vision_use_head",
                                                                                            True))
    layer = config.vision_feature_layer
    n_feature_layers = 1 if isinstance(layer, int) else len(layer)
    feature_layer = layer if isinstance(layer, int) else min(layer, key=lambda i: i % (vision.layers + 1))
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r}; allowed: default, full")
    text = TextArch.from_config(tc)
    projector = ((vision.hidden * n_feature_layers, text.hidden), (text.hidden, text.hidden))
    return VLMArch(vision=vision, projector=projector, text=text, feature_layer=int(feature_layer),
                   keep_prefix=strategy == "full")


register_adapter(LlavaAdapter())
