"""Idefics3 / SmolVLM adapter (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``):
SigLIP tiles plus a global view, pixel-shuffle connector, marker tokens around each tile.

The processor splits an image into ``rows x cols`` tiles and adds the whole image, down-sized, as a last
"global" tile (an image that is not split has the global tile only); ``pixel_values`` is
``[B, tiles, 3, H, W]`` with all-zero padding tiles, which the stock ``get_image_features`` drops. Each tile
goes through the vision tower on its own (``H/p x W/p`` patches, no [CLS]), and the connector pixel-shuffles
``scale_factor x scale_factor`` patches into one token (``Idefics3Connector.pixel_shuffle``, then a linear
projection): a tile gives ``n = (H/p/s) * (W/p/s)`` tokens in raster order over that grid. In the prompt each
tile is one run of ``n`` image placeholders, preceded by its marker token and the ``<fake_token_around_image>``
that opens it::

    <fake><row_1_col_1><image>*n <fake><row_1_col_2><image>*n \\n ... \\n\\n <fake><global-img><image>*n <fake>

Only the placeholders are image features (``masked_scatter`` fills them in order); the markers, newlines and
``<fake_token_around_image>`` are text tokens of the vocabulary and always stay, so a tile whose tokens are
all pruned still has its marker. Every tile is a view of its image (grid ``(H/p/s, W/p/s)``), as InternVL's
tiles; an int budget is split over an image's tiles in proportion to their sizes (equal here).

Which runs form one image: the config holds no id for ``<global-img>``, but every image ends with its global
tile and so does every sample's last image, so the token before each sample's last run IS the global marker;
the runs it precedes close their images. A prompt whose samples disagree on that token, or whose run lengths
are not ``n``, is refused with one clear error.

Signals: the tower has no [CLS]; the attention signal is the mean attention each patch receives within its tile
(padded patches masked as in the stock tower), summed over the ``s^2`` patches of a token, keys averaged over
them; the groups are learned by running the model's own ``connector.pixel_shuffle`` on the signal.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .description import IMAGE, ModelDescription, PositionScheme, TokenLayout
from .layout import ImageLayout
from .registry import register_adapter
from .sequence import placeholder_runs, runs_to_images

__all__ = ["Idefics3Adapter"]


class Idefics3Adapter(ModelDescription):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    model_types = ("idefics3", "smolvlm")
    position_scheme = PositionScheme.ROPE_1D
    vision_tower_path = "vision_model"
    vision_embeddings_paths = ("embeddings",)
    projector_path = "connector"
    language_model_path = "text_model"
    modalities = (dataclasses.replace(IMAGE, token_id_keys=("image_token_id",),
                                      input_keys=("pixel_values", "pixel_attention_mask"), layout=TokenLayout.TILES),)

    def num_prefix_tokens(self, model) -> int:
        return 0

    def feature_layer(self, model) -> int:
        return -1  # the connector reads the tower's last layer (after post_layernorm)

    def scale(self, model) -> int:
        return int(model.config.scale_factor)

    def tile_grid(self, model, inputs) -> tuple[int, int]:
        """Token grid of one tile: the pixel grid of ``pixel_values`` over the patch size and the shuffle."""
        pv = inputs["pixel_values"]
        p, s = int(self.vision_config(model).patch_size), self.scale(model)
        return (int(pv.shape[-2]) // p // s, int(pv.shape[-1]) // p // s)

    def closing_runs(self, model, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The image-token runs of ``ids [B, S]`` (``starts``, ``ends``: ``[R, 2]`` row-major) and which of them
        close an image (``[R]`` bool: the global tile, preceded by the global marker read from the prompt)."""
        starts, ends = placeholder_runs(ids, self.image_token_id(model))  # row-major: the order masked_scatter fills
        if starts.shape[0] == 0:
            return starts, ends, torch.zeros(0, dtype=torch.bool, device=ids.device)
        rows = starts[:, 0]
        before = torch.where(starts[:, 1] > 0, ids[rows, (starts[:, 1] - 1).clamp(min=0)], torch.full_like(rows, -1))
        last = torch.ones_like(rows, dtype=torch.bool)
        last[:-1] = rows[1:] != rows[:-1]  # each sample's last run: its last image's global tile
        marker = before[last].unique()
        if marker.numel() != 1 or int(marker[0]) < 0:
            raise ValueError(f"{self.family}: the token before each sample's last image-token run should be the global "
                             f"image marker (<global-img>); found {before[last].tolist()}; pass the processor's "
                             "input_ids unchanged")
        return starts, ends, before == marker[0]

    def image_tiles(self, model, inputs) -> list[int]:
        """Tiles per image (global tile included), in placeholder order; validates the prompt's layout."""
        ids = inputs["input_ids"]
        starts, ends, closes = self.closing_runs(model, ids)
        grid = self.tile_grid(model, inputs)
        n = grid[0] * grid[1]
        lengths = (ends[:, 1] - starts[:, 1]).tolist()
        if any(length != n for length in lengths):
            raise ValueError(f"{self.family}: placeholder runs of {sorted(set(lengths))} tokens; every tile is one run "
                             f"of {n} image tokens ({grid[0]}x{grid[1]} after the pixel shuffle) between its marker "
                             "tokens, as the processor writes the prompt")
        if not lengths:
            return []
        at = closes.nonzero().squeeze(1)
        tiles = torch.diff(at, prepend=at.new_full((1,), -1)).tolist()
        real = (inputs["pixel_values"] != 0).flatten(2).any(-1).sum(1)  # the stock model drops all-zero tiles
        per_row = torch.bincount(starts[:, 0], minlength=ids.shape[0])
        if not torch.equal(real.to(per_row.device), per_row):
            raise ValueError(f"{self.family}: input_ids hold {per_row.tolist()} tiles per sample but pixel_values hold "
                             f"{real.tolist()} non-padding tiles per sample")
        return tiles

    def placeholder_images(self, model, ids, placeholders):
        """The tiles of one image (its runs up to the global tile's) are one image for the decoder stage."""
        starts, _, closes = self.closing_runs(model, ids)
        if starts.shape[0] == 0:
            return torch.full_like(ids, -1)
        return runs_to_images(ids, placeholders, starts, closes)

    def features(self, model, inputs, out) -> list[Tensor]:
        feats = torch.cat(list(out.pooler_output), dim=0)  # stock: one tensor per sample
        n = self.tile_grid(model, inputs)
        n = n[0] * n[1]
        return list(torch.split(feats, [t * n for t in self.image_tiles(model, inputs)], dim=0))

    def layouts(self, model, inputs, feats):
        grid = self.tile_grid(model, inputs)
        n = grid[0] * grid[1]
        return [ImageLayout.tiles(grid, int(f.shape[0]) // n, f.device) for f in feats]

    def signal_to_features(self, model, inputs, records, reduce, feats):
        sig = torch.cat(records, dim=0)  # [tiles, H*W, C], the real tiles in placeholder order
        t, _, c = sig.shape
        s = self.scale(model)
        shuffled = self.projector(model).pixel_shuffle(sig, scale_factor=s)  # [tiles, n, s*s*C]
        groups = shuffled.reshape(t, shuffled.shape[1], s * s, c)  # the s*s patches of each token, C each
        pooled = groups.sum(2) if reduce == "sum" else groups.mean(2)
        return [p.reshape(-1, c) for p in torch.split(pooled, self.image_tiles(model, inputs), dim=0)]


register_adapter(Idefics3Adapter())
