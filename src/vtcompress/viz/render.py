"""Token maps: drawing provenance (``assign`` / ``pos`` / ``mask``) over an image, and grids of titled panels.

Pure drawing: numpy and PIL, no model. See :mod:`vtcompress.viz` for what a map shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..tokens import VisualTokens

__all__ = [
    "DIM_FACTOR",
    "TINT_ALPHA",
    "GRID_SHADE",
    "OUTLINE",
    "PALETTE",
    "TARGET_SIDE",
    "STRIP_SIDE",
    "CROSS_FRAME",
    "to_pil",
    "open_image",
    "patch_states",
    "token_map",
    "panel_grid",
    "panel_title",
    "clip_panels",
    "clip_strip",
]

#: dropped patches keep this fraction of their brightness (pixel * 0.3: blended 70 % towards black).
DIM_FACTOR = 0.3
#: opacity of a merged group's colour over its patches.
TINT_ALPHA = 0.45
#: the grid lines multiply the pixels they cover by this factor.
GRID_SHADE = 0.55
#: colour of the band outlining each kept token's anchor patch.
OUTLINE = (255, 255, 255)
#: merged groups: ``PALETTE[token % 17]``; saturated, mutually distinct, none close to white or black.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128),
)
#: default long side (px) of a token map; a patch is never drawn smaller than it is in the input image.
TARGET_SIDE = 384
#: default long side (px) of one frame of a :func:`clip_strip` (T frames side by side: smaller than a map).
STRIP_SIDE = 192
#: colour of the diagonal hatching over patches merged into a token anchored in ANOTHER frame of a clip.
CROSS_FRAME = (0, 0, 0)


# ----------------------------------------------------------------------------------------------- images


def to_pil(image: Any) -> Image.Image:
    """An RGB ``PIL.Image`` from a PIL image, a numpy array or a torch tensor.

    Accepted: ``PIL.Image`` (any mode); numpy ``uint8`` ``(H, W, 3)`` / ``(H, W, 4)`` / ``(H, W)``, or float in
    ``[0, 1]``; torch ``(3, H, W)`` or ``(1, 3, H, W)``, ``uint8`` or float. A float array/tensor whose values
    are not in ``[0, 1]`` (e.g. normalised ``pixel_values``) is min-max rescaled to ``[0, 255]`` for display.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must have shape (3, H, W) or (1, 3, H, W); got {tuple(image.shape)}")
        arr = t.permute(1, 2, 0).float().numpy() if t.is_floating_point() else t.permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ValueError(f"image must be a PIL.Image, a numpy array or a torch tensor; got {type(image).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"a numpy image must have shape (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}")
    arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"image dtype must be uint8 or float; got {arr.dtype}")
        f = arr.astype(np.float32)
        if not np.isfinite(f).all():
            raise ValueError("image contains NaN/inf values")
        lo, hi = float(f.min()), float(f.max())
        if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
            f = f * 255.0
        elif lo < 0.0 or hi > 255.0 or arr.dtype.kind == "f":
            f = (f - lo) / max(hi - lo, 1e-12) * 255.0  # normalised input: stretch for display
        arr = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def open_image(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc


# ----------------------------------------------------------------------------------------------- provenance


def _square(n: int, what: str) -> tuple[int, int]:
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"{what} has {n} patches, which is not a square grid; pass grid=(H, W) with H * W == {n}")
    return side, side


