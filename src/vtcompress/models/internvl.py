"""InternVL description (``InternVLForConditionalGeneration``): InternViT tiles, pixel shuffle, MLP projector.

``get_image_features`` returns a Tensor ``[tiles, n, D]`` (already pixel-shuffled: each token covers a 2x2
group of patches) for all images together; an image is one contiguous placeholder run of ``tiles_i * n``
tokens (wrapped in ``<img>``/``</img>``), so the tiles per image are read from the runs in ``input_ids``.
Each tile is a view with grid ``(s/2, s/2)``; the compressed features go back as a Tensor ``[K, 1, D]`` (one
row per kept token, so that ``generate``'s beam / ``num_return_sequences`` expansion can split them per sample).
Signals: [CLS] attention (InternViT has a [CLS]) summed over each shuffle group, keys averaged over it; the
groups are learned by running the model's own ``pixel_shuffle``.

Videos: ``InternVLProcessor`` gives a video's frames to the model as images, one tile each, each after a frame
prompt (``replace_video_token``: ``Frame1: <img>...</img>\nFrame2: <img>...</img>...``), merged into
``pixel_values`` with the images. Spatial methods compress every frame as the image it is; under a temporal
method :meth:`InternVLAdapter.image_clips` reads the frame prompts back (with the tokenizer given as
``apply(..., processor=)``) and the frames of each video go through the methods as one clip.
"""

from __future__ import annotations

import dataclasses
import re

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

    frames_as_images = True

    def image_clips(self, model, inputs, tokenizer) -> list[list[int]]:
        """The videos among this call's images: a run of one-tile images, the first after the prompt ``Frame1:``
        and each next one after exactly ``</img>`` + ``Frame<k>:`` (k = 2, 3, ...) + ``<img>``, as the processor's
        ``replace_video_token`` writes them (whitespace free). Images with other text around them are images."""
        ids = inputs["input_ids"]
        starts, ends = placeholder_runs(ids, self.image_token_id(model))
        tiles = self.tiles(model, inputs)
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor or its tokenizer
        if not callable(getattr(tok, "decode", None)):
            raise ValueError(f"processor={type(tokenizer).__name__} has no tokenizer with decode(); pass the "
                             "InternVL processor (or its tokenizer) to read the frame prompts of its videos")
        open_, close = (re.escape(str(getattr(tok, a, d))) for a, d in (("start_image_token", "<img>"),
                                                                        ("end_image_token", "</img>")))
        first = re.compile(rf"Frame1:\s*{open_}$")
        between = re.compile(rf"{close}\s*Frame(\d+):\s*{open_}")

        def text(row, lo, hi):
            return tok.decode(ids[row, lo:hi].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)

        clips: list[list[int]] = []
        cur: list[int] | None = None
        for r in range(starts.shape[0]):
            row, s = int(starts[r, 0]), int(starts[r, 1])
            same_row = r > 0 and int(starts[r - 1, 0]) == row
            m = between.fullmatch(text(row, int(ends[r - 1, 1]), s)) if same_row else None
            if cur is not None and m is not None and int(m.group(1)) == len(cur) + 1 and tiles[r] == 1:
                cur.append(r)
                continue
            if cur is not None:
                clips.append(cur)
            lo = int(ends[r - 1, 1]) if same_row else 0
            cur = [r] if tiles[r] == 1 and first.search(text(row, max(lo, s - 32), s)) else None
        if cur is not None:
            clips.append(cur)
        return clips

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
