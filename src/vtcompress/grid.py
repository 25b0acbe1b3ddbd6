"""Training-free grid helpers: a budget's output grid and the regular cell partition of a patch grid.

The transformation methods (pooling, bilinear, the trainable pixel-unshuffle / LDPv2 / resamplers) all produce
one token per cell of a regular ``(h, w)`` partition of the input grid; these functions are that one rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .compressor import budget_tokens, check_budget
from .tokens import VisualTokens

__all__ = ["grid_for_budget", "cell_partition", "cell_merge", "require_full_grid"]


def grid_for_budget(budget: int | float, grid: tuple[int, int]) -> tuple[int, int]:
    """Output grid ``(h, w)`` for ``budget`` on an input ``grid (H, W)``.

    ``k`` is the budget in tokens (:func:`~vtcompress.compressor.budget_tokens`: ``round(budget * N0)`` for a
    fraction);
    ``(h, w)`` is the grid with ``h <= H``, ``w <= W`` whose ``h * w`` is closest to ``k``, ties broken towards
    the input's aspect ratio, then the smaller ``h``: 12x12 at 0.25 -> 6x6 (36), at 0.11 -> 4x4 (16), at 20 -> 4x5.
    """
    check_budget(budget)
    hh, ww = int(grid[0]), int(grid[1])
    n0 = hh * ww
    if isinstance(budget, int) and budget > n0:
        raise ValueError(f"budget={budget} tokens is out of range: the grid {grid} has N0={n0} patches")
    k = budget_tokens(budget, n0)
    best = None
    for h in range(1, hh + 1):  # at most H candidates: a handful of scalar steps, not a loop over tokens
        w = min(ww, max(1, round(k / h)))
        key = (abs(h * w - k), abs(math.log(h / w) - math.log(hh / ww)), h)
        if best is None or key < best[0]:
            best = (key, (h, w))
    return best[1]


def cell_partition(layout: tuple[int, int], out: tuple[int, int], device=None) -> Tensor:
    """``[N]`` long: the cell (raster index in ``out (h, w)``) of each token of a ``layout (H, W)`` grid.

    Row ``r`` goes to cell row ``floor(r * h / H)`` (same for columns): a partition into contiguous blocks
    that every cell meets (``h <= H``). For ``H % h == 0`` it is the ``H / h`` block partition of pooling.
    """
    (hh, ww), (h, w) = layout, out
    rows = torch.arange(hh, device=device) * h // hh
    cols = torch.arange(ww, device=device) * w // ww
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def cell_merge(tokens: VisualTokens, cells: Tensor, out: tuple[int, int]) -> VisualTokens:
    """Merge the tokens of a full grid by ``cells [N]`` (from :func:`cell_partition`) into ``out (h, w)`` tokens.

    Every field follows (``x`` becomes the size-weighted cell mean, ``size`` the cell's patch count,
    ``assign`` the cell, ``pos`` the cell's first token in raster order) through the shared
    :meth:`VisualTokens.merge`. Requires a full grid: ``tokens.layout`` set and every token valid.
    """
    require_full_grid(tokens, "cell_merge")
    b, n = tokens.mask.shape
    m = out[0] * out[1]
    dest = cells.to(tokens.x.device).expand(b, n)
    # each cell keeps its lowest token index as anchor: cells are raster-ordered blocks, so anchors ascend
    first = torch.full((m,), n, dtype=torch.long, device=dest.device)
    first = first.scatter_reduce(0, cells.to(dest.device), torch.arange(n, device=dest.device), reduce="amin")
    return tokens.merge(dest, first.expand(b, m), layout=out)


def require_full_grid(tokens: VisualTokens, what: str) -> tuple[int, int]:
    """The ``layout (h, w)`` of ``tokens``; ``ValueError`` if they no longer form a full regular grid."""
    if tokens.layout is None:
        raise ValueError(
            f"{what} needs tokens that form a full regular grid (tokens.layout set); got layout=None "
            "(tokens already pruned, or a packed anyres layout): apply it to the full patch grid"
        )
    if not bool(tokens.mask.all()):
        raise ValueError(f"{what} needs every token of the {tokens.layout} grid valid; got {int((~tokens.mask).sum())} "
                         "masked token(s)")
    return tokens.layout
