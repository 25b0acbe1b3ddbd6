"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration``): SigLIP (no [CLS]), anyres_max_9.

Same packed layout as LLaVA-NeXT (see :mod:`vtcompress.models.llava_next`) with two differences the stock
packer handles and the layout map follows: the high-resolution grid is bilinearly down-sized when it exceeds
9 crops' worth of patches, and in multi-image samples (``batch_num_images > 1``) each image is one base crop
followed by a single newline. Signals are the mean attention each patch receives (SigLIP has no [CLS]).
"""

from __future__ import annotations

from .apply import register_adapter
from .llava_next import AnyresAdapter

__all__ = ["OnevisionAdapter"]


class OnevisionAdapter(AnyresAdapter):
    family = "onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

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
