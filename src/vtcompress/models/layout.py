"""The layout of one image's tokens in its placeholder run: :class:`ImageLayout` (views, patches, separators).

A family's description builds one per image (:meth:`~vtcompress.models.description.ModelDescription.layouts`);
the projector pipeline reads it to turn each view into a row of :class:`~vtcompress.tokens.VisualTokens` and to
keep a row's separator when the row keeps a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ImageLayout"]


@dataclass
class ImageLayout:
    """Where each feature of one image's placeholder run comes from (``L`` features).

    Attributes:
        view: ``[L]`` long, the view (base grid, high-resolution grid, tile) of each feature; ``-1`` for a
            separator of a row without patches (see below).
        patch: ``[L]`` long, raster index of the feature in its view's grid, ``-1`` for features that are
            not patches (separators, prefix tokens).
        sep: ``[L]`` bool, row separators (``image_newline``) that close a row holding patches: kept when
            their row keeps a token.
        group: ``[L]`` long, the row each separator closes (and each patch belongs to), ``-1`` elsewhere.
        grids: ``(H, W)`` of each view that holds patches.

    Features with ``patch == -1`` and ``sep == False`` are always kept: a prefix token ([CLS] with
    ``vision_feature_select_strategy="full"``), and the newlines of a high-resolution grid that unpadding
    left without columns (LLaVA-NeXT / OneVision on an image much taller than wide: the stock packer then
    emits one ``image_newline`` per row and no patch; with nothing to prune they stay, as in the stock model).
    """

    view: Tensor
    patch: Tensor
    sep: Tensor
    group: Tensor
    grids: list[tuple[int, int]]

    @classmethod
    def single(cls, grid: tuple[int, int], n: int, device, prefix: int = 0) -> ImageLayout:
        """One view of ``grid`` whose ``H*W`` patches are the features after ``prefix`` always-kept ones."""
        patch = torch.arange(n, device=device) - prefix
        return cls(
            view=torch.zeros(n, dtype=torch.long, device=device),
            patch=torch.where(patch >= 0, patch, torch.full_like(patch, -1)),
            sep=torch.zeros(n, dtype=torch.bool, device=device),
            group=torch.full((n,), -1, dtype=torch.long, device=device),
            grids=[(int(grid[0]), int(grid[1]))],
        )

    @classmethod
    def tiles(cls, grid: tuple[int, int], tiles: int, device) -> ImageLayout:
        """``tiles`` views of the same ``grid``, one after the other (InternVL)."""
        per = grid[0] * grid[1]
        n = per * tiles
        ar = torch.arange(n, device=device)
        return cls(
            view=ar // per, patch=ar % per,
            sep=torch.zeros(n, dtype=torch.bool, device=device),
            group=torch.full((n,), -1, dtype=torch.long, device=device),
            grids=[(int(grid[0]), int(grid[1]))] * tiles,
        )

    @classmethod
    def from_views(cls, view: Tensor, sep: Tensor, base_grid: tuple[int, int],
                   sep_view: int | None = None) -> ImageLayout:
        """Layout of an anyres packed run from the view of each feature and the newline flags.

        Args:
            view: ``[L]`` long, the view of each feature (its value at a separator is ignored).
            sep: ``[L]`` bool, the newline flags.
            base_grid: ``(H, W)`` of view 0 (the base crop).
            sep_view: the view whose rows every separator closes (the stock packers put newlines only after
                the rows of the high-resolution grid, view 1, or, for a single-crop image, one after the base
                crop, view 0); ``None``: the view of the feature before each separator.

        View 0 is the base crop (``base_grid``); a later view's grid is (its rows, patches per row).
        ``group`` numbers the rows. A separator closing a row without patches (a zero-column unpadded grid)
        becomes an always-kept non-patch feature (``view`` ``-1``, ``sep`` False, ``group`` ``-1``).
        """
        n = view.shape[0]
        dev = view.device
        if sep_view is None:
            prev_view = torch.cat([view[:1], view[:-1]])
            view = torch.where(sep, prev_view, view)  # a newline closes the row of the feature before it
        else:
            view = torch.where(sep, torch.full_like(view, int(sep_view)), view)
        sep_l = sep.long()
        nl_before = torch.cumsum(sep_l, 0) - sep_l
        group = view * (n + 1) + nl_before
        is_patch = ~sep
        # rows that hold at least one patch; separators of the others are nothing to prune
        has_patch = torch.zeros(int(group.max()) + 1 if n else 0, dtype=torch.bool, device=dev)
        has_patch[group[is_patch]] = True
        empty = sep & ~has_patch[group]
        sep = sep & ~empty
        view = view.masked_fill(empty, -1)
        group = torch.where(is_patch | sep, group, torch.full_like(group, -1))
        patch = torch.full((n,), -1, dtype=torch.long, device=dev)
        grids = []
        for v in range(int(view.max()) + 1 if n else 0):  # a handful of views per image
            in_v = (view == v) & is_patch
            count = int(in_v.sum())
            patch[in_v] = torch.arange(count, device=dev)
            rows = int((sep & (view == v)).sum())
            if v == 0 or rows == 0:
                grid = base_grid if base_grid[0] * base_grid[1] == count else (1, count)
            else:
                grid = (rows, count // rows)
            if grid[0] * grid[1] != count:
                raise ValueError(f"view {v} has {count} patches, which do not form the grid {grid}")
            grids.append(grid)
        return cls(view=view, patch=patch, sep=sep, group=group, grids=grids)

