"""LLaVA-NeXT-Video description (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT's anyres images, plus videos.

Images are exactly LLaVA-NeXT's (see :mod:`vtcompress.models.llava_next`): the same ``get_image_features`` (CLIP
crops, MLP projector, the model's own ``pack_image_features`` with ``image_newline``), so the layout map, the
signals and the vision-space point of action (VisionZip / PruMerge before ``multi_modal_projector``) are LLaVA-NeXT's.

Videos (``pixel_values_videos``, placeholder ``video_token_id``) are not compressed by the encoder- / projector-stage
methods: they pass through untouched. The stock forward takes either raw pixels or encoder outputs, so a call that
compresses its images encodes the videos with the model's own ``get_video_features`` (the same call, with the
config's defaults, that the stock forward makes: ``vision_resampler`` pooling, then the projector) and hands them on
as ``mm_encoder_outputs["video"]``; the LLM receives every video token the stock model gives it
(``tests/test_family_llava_next_video.py`` checks this against the stock model).
"""

from __future__ import annotations

from .description import Modality, TokenLayout
from .llava_next import LlavaNextAdapter
from .registry import register_adapter

__all__ = ["LlavaNextVideoDescription"]


class LlavaNextVideoDescription(LlavaNextAdapter):
    family = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    model_types = ("llava_next_video",)
    modalities = (
        *LlavaNextAdapter.modalities,
        # described, not compressed: passed through (encoded with the model's own get_video_features)
        Modality(name="video", token_id_keys=("video_token_id", "video_token_index"),
                 input_keys=("pixel_values_videos",), encode_fn="get_video_features", layout=TokenLayout.FRAMES),
    )


register_adapter(LlavaNextVideoDescription())
