"""InternVL description (``InternVLForConditionalGeneration``): InternViT tiles, pixel shuffle, MLP projector.

``get_image_features`` returns a Tensor ``[tiles, n, D]`` (already pixel-shuffled: each token covers a 2x2
group of patches) for all images together; an image is one contiguous placeholder run of ``tiles_i * n``
tokens (wrapped in ``<img>``/``</img>``), so the tiles per image are read from the runs in ``input_ids``.
Each tile is a view with grid ``(s/2, s/2)``; the compressed features go back as a Tensor ``[K, 1, D]`` (one
row per kept token, so that ``generate``'s beam / ``num_return_sequences`` expansion can split them per sample).
Signals: [CLS] attention (InternViT has a [CLS]) summed over each shuffle group, keys averaged over it; the
groups are learned by running the model's own ``pixel_shuffle``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .description import IMAGE, ModelDescription, PositionScheme, TokenLayout
from .layout import ImageLayout
from .registry import register_adapter
from .sequence import placeholder_runs

__all__ = ["InternVLAdapter"]


class InternVLAdapter(ModelDescription):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)
    position_scheme = PositionScheme.ROPE_1D
    vision_layers_path = "encoder.layer"
    vision_attention_path = "attention"
    projector_path = "multi_modal_projector"
    modalities = (dataclasses.replace(IMAGE, token_id_keys=("image_token_id",), input_keys=("pixel_values",),
                                      layout=TokenLayout.TILES),)

    def shuffled_grid(self, model) -> tuple[int, int]:
        h, w = self.grid(model)
        r = float(model.config.downsample_ratio)
        return (int(h * r), int(w * r))

    def tiles(self, model, inputs) -> list[int]:
        starts, ends = placeholder_runs(inputs["input_ids"], self.image_token_id(model))  # row-major: scatter order
        per = self.shuffled_grid(model)
        n = per[0] * per[1]
        lengths = (ends[:, 1] - starts[:, 1]).tolist()
        if any(length % n for length in lengths):
            raise ValueError(f"InternVL placeholder runs of {lengths} tokens are not multiples of {n} tokens per tile")
        return [length // n for length in lengths]

    def features(self, model, inputs, out) -> list[Tensor]:
        feats = out.pooler_output
        tiles = self.tiles(model, inputs)
        if sum(tiles) != feats.shape[0]:
            raise ValueError(f"input_ids place {sum(tiles)} tiles but pixel_values hold {feats.shape[0]}")
        return [f.reshape(-1, f.shape[-1]) for f in torch.split(feats, tiles, dim=0)]

    def wrap(self, out, feats):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # one row per token, [K, 1, D]: the forward only needs K*D values in placeholder order, and generate's
        # expansion for beams / num_return_sequences splits pooler_output by rows at the samples' placeholder
        # counts; a single [1, K, D] row cannot be split, so a sample's extra beams received other images
        return BaseModelOutputWithPooling(pooler_output=torch.cat(feats, dim=0)[:, None])

    def layouts(self, model, inputs, feats):
        grid = self.shuffled_grid(model)
        n = grid[0] * grid[1]
        return [ImageLayout.tiles(grid, int(f.shape[0]) // n, f.device) for f in feats]

    def signal_to_features(self, model, inputs, records, reduce, feats):
        sig = torch.cat(records, dim=0)[:, self.num_prefix_tokens(model):]  # [tiles, H*W, C]
        t, _, c = sig.shape
        h, w = self.grid(model)
        shuffled = self.base(model).pixel_shuffle(sig.reshape(t, h, w, c), scale_factor=model.config.downsample_ratio)
        groups = shuffled.reshape(t, -1, shuffled.shape[-1] // c, c)  # [tiles, n, patches per token, C]
        pooled = groups.sum(2) if reduce == "sum" else groups.mean(2)
        return [p.reshape(-1, c) for p in torch.split(pooled, self.tiles(model, inputs), dim=0)]


register_adapter(InternVLAdapter())
