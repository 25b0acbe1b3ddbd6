"""LLaVA-OneVision description (``LlavaOnevisionForConditionalGeneration``): SigLIP (no [CLS]), anyres_max_9.

Same packed layout as LLaVA-NeXT (see :mod:`vtcompress.models.llava_next`) with two differences the stock
packer handles and the layout map follows: the high-resolution grid is bilinearly down-sized when it exceeds
9 crops' worth of patches, and in multi-image samples (``batch_num_images > 1``) each image is one base crop
followed by a single newline. Signals are the mean attention each patch receives (SigLIP has no [CLS]).
Videos (``pixel_values_videos``, frames pooled by the model) are described; they pass through uncompressed.
"""

from __future__ import annotations

from .description import Modality, TokenLayout
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