def patch_states(
    tokens: VisualTokens | torch.Tensor | np.ndarray,
    grid: tuple[int, int] | None = None,
    index: int = 0,
    frame: int | None = None,
) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """Per original patch: which token it went to, whether it is a kept token's anchor, its group size.

    Args:
        tokens: :class:`VisualTokens` (image ``index`` of the batch is drawn), a kept mask ``[N0]`` /
            ``[1, N0]`` bool (kept patches are their own tokens), or an assignment ``[N0]`` / ``[1, N0]`` long
            (output token per patch, ``-1`` dropped; a group's anchor is its first patch in raster order).
        grid: ``(H, W)`` of the original patch grid (of one frame); taken from ``VisualTokens.grid``; default
            for plain masks: square.
        index: batch row of ``VisualTokens`` to draw.
        frame: for a clip (``VisualTokens`` with ``frames = T > 1``, or a mask / assignment of ``T * H * W``
            entries with ``grid`` given), the frame ``t`` to describe; a clip needs it (see :func:`clip_strip`).
            Group sizes count the token's patches in every frame, so a patch merged into a token of another
            frame is a merged patch (group > 1) of this frame.

    Returns:
        ``grid``, ``assign [N0]`` int64 (``-1`` dropped), ``anchor [N0]`` bool (kept tokens' anchor patches) and
        ``group [N0]`` int64 (number of patches of the token each patch went to; 0 for dropped patches); with
        ``frame``, ``N0 = H * W`` patches of that frame (``assign`` still numbers the clip's tokens).
    """
    grid, frames, assign, anchor, group, _ = _clip_states(tokens, grid, index, frame is not None)
    if frame is None:
        if frames > 1:
            raise ValueError(f"the tokens are a clip of {frames} frames; pass frame=t (0 <= t < {frames}) to "
                             "describe one frame, or draw the whole clip with clip_strip()")
        return grid, assign, anchor, group
    if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < frames:
        raise ValueError(f"frame={frame!r} is out of range for a clip of {frames} frame(s)")
    hw = grid[0] * grid[1]
    cut = slice(frame * hw, (frame + 1) * hw)
    return grid, assign[cut], anchor[cut], group[cut]


