"""LLaVA-OneVision description (``LlavaOnevisionForConditionalGeneration``): SigLIP (no [CLS]), anyres_max_9.

Same packed layout as LLaVA-NeXT (see :mod:`vtcompress.models.llava_next`) with two differences the stock
packer handles and the layout map follows: the high-resolution grid is bilinearly down-sized when it exceeds
9 crops' worth of patches, and in multi-image samples (``batch_num_images > 1``) each image is one base crop
followed by a single newline. Signals are the mean attention each patch receives (SigLIP has no [CLS]).
Videos (``pixel_values_videos [V, T, C, H, W]``): the stock ``get_video_features`` pools every frame's projected
patch grid 2x2 (bilinear, as the model does it) and appends one ``image_newline`` per video; the projector-stage
methods then act on each pooled frame (one view per frame), and the trailing newline always stays. The vision
signals of a frame go through the model's own ``apply_pooling`` too (each pooled token's signal is the bilinear
mix of its patches' signals, with the weights of its features; summed signals scaled by the area ratio).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .description import Modality, TokenLayout
from .layout import ImageLayout
from .llava_next import AnyresAdapter
from .registry import register_adapter

__all__ = ["OnevisionAdapter"]


class OnevisionAdapter(AnyresAdapter):
    family = "onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    modalities = (
        Modality(name="image", token_id_keys=("image_token_id", "image_token_index"),
                 input_keys=("pixel_values", "image_sizes", "batch_num_images"), encode_fn="get_image_features",
                 layout=TokenLayout.ANYRES),
        Modality(name="video", token_id_keys=("video_token_id", "video_token_index"),
                 input_keys=("pixel_values_videos",), encode_fn="get_video_features", layout=TokenLayout.FRAMES),
    )

    video_projector_stage = True
    video_signals = True

    def signal_to_features(self, model, inputs, records, reduce, feats, modality: str = "image"):
        if modality != "video":
            return super().signal_to_features(model, inputs, records, reduce, feats)
        sig = torch.cat(records, dim=0)[:, self.num_prefix_tokens(model):]  # [V * T, H * W, C], frame after frame
        pooled = self.base(model).apply_pooling(sig)  # [V * T, h * w, C]: the map the frame's features get
        if reduce == "sum":
            pooled = pooled * (sig.shape[1] / pooled.shape[1])
        frames = int(inputs["pixel_values_videos"].shape[1])
        per_video = pooled.reshape(-1, frames * pooled.shape[1], pooled.shape[-1])
        return [torch.cat([p, p.new_zeros(1, p.shape[-1])]) for p in per_video]  # the newline: no signal

    def video_layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        """``T`` pooled frames of ``(ceil(h / 2), ceil(w / 2))`` tokens (``apply_pooling``), then the video's
        newline (not a patch: always kept)."""
        vcfg = model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        grid = (math.ceil(side / 2), math.ceil(side / 2))
        frames = int(inputs["pixel_values_videos"].shape[1])
        out = []
        for f in feats:
            if frames * grid[0] * grid[1] + 1 != f.shape[0]:
                raise ValueError(f"a video of {frames} frames of pooled grid {grid} plus its newline has "
                                 f"{frames * grid[0] * grid[1] + 1} features; got {f.shape[0]}")
            lay = ImageLayout.tiles(grid, frames, f.device)
            one = torch.ones(1, dtype=torch.long, device=f.device)
            out.append(ImageLayout(view=torch.cat([lay.view, one * (frames - 1)]), patch=torch.cat([lay.patch, -one]),
                                   sep=torch.cat([lay.sep, torch.zeros(1, dtype=torch.bool, device=f.device)]),
                                   group=torch.cat([lay.group, -one]), grids=lay.grids))
        return out

    def wrap_video(self, out, feats: list[Tensor], extra=None):
        # the stock forward flattens pooler_output [V, L, D] over its first two dims: one row holds every video
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=torch.cat(list(feats), dim=0)[None])

    def crops(self, model, inputs) -> list[int]:
        full = super().crops(model, inputs)
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            return full
        patching = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [c if p else 1 for c, p in zip(full, patching, strict=True)]

    def pack(self, model, inputs, per_image, newline):
        base = self.base(model)
        feats, _ = base.pack_image_features(per_image, inputs["image_sizes"], image_newline=newline,
                                            vision_aspect_ratio=model.config.vision_aspect_ratio)
        return list(feats)


register_adapter(OnevisionAdapter())
