"""LLaVA-NeXT description (``LlavaNextForConditionalGeneration``): anyres crops, packed features.

``get_image_features`` returns per image one PACKED ``[L, D]`` run: the base crop's ``H*W`` patches, then the
unpadded high-resolution grid row by row, each row followed by ``image_newline`` (one crop only: its patches).
The layout is learned by running the model's own ``pack_image_features`` on index tensors (crop id as the
feature, ``-1`` as the newline), and signals are mapped the same way (the packer runs on them), so this stays
true to whatever the stock packer does (unpadding, OneVision's bilinear down-sizing). Views: 0 = base crop
``(H, W)``, 1 = the high-resolution grid ``(rows, cols)``; grid methods apply per view. An image much taller
than wide can leave the unpadded grid without columns (the stock packer then emits its rows' newlines alone):
those newlines are always kept, so budget 1.0 equals the stock model for every image it accepts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .description import IMAGE, ModelDescription, PositionScheme, TokenLayout
from .layout import ImageLayout
from .registry import register_adapter

__all__ = ["AnyresAdapter", "LlavaNextAdapter"]


class AnyresAdapter(ModelDescription):
    """Shared by LLaVA-NeXT and LLaVA-OneVision: only the packer's arguments and the crop counts differ.

    An :attr:`TokenLayout.ANYRES` description defines :meth:`crops` and :meth:`pack` (the projector pipeline's
    vision space packs the projector input with them)."""

    position_scheme = PositionScheme.ROPE_1D
    modalities = (dataclasses.replace(IMAGE, layout=TokenLayout.ANYRES),)
    image_newline_path = "image_newline"
    projector_one_to_one = True

    def crops(self, model, inputs) -> list[int]:
        """Crops per image (base crop + high-resolution tiles) that the tower sees."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for s in inputs["image_sizes"]]

    def pack(self, model, inputs, per_image: list[Tensor], newline: Tensor) -> list[Tensor]:
        """The model's own packer on per-crop ``[crops_i, H*W, C]`` (newline ``[C]``): ``[L_i, C]`` per image."""
        base = self.base(model)
        feats, _ = base.pack_image_features(
            per_image, inputs["image_sizes"], model.config.vision_feature_select_strategy, image_newline=newline)
        return list(feats)

    def layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        h, w = self.grid(model)
        crops = self.crops(model, inputs)
        dev = feats[0].device
        index = [torch.arange(c, device=dev, dtype=torch.float32)[:, None, None].expand(c, h * w, 1) for c in crops]
        packed = self.pack(model, inputs, index, torch.full((1,), -1.0, device=dev))
        out = []
        for p, f, c in zip(packed, feats, crops, strict=True):
            if p.shape[0] != f.shape[0]:
                raise ValueError(
                    f"{self.family}: an image has {f.shape[0]} packed features but {p.shape[0]} were expected from "
                    f"{h}x{w} patches per crop; vision_feature_select_strategy='full' with a [CLS] encoder is not "
                    "supported (use 'default')")
            v = p[:, 0]
            sep = v < -0.5
            # interpolation (OneVision) blends crop ids >= 1 but never reaches the base crop's 0
            view = (v > 0.5).long()
            # the packer puts newlines after the high-resolution rows only (after the base crop for a single
            # crop); a tall image's grid may have no columns left, so a newline need not follow a patch of its row
            out.append(ImageLayout.from_views(view, sep, (h, w), sep_view=1 if c > 1 else 0))
        return out

    def signal_to_features(self, model, inputs, records, reduce, feats):
        sig = torch.cat(records, dim=0)[:, self.num_prefix_tokens(model):]  # [crops, H*W, C]
        per_image = list(torch.split(sig, self.crops(model, inputs), dim=0))
        return self.pack(model, inputs, per_image, sig.new_zeros(sig.shape[-1]))


class LlavaNextAdapter(AnyresAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)


register_adapter(LlavaNextAdapter())
