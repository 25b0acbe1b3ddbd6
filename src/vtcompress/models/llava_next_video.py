"""LLaVA-NeXT-Video description (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT's anyres images, plus videos.

Images are exactly LLaVA-NeXT's (see :mod:`vtcompress.models.llava_next`): the same ``get_image_features`` (CLIP
crops, MLP projector, the model's own ``pack_image_features`` with ``image_newline``), so the layout map, the
signals and the vision-space point of action (VisionZip / PruMerge before ``multi_modal_projector``) are LLaVA-NeXT's.

Videos (``pixel_values_videos [V, F, 3, H, W]``, placeholder ``video_token_id``): the model's own
``get_video_features`` encodes each frame as one crop, pools it (``vision_resampler``, stride
``spatial_pool_stride``) and projects it; the projector stage compresses those pooled frames, each a view of its
square pooled grid (no newline). Methods act on the projected frame tokens (the pooling changes the token grid).
A pooled token's vision signal is the sum (attention) / mean (keys) of its ``stride x stride`` window of patches,
whatever the pooling mode (average, max, conv), as the other families' merged tokens get theirs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .description import Modality, TokenLayout
from .layout import ImageLayout
from .llava_next import LlavaNextAdapter
from .registry import register_adapter

__all__ = ["LlavaNextVideoDescription"]


class LlavaNextVideoDescription(LlavaNextAdapter):
    family = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    model_types = ("llava_next_video",)
    modalities = (
        *LlavaNextAdapter.modalities,
        Modality(name="video", token_id_keys=("video_token_id", "video_token_index"),
                 input_keys=("pixel_values_videos",), encode_fn="get_video_features", layout=TokenLayout.FRAMES),
    )
    video_projector_stage = True
    video_signals = True

    def signal_to_features(self, model, inputs, records, reduce, feats, modality: str = "image"):
        if modality != "video":
            return super().signal_to_features(model, inputs, records, reduce, feats)
        sig = torch.cat(records, dim=0)[:, self.num_prefix_tokens(model):]  # [V * F, H * W, C]
        n, hw, c = sig.shape
        side = math.isqrt(hw)
        stride = int(model.config.spatial_pool_stride)
        pooled = torch.nn.functional.avg_pool2d(sig.transpose(1, 2).reshape(n, c, side, side), stride, stride)
        if reduce == "sum":
            pooled = pooled * stride * stride
        frames = int(inputs["pixel_values_videos"].shape[1])
        return list(pooled.flatten(2).transpose(1, 2).reshape(-1, frames * pooled[0, 0].numel(), c))

    def video_layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        """``F`` views, one per frame, of its square pooled grid."""
        frames = int(inputs["pixel_values_videos"].shape[1])
        out = []
        for f in feats:
            side = math.isqrt(int(f.shape[0]) // frames)
            if side * side * frames != f.shape[0]:
                raise ValueError(f"a clip of {frames} frames has {f.shape[0]} features, not {frames} square pooled "
                                 "frame grids")
            out.append(ImageLayout.tiles((side, side), frames, f.device))
        return out

    def video_features(self, model, inputs, out) -> list[Tensor]:
        return [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]  # one [F * h * w, D] per clip

    def wrap_video(self, out, feats: list[Tensor], extra=None):
        # the stock forward flattens each entry's first two dims: one [1, K, D] per clip
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=[f[None] for f in feats])


register_adapter(LlavaNextVideoDescription())
