"""Transformation family: methods that reshape the token grid after the vision encoder."""


# ==================================================================================================
# Trainable projector replacements (issue #6): unshuffle_mlp, ldpv2. Owned by the trainable-compressor
# work; machinery (lazy build, checkpoints, cell bookkeeping) in vtcompress.trainable.
# ==================================================================================================
import math as _math  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402

import torch as _torch  # noqa: E402
import torch.nn.functional as _F  # noqa: E402
from torch import nn as _nn  # noqa: E402

from ..compressor import register as _register  # noqa: E402
from ..tokens import VisualTokens as _VisualTokens  # noqa: E402
from ..trainable import FeedForward as _FeedForward  # noqa: E402
from ..trainable import TrainableCompressor as _TrainableCompressor  # noqa: E402
from ..trainable import zero_ as _zero  # noqa: E402


def _unshuffle_grid(x, layout: tuple[int, int], factor: int):
    """Pixel unshuffle (InternVL channel order) of ``x [B, H*W, C]`` on a ``layout (H, W)`` grid.

    Returns ``[B, ceil(H/f) * ceil(W/f), f*f*C]``: output cell ``(i, j)`` concatenates the patches
    ``(f*i + a, f*j + b)`` for ``a, b < f`` in row-major ``(a, b)`` order, which is what InternVL's
    ``pixel_shuffle(scale_factor=0.5)`` produces for ``f = 2``. Grids not divisible by ``f`` are padded by
    repeating the last row / column (InternVL itself requires divisibility).
    """
    b, _, c = x.shape
    hh, ww = layout
    h, w = -(-hh // factor), -(-ww // factor)
    grid = x.reshape(b, hh, ww, c)
    if (h * factor, w * factor) != (hh, ww):
        grid = _F.pad(grid.permute(0, 3, 1, 2), (0, w * factor - ww, 0, h * factor - hh), mode="replicate")
        grid = grid.permute(0, 2, 3, 1)
    grid = grid.reshape(b, h, factor, w, factor, c).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, h * w, factor * factor * c)


@_register
@_dataclass(eq=False)
class UnshuffleMLP(_TrainableCompressor):
    """Pixel unshuffle + InternVL's MLP projector, trainable (InternVL 1.5, arXiv 2404.16821).

    ``x [B, H*W, D]`` (a full grid) -> unshuffle by ``factor`` -> ``[B, h*w, f*f*D]`` ->
    ``LayerNorm(f*f*D) -> Linear(f*f*D, D) -> GELU -> Linear(D, D)``, added to the ``f x f`` cell mean
    (a residual we add because input and output live in the same LLM space; the last Linear starts at zero,
    so an untrained module is exactly ``f x f`` average pooling). Output ``[B, ceil(H/f) * ceil(W/f), D]``.

    ``factor`` defaults to ``round(sqrt(N0 / k))`` for the budget's ``k`` tokens (0.25 -> 2, as InternVL;
    0.11 -> 3); the count is fixed by the factor, not the budget, on other grids.
    """

    factor: int | None = None

    name = "unshuffle_mlp"
    family = "transformation"
    stage = "projector"
    paper = "InternVL 1.5 pixel unshuffle + MLP projector (arXiv 2404.16821), trainable"

    def check_fields(self) -> None:
        f = self.factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
            raise ValueError(f"factor must be a positive int (patches per side merged) or None; got {f!r}")

    def _factor(self, grid: tuple[int, int]) -> int:
        if self.factor is not None:
            return self.factor
        n0 = grid[0] * grid[1]
        k = self.budget if isinstance(self.budget, int) else max(1, round(self.budget * n0))
        return max(1, min(round(_math.sqrt(n0 / k)), max(grid)))

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        f = self._factor(grid)
        return -(-grid[0] // f), -(-grid[1] // f)

    def partition(self, layout, out, device=None):
        f = self._factor(layout)
        rows = _torch.arange(layout[0], device=device) // f
        cols = _torch.arange(layout[1], device=device) // f
        return (rows[:, None] * out[1] + cols[None, :]).reshape(-1)

    def build(self, d: int) -> None:
        self.factor = self._factor(self.grid)  # fixed from now on: the weights' input width depends on it
        f2 = self.factor * self.factor
        self.norm = _nn.LayerNorm(f2 * d)
        self.mlp = _FeedForward(d, mult=1, d_in=f2 * d)

    def transform(self, tokens: _VisualTokens, cells: _VisualTokens):
        z = _unshuffle_grid(tokens.x, tokens.layout, self.factor)
        return cells.x + self.mlp(self.norm(z))


@_register
@_dataclass(eq=False)
class LDPv2(_TrainableCompressor):
    """MobileVLM V2's lightweight downsample projector LDPv2, trainable (arXiv 2402.03766).

    ``x [B, H*W, D]`` -> feature transform ``x + (Linear -> GELU -> Linear)(x)`` (MobileVLM maps the vision
    width to the LLM width; here both are ``D``, so we keep a residual) -> 2-D average pooling to the
    budget's ``(h, w)`` grid (:func:`~vtcompress.trainable.grid_for_budget`; MobileVLM: 24x24 -> 12x12) ->
    positional encoding generator ``p + DWConv3x3(p)`` (depthwise, padding 1). The last Linear and the conv
    start at zero, so an untrained module is exactly average pooling. Output ``[B, h*w, D]``.

    Pooling cells are the contiguous blocks of :func:`~vtcompress.trainable.cell_partition`; for
    ``H % h == 0`` this equals ``adaptive_avg_pool2d``.
    """

    name = "ldpv2"
    family = "transformation"
    stage = "projector"
    paper = "MobileVLM V2 LDPv2 (arXiv 2402.03766), trainable"

    def build(self, d: int) -> None:
        self.mlp = _FeedForward(d, mult=1)
        self.peg = _zero(_nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d))

    def transform(self, tokens: _VisualTokens, cells: _VisualTokens):
        z = tokens.x + self.mlp(tokens.x)
        p = self.pool(tokens, z)  # [B, h*w, D]
        b, m, d = p.shape
        h, w = self.output_grid(tuple(tokens.layout))
        grid = p.transpose(1, 2).reshape(b, d, h, w)
        return p + self.peg(grid).reshape(b, d, m).transpose(1, 2)
