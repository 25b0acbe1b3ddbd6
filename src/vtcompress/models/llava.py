"""LLaVA-1.5 adapter (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, one 24x24 grid per image.

``get_image_features`` returns one ``[N, D]`` tensor per image (``N = H*W`` patches, plus the [CLS] feature
first when ``vision_feature_select_strategy="full"``); the placeholder run of an image holds exactly these.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .apply import Adapter, ImageLayout, register_adapter

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    position_scheme = "1d"

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

    def supports_encoder_stage(self) -> bool:
        return True


register_adapter(LlavaAdapter())
