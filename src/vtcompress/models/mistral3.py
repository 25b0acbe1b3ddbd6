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

import dataclasses
import weakref

import torch
from torch import Tensor, nn

from .description import IMAGE, ModelDescription, PositionScheme, TokenLayout
from .layout import ImageLayout
from .registry import register_adapter
from .sequence import placeholder_runs, runs_to_images

__all__ = ["Mistral3Adapter"]

# model -> (the [IMG_BREAK] id or None while no image had two rows, the [IMG_END] id), read from full prompts
_SPECIAL: weakref.WeakKeyDictionary[nn.Module, tuple[int | None, int]] = weakref.WeakKeyDictionary()


class Mistral3Adapter(ModelDescription):
    family = "mistral3"
    model_classes = ("Mistral3ForConditionalGeneration",)
    model_types = ("mistral3",)
    position_scheme = PositionScheme.ROPE_1D
    vision_layers_path = "transformer.layers"
    vision_attention_path = "attention"
    vision_embeddings_paths = ()
    vision_position_scheme = PositionScheme.ROPE_2D
    modalities = (dataclasses.replace(IMAGE, token_id_keys=("image_token_id", "image_token_index"),
                                      input_keys=("pixel_values", "image_sizes"), layout=TokenLayout.NATIVE),)

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

    def special_tokens(self, model, ids: Tensor) -> tuple[int | None, int]:
        """``([IMG_BREAK] id or None, [IMG_END] id)`` read from a full prompt ``ids [B, S]``: every row of an image's
        merged grid is a run of ``[IMG]`` followed by one of them, and each sample's last run by ``[IMG_END]``.
        Remembered per model: a prompt shortened by the projector stage may have lost whole rows."""
        starts, ends = placeholder_runs(ids, self.image_token_id(model))
        if ends.shape[0] == 0:
            raise ValueError("mistral3: input_ids hold no image placeholder")
        rows = ends[:, 0]
        after = torch.where(ends[:, 1] < ids.shape[1], ids[rows, ends[:, 1].clamp(max=ids.shape[1] - 1)],
                            torch.full_like(rows, -1))
        last = torch.ones_like(rows, dtype=torch.bool)
        last[:-1] = rows[1:] != rows[:-1]
        end = after[last].unique()
        others = after[after != end[0]].unique() if end.numel() == 1 else end
        if end.numel() != 1 or int(end[0]) < 0 or others.numel() > 1:
            raise ValueError(f"mistral3: each row of an image is a run of [IMG] followed by [IMG_BREAK] (the last row: "
                             f"[IMG_END]); the tokens after the runs are {after.tolist()}; pass the processor's "
                             "input_ids unchanged")
        found = (int(others[0]) if others.numel() else None, int(end[0]))
        known = _SPECIAL.get(model)
        if known is not None and (known[1] != found[1] or None not in (known[0], found[0]) and known[0] != found[0]):
            raise ValueError(f"mistral3: this prompt's [IMG_BREAK] / [IMG_END] ids {found} differ from the ones of "
                             f"earlier prompts {known}")
        _SPECIAL[model] = (found[0] if found[0] is not None else (known[0] if known else None), found[1])
        return _SPECIAL[model]

    def placeholder_images(self, model, ids, placeholders):
        """An image's rows (runs of ``[IMG]`` between ``[IMG_BREAK]`` tokens) are one image for the decoder stage:
        the runs up to each ``[IMG_END]``. The ids are remembered from the full prompts this model has seen (a
        prompt the projector stage shortened may have lost whole rows); a first prompt is read as a full one."""
        starts, _ = placeholder_runs(ids, self.image_token_id(model))
        if starts.shape[0] == 0:
            return torch.full_like(ids, -1)
        _, end = _SPECIAL[model] if model in _SPECIAL else self.special_tokens(model, ids)
        # the run after which the next [IMG_END] comes first (before another run) closes its image
        is_end = (ids == end).long()
        ends_before = torch.cumsum(is_end, 1)  # [IMG_END] tokens up to each column
        at_start = ends_before[starts[:, 0], starts[:, 1]]
        closes = torch.ones(starts.shape[0], dtype=torch.bool, device=ids.device)
        same_row = starts[1:, 0] == starts[:-1, 0]
        closes[:-1] = ~same_row | (at_start[1:] > at_start[:-1])
        return runs_to_images(ids, placeholders, starts, closes)

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
        _, end = self.special_tokens(model, ids)
        starts, ends = placeholder_runs(ids, self.image_token_id(model))
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