def _clip_states(tokens, grid, index: int, clip_ok: bool):
    """:func:`patch_states` over a whole clip: ``grid`` (one frame), ``T``, then ``assign``, ``anchor``, ``group``
    and ``home`` (the frame of the anchor of the token each patch went to, ``-1`` dropped), each ``[T * H * W]``.
    ``clip_ok``: a plain mask may span several frames (``grid`` given)."""
    if isinstance(tokens, VisualTokens):
        if not 0 <= index < tokens.batch_size:
            raise ValueError(f"index={index} is out of range for a batch of {tokens.batch_size} image(s)")
        if grid is not None and tuple(grid) != tuple(tokens.grid):
            raise ValueError(f"grid={tuple(grid)} does not match the tokens' grid {tokens.grid}")
        grid, frames = tokens.grid, tokens.frames
        n0 = frames * grid[0] * grid[1]
        assign = tokens.assign[index].detach().cpu().numpy().astype(np.int64)
        all_pos = tokens.pos[index].detach().cpu().numpy().astype(np.int64)
        valid = tokens.mask[index].detach().cpu().numpy().astype(bool)
        pos = all_pos[valid]
        anchor = np.zeros(n0, dtype=bool)
        anchor[pos[(pos >= 0) & (pos < n0)]] = True
        token_pos = np.where(valid, all_pos, -1)  # [N]: anchor patch of each token
    else:
        arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise ValueError(f"a kept mask / assignment must have shape [N0] or [1, N0]; got {arr.shape}")
        n0 = arr.shape[0]
        grid = _square(n0, "the kept mask") if grid is None else (int(grid[0]), int(grid[1]))
        hw = grid[0] * grid[1]
        frames = n0 // hw if clip_ok and hw and n0 % hw == 0 else 1
        if frames * hw != n0:
            raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches but the mask has N0={n0} entries")
        if arr.dtype == bool:
            assign = np.where(arr, np.arange(n0), -1).astype(np.int64)
        elif arr.dtype.kind in "iu":
            assign = arr.astype(np.int64)
        else:
            raise ValueError(f"a kept mask must be bool and an assignment integer; got dtype {arr.dtype}")
        anchor = np.zeros(n0, dtype=bool)
        valid = np.flatnonzero(assign >= 0)
        # the first patch (raster order) of each token is its anchor
        tok, first = np.unique(assign[valid], return_index=True)
        anchor[valid[first]] = True
        token_pos = np.full(int(tok.max()) + 1 if tok.size else 1, -1, dtype=np.int64)
        token_pos[tok] = valid[first]
    if assign.shape[0] != n0:
        raise ValueError(f"assign has {assign.shape[0]} entries but grid {grid} x {frames} frame(s) has {n0} "
                         "patches")
    if (assign < -1).any():
        raise ValueError(f"assign values must be >= -1 (-1 = dropped); got {int(assign.min())}")
    counts = np.bincount(assign[assign >= 0], minlength=1) if (assign >= 0).any() else np.zeros(1, np.int64)
    group = np.where(assign >= 0, counts[assign.clip(min=0)], 0).astype(np.int64)
    if (assign >= token_pos.shape[0]).any():
        raise ValueError(f"assign value {int(assign.max())} is not a token of the {token_pos.shape[0]} given")
    hw = grid[0] * grid[1]
    if token_pos.size == 0:  # no token at all: every patch dropped
        token_pos = np.full(1, -1, dtype=np.int64)
    home_pos = np.where(assign >= 0, token_pos[assign.clip(min=0)], -1)
    home = np.where(home_pos >= 0, home_pos // hw, -1).astype(np.int64)
    return grid, frames, assign, anchor, group, home


def _kept_count(tokens: VisualTokens | torch.Tensor | np.ndarray, grid=None, index: int = 0) -> int:
    if isinstance(tokens, VisualTokens):
        return int(tokens.counts[index])
    _, _, anchor, _ = patch_states(tokens, grid, index)
    return int(anchor.sum())


# ----------------------------------------------------------------------------------------------- drawing


def _cell_size(image: Image.Image, grid: tuple[int, int], cell: int | None, target: int = TARGET_SIDE) -> int:
    if cell is not None:
        if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
            raise ValueError(f"cell must be an int >= 1 (pixels per patch side); got {cell!r}")
        return cell
    native = min(image.width / grid[1], image.height / grid[0])
    return max(1, int(round(native)), math.ceil(target / max(grid)))


def _hatch(cell: int) -> np.ndarray:
    """``[cell, cell]`` bool: the diagonal hatching of one cross-frame patch (lines ``/`` every ``period`` px)."""
    period = max(4, cell // 4)
    width = max(1, cell // 12)
    yy, xx = np.mgrid[0:cell, 0:cell]
    return ((yy + xx) % period) < width


def _render(base: Image.Image, grid, assign, anchor, group, cell: int, foreign: np.ndarray | None = None
            ) -> Image.Image:
    """Draw one map; ``foreign [N0]`` bool (clips): patches merged into a token anchored in another frame, hatched
    with :data:`CROSS_FRAME` (:func:`_hatch`) over their tint."""
    gh, gw = grid
    size = (gw * cell, gh * cell)
    if base.size != size:
        # an integer upscale keeps each input pixel a crisp block; anything else is resampled smoothly
        exact = size[0] % base.width == 0 and size[1] % base.height == 0
        base = base.resize(size, Image.Resampling.NEAREST if exact else Image.Resampling.BICUBIC)
    arr = np.asarray(base, dtype=np.float32).copy()  # [gh*cell, gw*cell, 3]

    def up(per_patch: np.ndarray) -> np.ndarray:
        """[N0, ...] per patch -> [gh*cell, gw*cell, ...] per pixel."""
        g = per_patch.reshape(gh, gw, *per_patch.shape[1:])
        return np.repeat(np.repeat(g, cell, axis=0), cell, axis=1)

    dropped = up(assign < 0)
    arr[dropped] *= DIM_FACTOR

    merged = group > 1
    if merged.any():
        pal = np.asarray(PALETTE, dtype=np.float32)
        colour = up(pal[assign.clip(min=0) % len(pal)])
        alpha = up(np.where(merged, TINT_ALPHA, 0.0).astype(np.float32))[..., None]
        arr = arr * (1.0 - alpha) + colour * alpha

    yy = np.arange(gh * cell) % cell
    xx = np.arange(gw * cell) % cell
    if cell >= 4:
        # no grid line between two patches of the same merged group, so each group reads as one region
        g = np.where(merged, assign, -1).reshape(gh, gw)
        same_up = np.zeros((gh, gw), dtype=bool)
        same_up[1:] = (g[1:] == g[:-1]) & (g[1:] >= 0)
        same_left = np.zeros((gh, gw), dtype=bool)
        same_left[:, 1:] = (g[:, 1:] == g[:, :-1]) & (g[:, 1:] >= 0)
        line = ((yy == 0)[:, None] & ~up(same_up.reshape(-1))) | ((xx == 0)[None, :] & ~up(same_left.reshape(-1)))
        arr[line] *= GRID_SHADE
    width = max(1, cell // 12)
    band = ((yy < width) | (yy >= cell - width))[:, None] | ((xx < width) | (xx >= cell - width))[None, :]
    if foreign is not None and foreign.any():
        arr[np.tile(_hatch(cell), (gh, gw)) & up(foreign & ~anchor)] = CROSS_FRAME
    arr[band & up(anchor)] = OUTLINE
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def token_map(
    image: Any,
    tokens_or_result: Any,
    grid: tuple[int, int] | None = None,
    *,
    index: int = 0,
    cell: int | None = None,
    cols: int | None = None,
) -> Image.Image:
    """Draw which patches of ``image`` were kept, merged and dropped (see the module docstring for the look).

    Args:
        image: the input image: ``PIL.Image``, numpy ``uint8 (H, W, 3)`` or a ``(3, H, W)`` tensor (see
            :func:`to_pil`).
        tokens_or_result: what to draw:

            * :class:`VisualTokens` after a projector/encoder-stage method (image ``index`` of the batch);
            * a kept mask ``[N0] bool`` or an assignment ``[N0] long`` over the original patches;
            * an object with a ``tokens`` attribute holding one of the above (a compression result);
            * several stages, drawn as panels side by side with a title above each: a list of
              ``(title, tokens)`` pairs, or a dict ``{layer: kept}`` (decoder-stage methods: one panel per
              pruning layer, titled ``layer K: n kept``).
        grid: ``(H, W)`` patch grid, needed only for plain masks of a non-square grid.
        index: batch row of ``VisualTokens`` to draw.
        cell: side of one patch in output pixels; default: the patch's size in ``image``, enlarged so the
            map's long side is at least :data:`TARGET_SIDE` px. With ``image`` of exactly ``grid * cell``
            pixels the image is not resampled, so a kept patch's inside is the input pixels unchanged.
        cols: panels per row for several stages (default: all in one row, at most 4).

    Returns:
        An RGB ``PIL.Image`` of ``(grid[1] * cell, grid[0] * cell)`` pixels (one stage), or the
        :func:`panel_grid` of the stages.
    """
    base = to_pil(image)
    if isinstance(tokens_or_result, Mapping):
        stages = [(f"layer {k}: {_kept_count(v, grid, index)} kept", v) for k, v in tokens_or_result.items()]
        return _stages(base, stages, grid, index, cell, cols)
    if isinstance(tokens_or_result, (list, tuple)):
        stages = []
        for item in tokens_or_result:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"several stages must be given as (title, tokens) pairs; got {type(item).__name__}")
            stages.append((item[0], item[1]))
        return _stages(base, stages, grid, index, cell, cols)
    tokens = tokens_or_result
    if not isinstance(tokens, (VisualTokens, torch.Tensor, np.ndarray)) and hasattr(tokens, "tokens"):
        tokens = tokens.tokens
        if isinstance(tokens, (list, tuple)):
            tokens = tokens[index]
            index = 0
    if not isinstance(tokens, (VisualTokens, torch.Tensor, np.ndarray)):
        raise ValueError(
            "tokens_or_result must be VisualTokens, a kept mask [N0] bool, an assignment [N0] long, a list of "
            f"(title, tokens) or a dict layer -> kept mask; got {type(tokens_or_result).__name__}"
        )
    g, assign, anchor, group = patch_states(tokens, grid, index)
    return _render(base, g, assign, anchor, group, _cell_size(base, g, cell))


def _stages(base, stages, grid, index, cell, cols) -> Image.Image:
    if not stages:
        raise ValueError("no stages to draw: the list / dict of stages is empty")
    panels = [(title, token_map(base, t, grid, index=index, cell=cell)) for title, t in stages]
    return panel_grid(panels, cols if cols is not None else min(len(panels), 4))


# ----------------------------------------------------------------------------------------------- panels


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        words, cur = para.split(" "), ""
        for w in words:
            trial = w if not cur else f"{cur} {w}"
            if cur and font.getlength(trial) > width:
                lines.append(cur)
                cur = w
            else:
                cur = trial
        lines.append(cur)
    return lines


def panel_grid(
    panels: Sequence[tuple[str, Image.Image]],
    cols: int | None = None,
    *,
    pad: int = 8,
    font_size: int = 13,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Lay ``panels`` (title, image) out in a grid, each title above its panel (PIL's default font).

    Every cell is as large as the largest panel; titles are wrapped to the cell width. The result is
    ``cols * cw + (cols + 1) * pad`` wide and ``rows * (th + ch) + (rows + 1) * pad`` high, with ``cw x ch`` the
    largest panel, ``th`` the height of the tallest (wrapped) title and ``rows = ceil(len(panels) / cols)``.
    Panel ``i`` is pasted unchanged at ``(pad + c * (cw + pad), pad + r * (th + ch + pad) + th)`` with
    ``r, c = divmod(i, cols)``.
    """
    if not panels:
        raise ValueError("panel_grid needs at least one (title, image) panel; got none")
    n = len(panels)
    cols = min(n, 4) if cols is None else cols
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise ValueError(f"cols must be an int >= 1; got {cols!r}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    images = []
    for title, im in panels:
        if not isinstance(title, str):
            raise ValueError(f"panel titles must be strings; got {type(title).__name__}")
        images.append(to_pil(im))
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    font = _font(font_size)
    asc, desc = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 2)
    line_h = asc + desc + 2
    wrapped = [_wrap(t, font, cw) if t else [] for t, _ in panels]
    th = max(len(w) for w in wrapped) * line_h + (4 if any(wrapped) else 0)
    out = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * (th + ch) + (rows + 1) * pad), background)
    draw = ImageDraw.Draw(out)
    for i, (lines, im) in enumerate(zip(wrapped, images, strict=True)):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (cw + pad), pad + r * (th + ch + pad)
        for j, line in enumerate(lines):
            draw.text((x0, y0 + j * line_h), line, fill=(0, 0, 0), font=font)
        out.paste(im, (x0, y0 + th))
    return out


def panel_title(method: str, budget: Any, kept: int, total: int) -> str:
    """``"<method>  budget <b>\\n<kept> / <total> tokens kept"``, the title of one method's panel."""
    return f"{method}  budget {budget}\n{kept} / {total} tokens kept"


# ----------------------------------------------------------------------------------------------- clips


def _frame_list(frames: Any, t: int) -> list[Image.Image]:
    if isinstance(frames, (torch.Tensor, np.ndarray)) and frames.ndim == 4:
        frames = list(frames)  # [T, 3, H, W] tensor / [T, H, W, 3] array: one image per frame
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise ValueError(f"frames must be a sequence of T images (PIL / array / tensor); got {type(frames).__name__}")
    if len(frames) != t:
        raise ValueError(f"{len(frames)} frame image(s) given for a clip of frames={t}; give one image per frame")
    return [to_pil(f) for f in frames]


def _with_text(body: Image.Image, top: list[str], bottom: list[str], pad: int, font_size: int,
               background: tuple[int, int, int]) -> Image.Image:
    """``body`` with the (wrapped) lines ``top`` above and ``bottom`` below it, ``pad`` px around each block."""
    font = _font(font_size)
    asc, desc = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 2)
    line_h = asc + desc + 2
    width = max(1, body.width - 2 * pad)
    top_l = [w for t in top for w in _wrap(t, font, width)]
    bot_l = [w for t in bottom for w in _wrap(t, font, width)]
    top_h = len(top_l) * line_h + (pad if top_l else 0)
    bot_h = len(bot_l) * line_h + (pad if bot_l else 0)
    out = Image.new("RGB", (body.width, top_h + body.height + bot_h), background)
    out.paste(body, (0, top_h))
    draw = ImageDraw.Draw(out)
    for j, line in enumerate(top_l):
        draw.text((pad, pad + j * line_h), line, fill=(0, 0, 0), font=font)
    for j, line in enumerate(bot_l):
        draw.text((pad, top_h + body.height + j * line_h), line, fill=(0, 0, 0), font=font)
    return out


def clip_panels(
    frames: Any,
    tokens: VisualTokens,
    index: int = 0,
    cell: int | None = None,
) -> list[tuple[str, Image.Image]]:
    """The frames of a clip as ``(caption, token map)`` panels, the panels of :func:`clip_strip`.

    Frame ``t``'s map is :func:`token_map`'s look on frame ``t``'s image, with group sizes counted over the whole
    clip, and every patch merged into a token anchored in ANOTHER frame (temporal merging) tinted with that
    token's colour (the colour of its anchor's group in the anchor's frame) and hatched with :data:`CROSS_FRAME`
    diagonals. Caption: ``"frame t\\nk kept"`` (``k`` tokens anchored in frame ``t``), plus ``", m merged into
    earlier"`` (or ``"into other"`` when some anchor lies in a later frame) for the ``m`` cross-frame patches.
    """
    if not isinstance(tokens, VisualTokens):
        raise ValueError(f"clip tokens must be VisualTokens (frames = T); got {type(tokens).__name__}")
    grid, t_, assign, anchor, group, home = _clip_states(tokens, None, index, True)
    images = _frame_list(frames, t_)
    c = _cell_size(images[0], grid, cell, STRIP_SIDE)
    hw = grid[0] * grid[1]
    frame_of_patch = np.arange(t_ * hw) // hw
    foreign = (home >= 0) & (home != frame_of_patch)
    kept_in = np.bincount(np.flatnonzero(anchor) // hw, minlength=t_)
    panels = []
    for t, image in enumerate(images):
        cut = slice(t * hw, (t + 1) * hw)
        f = foreign[cut]
        caption = f"frame {t}\n{int(kept_in[t])} kept"
        if f.any():
            later = bool((home[cut][f] > t).any())
            caption += f", {int(f.sum())} merged into {'other' if later else 'earlier'}"
        panels.append((caption, _render(image, grid, assign[cut], anchor[cut], group[cut], c, f)))
    return panels


def clip_strip(
    frames: Any,
    tokens: VisualTokens,
    index: int = 0,
    cell: int | None = None,
    *,
    cols: int | None = None,
    title: str | None = None,
    legend: bool = True,
    pad: int = 8,
    font_size: int = 13,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Draw a clip's kept / merged / dropped tokens as a strip of its frames.

    Args:
        frames: the ``T`` frame images (a sequence of PIL images / arrays / tensors, see :func:`to_pil`, or one
            ``[T, 3, H, W]`` tensor / ``[T, H, W, 3]`` array).
        tokens: clip :class:`VisualTokens` (``frames = T``, ``pos`` / ``assign`` over the clip frame after frame);
            row ``index`` is drawn.
        cell: side of one patch in output pixels; default: the patch's size in the frame image, enlarged so one
            frame's long side is at least :data:`STRIP_SIDE` px.
        cols: frames per row (default: all ``T`` in one row up to 8, wrapped into rows of 8 beyond).
        title: the line above the strip; default ``"T frames: k / N0 tokens kept"``.
        legend: the legend below the strip (one line per mark; the cross-frame line only when some patch is
            merged into a token of another frame).

    Every frame is drawn as :func:`clip_panels` describes (outlined anchors, tinted merged groups, hatched
    cross-frame merges, dimmed drops) and the frames are laid out by :func:`panel_grid` (``pad``, ``font_size``,
    ``background``) with their captions; the result is that grid, exactly as wide, with the title above and the
    legend below (each block ``pad`` px from its neighbour).
    """
    panels = clip_panels(frames, tokens, index, cell)
    t_ = len(panels)
    cols = min(t_, 8) if cols is None else cols
    body = panel_grid(panels, cols, pad=pad, font_size=font_size, background=background)
    if title is None:
        title = f"{t_} frames: {int(tokens.counts[index])} / {tokens.num_patches} tokens kept"
    bottom: list[str] = []
    if legend:
        _, _, assign, _, _, home = _clip_states(tokens, None, index, True)
        hw = tokens.frame_patches
        cross = (home >= 0) & (home != np.arange(assign.shape[0]) // hw)
        later = bool((home[cross] > np.flatnonzero(cross) // hw).any())
        bottom = ["white outline: a kept token (its own patch)",
                  "tint (one colour per token): merged into a token",
                  "dimmed: dropped"]
        if cross.any():
            bottom.insert(2, "black hatching over the tint: merged into a token of "
                          + ("another frame" if later else "an earlier frame"))
    return _with_text(body, [title] if title else [], bottom, pad, font_size, background)
