"""Transformation family: methods that reshape the token grid after the vision encoder."""

# ==================================================================================================
# Training-free grid transforms: pixel_unshuffle, avg_pool, max_pool, bilinear.
#
# Budget -> output grid: one rule for the whole family, :func:`vtcompress.grid.grid_for_budget`: the
# grid ``(h, w)`` (``h <= H``, ``w <= W``) whose ``h * w`` is closest to the budget's ``k`` tokens, ties
# towards the input's aspect ratio (24x24 at 0.25 -> 12x12 = 144; 27x27 at 196 -> 14x14). The count
# produced is ``h * w`` (it can differ from ``k`` when no grid has exactly ``k`` cells); pixel unshuffle's
# count is fixed by its factor and a budget that disagrees raises.
# Bookkeeping: output cell ``(i, j)`` stands for the contiguous block of input rows
# ``floor(r * h / H) == i`` (and columns likewise; :func:`vtcompress.grid.cell_partition`):
# ``size`` = patches in the block, ``pos`` = its top-left patch, ``assign`` = the cell, via the shared
# :meth:`VisualTokens.merge`. These methods need a full grid (``tokens.layout`` set, every token valid).
# ==================================================================================================
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compressor import Compressor, Stage, register
from ..grid import cell_merge, cell_partition, grid_for_budget, require_full_grid
from ..tokens import VisualTokens
from ..trainable import FeedForward, TrainableCompressor, zero_


def pixel_unshuffle_tokens(x: Tensor, layout: tuple[int, int], factor: int) -> Tensor:
    """Pixel unshuffle of ``x [B, H*W, C]`` on a ``layout (H, W)`` grid -> ``[B, (H/f)*(W/f), f*f*C]``.

    Output cell ``(i, j)`` concatenates patches ``(f*i + a, f*j + b)`` for ``a, b < f`` in row-major ``(a, b)``
    order: channel ``(a*f + b)*C + c``. That is transformers' InternVL ``pixel_shuffle(scale_factor=1/f)``
    on the ``[B, H, W, C]`` grid, and ``F.pixel_unshuffle`` on ``[B, C, H, W]`` up to a channel permutation
    (``F`` orders channels ``c*f*f + a*f + b``: view its output as ``[B, C, f*f, ...]`` and swap those axes).
    """
    b, _, c = x.shape
    hh, ww = layout
    if hh % factor or ww % factor:
        raise ValueError(f"pixel unshuffle by factor {factor} needs a grid divisible by it; got {layout}")
    h, w = hh // factor, ww // factor
    grid = x.reshape(b, h, factor, w, factor, c).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, h * w, factor * factor * c)


