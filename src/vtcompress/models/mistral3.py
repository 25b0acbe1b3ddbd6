"""Mistral 3 adapter (``Mistral3ForConditionalGeneration``): Pixtral tower at native resolution, 2-D RoPE,
patch merger, ``[IMG_BREAK]`` / ``[IMG_END]`` tokens.

Each image keeps its own size (``image_sizes [N, 2]``, pixels; ``pixel_values`` zero-padded to the largest):
the Pixtral tower embeds ``h x w = size / patch_size`` patches per image, runs all images as ONE sequence with a
block-diagonal mask and axial 2-D rotary positions (row, column) inside each image, and the projector's patch
merger (``Mistral3PatchMerger``) folds ``spatial_merge_size x spatial_merge_size`` patches into one token
(``F.unfold``, raster order over the merged grid ``(h/m, w/m)``). ``get_image_features`` returns one
``[h/m * w/m, D]`` tensor per image. In the prompt an image is its merged grid row by row::

    [IMG] * (w/m) [IMG_BREAK]  ...  [IMG] * (w/m) [IMG_END]

Only ``[IMG]`` placeholders carry features; ``[IMG_BREAK]`` (after every row but the last) and ``[IMG_END]``
are tokens of the vocabulary. Pruning keeps them all: a break is never pruned, as LLaVA-NeXT's
``image_newline`` at the decoder stage, so the LLM sees the image's row structure unchanged and every kept
token stays in its own row, before that row's break; a row whose tokens are all pruned keeps its break too
(it is a text token the stock model always has; dropping it would edit the prompt, not the image features).
Each image is one view with grid ``(h/m, w/m)`` (different per image, so budgets apply per image).

Which rows form one image: the config holds no id for ``[IMG_BREAK]`` / ``[IMG_END]``; every sample's last row
is followed by ``[IMG_END]``, so that token is read from the prompt, and the rows it follows close their images
(validated against ``image_sizes``).

Signals: the tower has no [CLS]; the attention signal is the mean attention each patch receives from the
queries of its own image (the block-diagonal mask keeps images apart; the mean is rescaled from the whole
sequence's queries to the image's own), summed over the ``m x m`` patches of a merged token; keys (after the
2-D rotary embedding, as the attention function receives them) are averaged over them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .apply import Adapter, ImageLayout, register_adapter

__all__ = ["Mistral3Adapter"]


class Mistral3Adapter(Adapter):
    family = "mistral3"
    model_classes = ("Mistral3ForConditionalGeneration",)
    position_scheme = "1d"
    encoder_only_keys = ("image_sizes",)

    def vision_layers(self, model):
        return list(self.vision_tower(model).transformer.layers)

    def attention_module(self, layer):
        return layer.attention

    def num_prefix_tokens(self, model) -> int:
        return 0

    def merge(self, model) -> int:
        return int(model.config.spatial_merge_size)

    def patch_grids(self, model, inputs) -> list[tuple[int, int]]:
        """``(h, w)`` patches of each image, as the tower crops them from ``image_sizes``."""
        p = int(self.vision_config(model).patch_size)
        return [(int(h) // p, int(w) // p) for h, w in inputs["image_sizes"]]

    def merged_grids(self, model, inputs) -> list[tuple[int, int]]:
        m = self.merge(model)
        return [(h // m, w // m) for h, w in self.patch_grids(model, inputs)]

    def end_token(self, model, ids: Tensor) -> int:
        """The ``[IMG_END]`` id, read from the prompt: the token after each sample's last image-token run."""
        is_img = (ids == self.image_token_id(model)).long()
        edge = torch.diff(torch.nn.functional.pad(is_img, (1, 1)), dim=1)
        ends = (edge == -1).nonzero()  # [R, 2] first column after each run
        if ends.shape[0] == 0:
            raise ValueError("mistral3: input_ids hold no image placeholder")
        rows = ends[:, 0]
        last = torch.ones_like(rows, dtype=torch.bool)
        last[:-1] = rows[1:] != rows[:-1]
        after = torch.where(ends[:, 1] < ids.shape[1], ids[rows, ends[:, 1].clamp(max=ids.shape[1] - 1)],
                            torch.full_like(rows, -1))[last]
        if after.unique().numel() != 1 or int(after[0]) < 0:
            raise ValueError(f"mistral3: the token after each sample's last image-token run should be [IMG_END]; found "
                             f"{after.tolist()}; pass the processor's input_ids unchanged")
        return int(after[0])

    def layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        grids = self.merged_grids(model, inputs)
        self._check_rows(model, inputs, grids)
        out = []
        for f, grid in zip(feats, grids, strict=True):
            if grid[0] * grid[1] != f.shape[0]:
                raise ValueError(f"mistral3: an image of image_sizes grid {grid} has {f.shape[0]} features")
            out.append(ImageLayout.single(grid, int(f.shape[0]), f.device))
        return out

    def _check_rows(self, model, inputs, grids) -> None:
        """Each image is ``rows`` runs of ``cols`` placeholders, the last one followed by ``[IMG_END]``."""
        ids = inputs["input_ids"]
        end = self.end_token(model, ids)
        is_img = (ids == self.image_token_id(model)).long()
        edge = torch.diff(torch.nn.functional.pad(is_img, (1, 1)), dim=1)
        starts, ends = (edge == 1).nonzero(), (edge == -1).nonzero()
        lengths = (ends[:, 1] - starts[:, 1]).tolist()
        after = ids[ends[:, 0], ends[:, 1].clamp(max=ids.shape[1] - 1)]
        closes = (after == end).nonzero().squeeze(1).tolist()
        expected, got, k = [], [], 0
        for c, (r, w) in zip(closes, grids, strict=False):
            got.append(lengths[k : c + 1])
            expected.append([w] * r)
            k = c + 1
        if len(closes) != len(grids) or got != expected:
            raise ValueError(f"mistral3: image_sizes give merged grids {grids} (rows x [IMG] per row), but input_ids "
                             f"hold rows of {got} [IMG] tokens per image; pass the processor's input_ids unchanged")

    def signal_to_features(self, model, inputs, records, reduce, feats):
        sig = torch.cat([r[0] for r in records], dim=0)  # [all patches, C]: the images are one sequence
        grids = self.patch_grids(model, inputs)
        m = self.merge(model)
        sizes = [h * w for h, w in grids]
        total = sum(sizes)
        out = []
        for s, (h, w), n in zip(torch.split(sig, sizes, dim=0), grids, sizes, strict=True):
            if reduce == "sum":  # the mean over the image's own queries, not the whole sequence's
                s = s * (total / n)
            c = s.shape[-1]
            g = s.reshape(h, w, c)[: h // m * m, : w // m * m]  # the merger's unfold drops a remainder
            g = g.reshape(h // m, m, w // m, m, c).permute(0, 2, 1, 3, 4).reshape(-1, m * m, c)
            out.append(g.sum(1) if reduce == "sum" else g.mean(1))
        return out


register_adapter(Mistral3Adapter())