def anyres_max_shape(height: int, width: int, max_num_patches: int = 9, base: int = 27) -> tuple[int, int]:
    """LLaVA-OneVision's ``anyres_max_N`` feature-grid rule (transformers ``LlavaOnevisionModel.pack_image_features``).

    ``ratio = sqrt(height * width / (max_num_patches * base**2))`` (``base``: patches per side of one crop, 27
    for SigLIP-384/14); if ``ratio > 1.1`` the unpadded grid is bilinearly resized to
    ``(int(height // ratio), int(width // ratio))``, else kept. Use the result as the budget of ``bilinear``.
    """
    for name, v in (("height", height), ("width", width), ("max_num_patches", max_num_patches), ("base", base)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    ratio = math.sqrt(height * width / (max_num_patches * base**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def _grid_of(x: Tensor, layout: tuple[int, int]) -> Tensor:
    """``x [B, H*W, D]`` -> ``[B, D, H, W]`` in float32 (the layout ``torch.nn.functional`` pools)."""
    b, _, d = x.shape
    return x.to(torch.float32).reshape(b, layout[0], layout[1], d).permute(0, 3, 1, 2)


def _tokens_of(g: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, D, h, w]`` -> ``[B, h*w, D]`` in ``dtype``."""
    b, d = g.shape[:2]
    return g.permute(0, 2, 3, 1).reshape(b, -1, d).to(dtype)


@dataclass
class _GridTransform(Compressor):
    """Shared steps: the output grid for the budget, then the cell bookkeeping (see the section header)."""

    family: ClassVar[str] = "transformation"

    def output_grid(self, layout: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` produced on an input ``layout (H, W)``: the documented count is ``h * w``."""
        return grid_for_budget(self.budget, layout)

    def _cells(self, tokens: VisualTokens) -> tuple[tuple[int, int], tuple[int, int], Tensor, VisualTokens]:
        layout = require_full_grid(tokens, self.name)
        out = self.output_grid(layout)
        cells = cell_partition(layout, out, device=tokens.x.device)
        return layout, out, cells, cell_merge(tokens, cells, out)


# --------------------------------------------------------------------------------------------- pixel unshuffle
@register
@dataclass
class PixelUnshuffle(_GridTransform):
    """InternVL's pixel unshuffle (InternVL 1.5, arXiv 2404.16821; transformers ``InternVLModel.pixel_shuffle``).

    ``x [B, H*W, D]`` -> ``[B, (H/f)*(W/f), f*f*D]`` (:func:`pixel_unshuffle_tokens`): ``f x f`` neighbouring
    patches are concatenated along channels, nothing is averaged or lost. The count is fixed by ``factor``:
    the budget must say the same — a fraction equal to ``1 / f**2`` (default 0.25 for ``f = 2``) or the int
    ``(H/f) * (W/f)`` — else ``ValueError``. The output is ``f*f`` times wider, so the next module must
    expect that width (InternVL's ``mlp1``); full budget (``factor=1``, ``budget=1.0``) is the identity.
    """

    budget: int | float = 0.25
    factor: int = 2

    name: ClassVar[str] = "pixel_unshuffle"
    paper: ClassVar[str] = "InternVL 1.5 pixel unshuffle (arXiv 2404.16821)"
    widens: ClassVar[bool] = True
    matches_reference: ClassVar[str] = "exact (transformers InternVLModel.pixel_shuffle)"

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"factor must be an int >= 1 (patches per side concatenated); got {f!r}")
        if isinstance(self.budget, float) and abs(self.budget - 1.0 / (f * f)) > 1e-9:
            raise ValueError(f"budget={self.budget} does not match factor={f}: pixel unshuffle keeps exactly "
                             f"1/factor**2 = {1.0 / (f * f)} of the tokens; pass that fraction or the int count")

    def output_grid(self, layout: tuple[int, int]) -> tuple[int, int]:
        f = self.factor
        if layout[0] % f or layout[1] % f:
            raise ValueError(f"pixel_unshuffle(factor={f}) needs a grid divisible by {f}; got {layout}")
        out = (layout[0] // f, layout[1] // f)
        if isinstance(self.budget, int) and self.budget != out[0] * out[1]:
            raise ValueError(f"budget={self.budget} tokens does not match factor={f} on the {layout} grid, which "
                             f"always gives {out[0] * out[1]} tokens; pass budget={out[0] * out[1]} or change factor")
        return out

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        layout, _, _, merged = self._cells(tokens)
        return merged.replace(x=pixel_unshuffle_tokens(tokens.x, layout, self.factor))


# --------------------------------------------------------------------------------------------- pooling
@register
@dataclass
class AvgPool(_GridTransform):
    """2-D average pooling of the feature grid to the budget's ``(h, w)`` (e.g. LLaVA-style 2x2 pooling).

    Each output token is the (size-weighted) mean of its cell; on a grid divisible by ``(h, w)`` this is
    exactly ``F.avg_pool2d(kernel_size=stride=(H/h, W/w))`` (and ``F.adaptive_avg_pool2d``); otherwise cells
    are contiguous, non-overlapping blocks of ``floor`` / ``ceil`` size (adaptive pooling would overlap them).
    """

    name: ClassVar[str] = "avg_pool"
    paper: ClassVar[str] = "2-D average pooling (LLaVA-OneVision video frames, arXiv 2408.03326)"
    matches_reference: ClassVar[str] = "exact (F.avg_pool2d on a divisible grid)"

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        return self._cells(tokens)[3]


@register
@dataclass
class MaxPool(_GridTransform):
    """2-D max pooling of the feature grid to the budget's ``(h, w)``: channel-wise max over each cell.

    Exactly ``F.max_pool2d(kernel_size=stride=(H/h, W/w))`` on a divisible grid; cells as :class:`AvgPool`.
    """

    name: ClassVar[str] = "max_pool"
    paper: ClassVar[str] = "2-D max pooling (baseline)"
    matches_reference: ClassVar[str] = "exact (F.max_pool2d on a divisible grid)"

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        _, _, cells, merged = self._cells(tokens)
        x = tokens.x
        b, _, d = x.shape
        m = merged.num_tokens
        idx = cells[None, :, None].expand(b, -1, d)
        out = torch.full((b, m, d), float("-inf"), device=x.device, dtype=x.dtype)
        return merged.replace(x=out.scatter_reduce(1, idx, x, reduce="amax", include_self=True))


# --------------------------------------------------------------------------------------------- bilinear
@register
@dataclass
class Bilinear(_GridTransform):
    """Bilinear resize of the feature grid to the budget's ``(h, w)`` (LLaVA-OneVision, arXiv 2408.03326).

    ``x`` is ``F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)`` as transformers'
    ``LlavaOnevisionModel`` does (anyres_max_9 images, video frames 27x27 -> 14x14); computed in float32.
    Provenance is the block partition of the section header (each output token nominally stands for the
    patches of its block). For the ``anyres_max_N`` rule use :func:`anyres_max_shape` to pick the budget.
    """

    name: ClassVar[str] = "bilinear"
    paper: ClassVar[str] = "LLaVA-OneVision bilinear resize (arXiv 2408.03326)"
    matches_reference: ClassVar[str] = "exact (transformers LLaVA-OneVision apply_pooling / anyres_max)"

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        layout, out, _, merged = self._cells(tokens)
        g = F.interpolate(_grid_of(tokens.x, layout), size=out, mode="bilinear", align_corners=False)
        return merged.replace(x=_tokens_of(g, tokens.x.dtype))


# ==================================================================================================
# Trainable projector replacements: unshuffle_mlp, ldpv2.
# Machinery (lazy build, checkpoints, cell bookkeeping) in vtcompress.trainable.
# ==================================================================================================


def _unshuffle_grid(x, layout: tuple[int, int], factor: int):
    """Pixel unshuffle (InternVL channel order) of ``x [B, H*W, C]`` on a ``layout (H, W)`` grid.

    Returns ``[B, ceil(H/f) * ceil(W/f), f*f*C]``: output cell ``(i, j)`` concatenates the patches
    ``(f*i + a, f*j + b)`` for ``a, b < f`` in row-major ``(a, b)`` order, which is what InternVL's
    ``pixel_shuffle(scale_factor=0.5)`` produces for ``f = 2``. Grids not divisible by ``f`` are padded by
    repeating the last row / column (InternVL itself requires divisibility), then the shared
    :func:`pixel_unshuffle_tokens` kernel runs.
    """
    b, _, c = x.shape
    hh, ww = layout
    h, w = -(-hh // factor), -(-ww // factor)
    if (h * factor, w * factor) == (hh, ww):
        return pixel_unshuffle_tokens(x, layout, factor)
    grid = x.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
    grid = F.pad(grid, (0, w * factor - ww, 0, h * factor - hh), mode="replicate").permute(0, 2, 3, 1)
    return pixel_unshuffle_tokens(grid.reshape(b, -1, c), (h * factor, w * factor), factor)


@register
@dataclass(eq=False)
class UnshuffleMLP(TrainableCompressor):
    """Pixel unshuffle + InternVL's MLP projector, trainable (InternVL 1.5, arXiv 2404.16821).

    ``x [B, H*W, D]`` (a full grid) -> unshuffle by ``factor`` -> ``[B, h*w, f*f*D]`` ->
    ``LayerNorm(f*f*D) -> Linear(f*f*D, D) -> GELU -> Linear(D, D)``, added to the ``f x f`` cell mean
    (a residual we add because input and output live in the same LLM space; the last Linear starts at zero,
    so an untrained module is exactly ``f x f`` average pooling). Output ``[B, ceil(H/f) * ceil(W/f), D]``.

    ``factor`` (the unshuffle factor ``f``; the weights' input width ``f*f*D`` depends on it) defaults to
    ``round(1 / sqrt(budget))`` for a fraction (0.25 -> 2, as InternVL; 0.11 -> 3), the same for every view and
    image, so each view of an anyres image and each image of a batch gets its own count
    ``ceil(H/f) * ceil(W/f)`` from its own grid, and a batch gives what each image gives alone. An int budget
    ``K`` needs ``grid`` (the factor is ``round(sqrt(H*W / K))`` on it) or ``factor``; the count is fixed by the
    factor, not the budget, on other grids.
    """

    factor: int | None = None

    name = "unshuffle_mlp"
    family = "transformation"
    stage = Stage.PROJECTOR
    paper = "InternVL 1.5 pixel unshuffle + MLP projector (arXiv 2404.16821), trainable"

    def check_fields(self) -> None:
        f = self.factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
            raise ValueError(f"factor must be a positive int (patches per side merged) or None; got {f!r}")
        if f is None and isinstance(self.budget, int) and self.grid is None:
            raise ValueError(
                f"unshuffle_mlp with an int budget ({self.budget}) needs grid=(H, W) (the grid its factor is chosen "
                "on) or factor=F: with neither, the first input would fix the factor for every later view and image; "
                "or give a fraction budget"
            )

    def _factor(self, grid: tuple[int, int] | None = None) -> int:
        """The unshuffle factor: ``factor``, else from the budget alone (fraction) or on ``self.grid`` (int)."""
        if self.factor is not None:
            return self.factor
        if isinstance(self.budget, float):
            return max(1, round(1.0 / math.sqrt(self.budget)))
        hh, ww = self.grid
        return max(1, min(round(math.sqrt(hh * ww / self.budget)), max(hh, ww)))

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        f = self._factor(grid)
        return -(-grid[0] // f), -(-grid[1] // f)

    def partition(self, layout, out, device=None):
        f = self._factor(layout)
        rows = torch.arange(layout[0], device=device) // f
        cols = torch.arange(layout[1], device=device) // f
        return (rows[:, None] * out[1] + cols[None, :]).reshape(-1)

    def build(self, d: int) -> None:
        self.factor = self._factor()  # recorded: the weights' input width depends on it
        f2 = self.factor * self.factor
        self.norm = nn.LayerNorm(f2 * d)
        self.mlp = FeedForward(d, mult=1, d_in=f2 * d)

    def transform(self, tokens: VisualTokens, cells: VisualTokens):
        z = _unshuffle_grid(tokens.x, tokens.layout, self.factor)
        return cells.x + self.mlp(self.norm(z))


@register
@dataclass(eq=False)
class LDPv2(TrainableCompressor):
    """MobileVLM V2's lightweight downsample projector LDPv2, trainable (arXiv 2402.03766).

    ``x [B, H*W, D]`` -> feature transform ``x + (Linear -> GELU -> Linear)(x)`` (MobileVLM maps the vision
    width to the LLM width; here both are ``D``, so we keep a residual) -> 2-D average pooling to the
    budget's ``(h, w)`` grid (:func:`~vtcompress.grid.grid_for_budget`; MobileVLM: 24x24 -> 12x12) ->
    positional encoding generator ``p + DWConv3x3(p)`` (depthwise, padding 1). The last Linear and the conv
    start at zero, so an untrained module is exactly average pooling. Output ``[B, h*w, D]``.

    Pooling cells are the contiguous blocks of :func:`~vtcompress.grid.cell_partition`; for
    ``H % h == 0`` this equals ``adaptive_avg_pool2d``.
    """

    name = "ldpv2"
    family = "transformation"
    stage = Stage.PROJECTOR
    paper = "MobileVLM V2 LDPv2 (arXiv 2402.03766), trainable"

    def build(self, d: int) -> None:
        self.mlp = FeedForward(d, mult=1)
        self.peg = zero_(nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d))

    def transform(self, tokens: VisualTokens, cells: VisualTokens):
        z = tokens.x + self.mlp(tokens.x)
        p = self.pool(tokens, z)  # [B, h*w, D]
        b, m, d = p.shape
        h, w = self.output_grid(tuple(tokens.layout))
        grid = p.transpose(1, 2).reshape(b, d, h, w)
        return p + self.peg(grid).reshape(b, d, m).transpose(1, 2)
