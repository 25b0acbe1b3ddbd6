"""Token maps: draw, over the input image, which patches a method keeps, merges and drops.

A token map is the image resized so that each patch of the original ``grid`` is a ``cell`` x ``cell`` pixel
square, with

* the patch grid drawn as thin dark lines (each cell's top and left pixel row darkened by :data:`GRID_SHADE`),
  left out between two patches of the same merged group, so a group reads as one region;
* every **dropped** patch (``assign == -1``) dimmed towards black: its pixels are multiplied by
  :data:`DIM_FACTOR` (0.3, i.e. 70 % of the way to black), so what was thrown away stays legible;
* every **merged** group (several patches assigned to the same output token) tinted with its own colour:
  ``pixel = (1 - TINT_ALPHA) * pixel + TINT_ALPHA * colour``, the colour ``PALETTE[token % len(PALETTE)]``
  (a fixed palette, so the same result always gives the same picture; 17 colours, a prime, so neighbouring
  groups left/right and above/below get different colours for any grid width that is not a multiple of 17);
* every **kept** token outlined (a :data:`OUTLINE` band ``max(1, cell // 12)`` px wide along the inside of the
  border of its anchor patch ``pos``, the place the LLM sees it); the inside of a kept single patch is the
  input image, untouched.

Inputs are the provenance fields of :class:`~vtcompress.tokens.VisualTokens` (``assign [B, N0]``, ``pos``,
``mask``, ``grid``), a plain kept mask ``[N0] bool``, or an assignment ``[N0] long``; decoder-stage methods
(pruning inside the LLM at one or several layers) give one panel per pruning layer, drawn side by side by
:func:`panel_grid` with a title above each.

The command line ``vtcompress show`` (:func:`show_main`) runs a method on a model (the embedded testbed by
default, or any supported model saved in a local directory) and writes the map as a PNG.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .compressor import parse_budget
from .tokens import VisualTokens

__all__ = [
    "DIM_FACTOR",
    "TINT_ALPHA",
    "GRID_SHADE",
    "OUTLINE",
    "PALETTE",
    "to_pil",
    "patch_states",
    "token_map",
    "panel_grid",
    "panel_title",
    "gallery",
    "show_main",
    "load_model",
    "model_inputs",
    "method_stages",
    "pixel_tokens",
    "model_view",
    "LoadedModel",
    "method_panels",
    "default_methods",
    "DEFAULT_METHODS",
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


def _open_image(path: str | Path) -> Image.Image:
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
) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """Per original patch: which token it went to, whether it is a kept token's anchor, its group size.

    Args:
        tokens: :class:`VisualTokens` (image ``index`` of the batch is drawn), a kept mask ``[N0]`` /
            ``[1, N0]`` bool (kept patches are their own tokens), or an assignment ``[N0]`` / ``[1, N0]`` long
            (output token per patch, ``-1`` dropped; a group's anchor is its first patch in raster order).
        grid: ``(H, W)`` of the original patch grid; taken from ``VisualTokens.grid``; default for plain
            masks: square.
        index: batch row of ``VisualTokens`` to draw.

    Returns:
        ``grid``, ``assign [N0]`` int64 (``-1`` dropped), ``anchor [N0]`` bool (kept tokens' anchor patches) and
        ``group [N0]`` int64 (number of patches of the token each patch went to; 0 for dropped patches).
    """
    if isinstance(tokens, VisualTokens):
        if not 0 <= index < tokens.batch_size:
            raise ValueError(f"index={index} is out of range for a batch of {tokens.batch_size} image(s)")
        if grid is not None and tuple(grid) != tuple(tokens.grid):
            raise ValueError(f"grid={tuple(grid)} does not match the tokens' grid {tokens.grid}")
        grid = tokens.grid
        assign = tokens.assign[index].detach().cpu().numpy().astype(np.int64)
        pos = tokens.pos[index][tokens.mask[index]].detach().cpu().numpy().astype(np.int64)
        n0 = grid[0] * grid[1]
        anchor = np.zeros(n0, dtype=bool)
        anchor[pos[(pos >= 0) & (pos < n0)]] = True
    else:
        arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise ValueError(f"a kept mask / assignment must have shape [N0] or [1, N0]; got {arr.shape}")
        n0 = arr.shape[0]
        grid = _square(n0, "the kept mask") if grid is None else (int(grid[0]), int(grid[1]))
        if grid[0] * grid[1] != n0:
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
        _, first = np.unique(assign[valid], return_index=True)
        anchor[valid[first]] = True
    if assign.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"assign has {assign.shape[0]} entries but grid {grid} has {grid[0] * grid[1]} patches")
    if (assign < -1).any():
        raise ValueError(f"assign values must be >= -1 (-1 = dropped); got {int(assign.min())}")
    counts = np.bincount(assign[assign >= 0], minlength=1) if (assign >= 0).any() else np.zeros(1, np.int64)
    group = np.where(assign >= 0, counts[assign.clip(min=0)], 0).astype(np.int64)
    return grid, assign, anchor, group


def _kept_count(tokens: VisualTokens | torch.Tensor | np.ndarray, grid=None, index: int = 0) -> int:
    if isinstance(tokens, VisualTokens):
        return int(tokens.counts[index])
    _, _, anchor, _ = patch_states(tokens, grid, index)
    return int(anchor.sum())


# ----------------------------------------------------------------------------------------------- drawing


def _cell_size(image: Image.Image, grid: tuple[int, int], cell: int | None) -> int:
    if cell is not None:
        if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
            raise ValueError(f"cell must be an int >= 1 (pixels per patch side); got {cell!r}")
        return cell
    native = min(image.width / grid[1], image.height / grid[0])
    return max(1, int(round(native)), math.ceil(TARGET_SIDE / max(grid)))


def _render(base: Image.Image, grid, assign, anchor, group, cell: int) -> Image.Image:
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



# ----------------------------------------------------------------------------------------------- models

#: prompt used when the user gives none (text-guided methods read it): neutral, so that a photo is not asked a
#: testbed question; every word is in the testbed's vocabulary. ``vtcompress show --sample N`` asks sample N's
#: own question instead.
DEFAULT_QUESTION = "what is there ?"
#: ``--model none``: the image is cut into this many pixels per patch side and the raw patches are the features.
PIXEL_PATCH = 8


@dataclass
class LoadedModel:
    """A model ready to compress one image, and how to build its inputs.

    Attributes:
        model: a stock ``...ForConditionalGeneration`` in eval mode.
        tokenizer: testbed-style tokenizer (no processor): images are resized to ``image_size`` and normalised
            like ``vtcompress.testbed.encode``.
        processor: the model's ``AutoProcessor``, used instead when present.
        image_size: square input side of the vision tower (tokenizer route).
        name: where it came from, for messages.
    """

    model: Any
    tokenizer: Any = None
    processor: Any = None
    image_size: int | None = None
    name: str = ""


def load_model(spec: str = "testbed", device: str = "cpu") -> LoadedModel | None:
    """``"testbed"`` (the shipped weights), ``"none"`` (no model: pixel patches are the features), or a local
    directory holding a saved supported model (``from_pretrained``), with an ``AutoProcessor`` or, for a
    testbed-style directory, just a tokenizer."""
    if spec == "none":
        return None
    if spec == "testbed":
        from .testbed.model import WEIGHTS_DIR, load_testbed

        if not (WEIGHTS_DIR / "config.json").is_file():
            raise ValueError(
                f"the testbed weights are not installed ({WEIGHTS_DIR} has no config.json); train them with "
                "`vtcompress testbed train`, or pass --model DIR (a saved model) or --model none"
            )
        model, tok = load_testbed(device=device)
        return LoadedModel(model, tokenizer=tok, image_size=int(model.config.vision_config.image_size), name="testbed")
    path = Path(spec)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"--model {spec!r}: expected 'testbed', 'none' or a local directory with a saved model (config.json)"
        )
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(str(path)).to(device).eval()
    has_processor = any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    if has_processor:
        return LoadedModel(model, processor=AutoProcessor.from_pretrained(str(path)), name=path.name)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    vision = getattr(model.config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{spec!r} has no processor config and its vision config gives no square image_size")
    return LoadedModel(model, tokenizer=tok, image_size=size, name=path.name)


def model_inputs(loaded: LoadedModel, image: Image.Image, question: str = DEFAULT_QUESTION) -> dict[str, torch.Tensor]:
    """The inputs of one (image, question) for ``loaded``'s model, built like its training / processor does.

    Testbed-style models (no processor): the image resized to the tower's ``image_size`` (bicubic) and
    CLIP-normalised exactly as ``vtcompress.testbed.encode`` does, with the testbed prompt.
    """
    model = loaded.model
    if loaded.processor is not None:
        proc = loaded.processor
        text = None
        if getattr(proc, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = proc.apply_chat_template(messages, add_generation_prompt=True)
        if text is None:
            token = getattr(proc, "image_token", None) or "<image>"
            text = f"{token}\n{question}"
        enc = proc(images=[image], text=[text], return_tensors="pt")
        return {k: v.to(model.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
    from .testbed.model import build_prompt, pixel_values_from_images

    size = loaded.image_size
    arr = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC) if image.size != (size, size) else image)
    n_img = int(getattr(model.config, "image_seq_length", 0) or 0)
    if n_img <= 0:
        raise ValueError("the model config has no image_seq_length; save it with an AutoProcessor instead")
    enc = loaded.tokenizer([build_prompt(question, n_img)], return_tensors="pt", add_special_tokens=False)
    dtype = next(model.parameters()).dtype
    return {
        "input_ids": enc["input_ids"].to(model.device),
        "attention_mask": enc["attention_mask"].to(model.device),
        "pixel_values": pixel_values_from_images([arr]).to(device=model.device, dtype=dtype),
    }


def pixel_tokens(image: Image.Image, grid: tuple[int, int], patch: int = PIXEL_PATCH) -> VisualTokens:
    """No model: ``VisualTokens`` whose features are the raw RGB patches, ``x [1, H*W, 3*patch*patch]`` in [0, 1]."""
    gh, gw = grid
    arr = np.asarray(image.resize((gw * patch, gh * patch), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    x = arr.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(1, gh * gw, -1)
    return VisualTokens.from_features(torch.from_numpy(np.ascontiguousarray(x)), grid=grid)


def _no_model_check(method) -> None:
    if method.stage != "projector":
        raise ValueError(
            f"method {method.name!r} acts in the {method.stage} stage and needs a model; --model none only gives "
            "pixel features (use --model testbed or --model DIR)"
        )
    if method.needs:
        raise ValueError(
            f"method {method.name!r} needs the {', '.join(repr(s) for s in method.needs)} signal from a model; "
            "--model none only gives pixel features (use --model testbed or --model DIR)"
        )


def _stages_of(result: Any) -> list[tuple[str, Any, int]]:
    """Normalise what a compression returned into ``[(stage title or "", tokens or kept mask, view), ...]``."""
    if isinstance(result, VisualTokens):
        return [("", result, 0)]
    if isinstance(result, Mapping):
        return [(f"layer {k}", v, 0) for k, v in result.items()]
    if isinstance(result, (list, tuple)):
        return [(str(item[0]), item[1], int(item[2]) if len(item) > 2 else 0) for item in result]
    raise ValueError(f"cannot draw a compression result of type {type(result).__name__}")


def method_stages(
    loaded: LoadedModel | None,
    method,
    image: Image.Image,
    question: str = DEFAULT_QUESTION,
    grid: tuple[int, int] = (12, 12),
    inputs: dict[str, torch.Tensor] | None = None,
) -> list[tuple[str, Any, int]]:
    """Run ``method`` (a built :class:`~vtcompress.compressor.Compressor`) on one image.

    Returns ``[(stage title, tokens, view)]``: one entry for a projector / encoder-stage method (title ``""``),
    one per pruning layer for a decoder-stage method (``"layer K"``); models with several views per image
    (anyres grids, tiles) give one entry per view (``"view v"``, ``"layer K, view v"``). ``loaded`` is
    ``None`` for no model (pixel features on ``grid``; methods needing a model signal raise ``ValueError``).
    ``inputs``: the model inputs of ``image`` if already built by :func:`model_inputs`.
    """
    if loaded is None:
        _no_model_check(method)
        return _stages_of(method(pixel_tokens(image, grid)))
    inputs = model_inputs(loaded, image, question) if inputs is None else inputs
    return _stages_of(_compress_with_model(loaded.model, method, inputs))


def model_view(
    loaded: LoadedModel | None,
    image: Image.Image,
    inputs: dict[str, torch.Tensor] | None,
    view: int = 0,
    num_views: int = 1,
) -> Image.Image:
    """The image as the model saw it in ``view`` (of ``num_views``), to draw that view's map on.

    With a processor that hands the model whole crops (``pixel_values [.., crops, 3, H, W]``: CLIP's centre
    crop, InternVL tiles, the base crop of anyres models), the view's crop un-normalised with the processor's
    mean and std: view ``v`` is crop ``v`` when there are as many views as crops (tiles), else view 0 is the
    first crop and later views (anyres high-resolution grids, which span the image) the input image. Without
    a processor (testbed: a plain resize) or with flattened patches (Qwen2-VL), the input image.
    """
    if loaded is None or loaded.processor is None or inputs is None:
        return image
    pv = inputs.get("pixel_values")
    if not isinstance(pv, torch.Tensor) or pv.dim() not in (4, 5) or pv.shape[-3] != 3:
        return image
    crops = pv.reshape(-1, *pv.shape[-3:])
    if num_views == crops.shape[0]:
        crop = crops[view]
    elif view == 0:
        crop = crops[0]
    else:
        return image
    crop = crop.detach().float().cpu()
    ip = getattr(loaded.processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if mean is None or std is None:
        return to_pil(crop)  # min-max stretched
    crop = crop * torch.tensor(std).reshape(3, 1, 1) + torch.tensor(mean).reshape(3, 1, 1)
    return to_pil(crop.clamp(0, 1))


@torch.no_grad()
def _compress_with_model(model, method, inputs: dict[str, torch.Tensor]) -> Any:
    """Encoder / projector stage: ``compress_inputs`` and the image's ``VisualTokens`` (one per view: anyres
    models have a base view and a high-resolution view). Decoder stage: one kept mask per pruning layer."""
    if method.stage == "decoder":
        return _decoder_stages(model, method, inputs)
    from .models.apply import compress_inputs

    try:
        res = compress_inputs(model, method, **inputs)
    except ValueError:
        # e.g. pixel_unshuffle widens the features beyond what this model's LLM takes: the model cannot run
        # it, but which patches go where is still the method's decision on the model's features; draw that
        if method.stage != "projector" or method.needs:
            raise
        tokens = _features_only(model, method, inputs)
        if tokens is None:
            raise
        return [("features only", tokens, 0)]
    views = res.tokens[0] if res.tokens else []
    if not views:
        raise ValueError(f"{type(model).__name__} returned no visual tokens for the image")
    if len(views) == 1:
        return views[0]
    return [(f"view {i}", v, i) for i, v in enumerate(views)]


def _features_only(model, method, inputs: dict[str, torch.Tensor]) -> VisualTokens | None:
    """``method`` applied to the first image's features when they form one plain grid (``None`` otherwise)."""
    feats, layout = _first_image_features(model, inputs)
    grid = layout.grids[0]
    if len(layout.grids) != 1 or bool(layout.sep.any()) or feats.shape[0] != grid[0] * grid[1]:
        return None
    return method(VisualTokens.from_features(feats[None].float(), grid=grid))


def _first_image_features(model, inputs: dict[str, torch.Tensor]):
    """The first image's features ``[L, D]`` (the model's own ``get_image_features``) and the adapter's
    :class:`~vtcompress.models.apply.ImageLayout` of them: for each placeholder token, the view (base grid,
    high-resolution grid, tile) and the patch it stands for."""
    from .models.apply import adapter_for

    adapter = adapter_for(model)
    out = adapter.base(model).get_image_features(**adapter.encoder_kwargs(model, inputs))
    feats = adapter.features(model, inputs, out)
    return feats[0], adapter.layouts(model, inputs, feats)[0]


def _decoder_stages(model, method, inputs: dict[str, torch.Tensor]) -> list[tuple[str, VisualTokens]]:
    """Run one prefill with the decoder-stage ``method`` attached.

    Returns, per pruning layer (and per view of the first image, for anyres / tiled models), the patches
    whose placeholder tokens are still in the sequence from that layer on, as a selection of the view's full
    grid (without a projector-stage method, each placeholder is one patch; row separators are not drawn).
    """
    from .models.decoder import attach_decoder, visual_token_ids

    _, layout = _first_image_features(model, inputs)
    ids = inputs["input_ids"]
    vis = torch.isin(ids[0], torch.tensor(visual_token_ids(model.config), device=ids.device))
    n = layout.view.shape[0]
    vis_pos = vis.nonzero().squeeze(1)[:n]  # the first image's placeholders come first
    if vis_pos.numel() != n:
        raise ValueError(f"the prompt has {vis_pos.numel()} image placeholders, fewer than the {n} features of "
                         "its first image")
    view, patch = layout.view.cpu(), layout.patch.cpu()
    stages = []
    with attach_decoder(model, [method]) as handle:
        model(**inputs)
        for i, stage in enumerate(handle.stages):
            kept = torch.isin(vis_pos, handle.kept_visual(i)[0].to(vis_pos.device)).cpu() & (patch >= 0)
            for v, grid in enumerate(layout.grids):
                idx = patch[kept & (view == v)].sort().values
                # as VisualTokens (a selection of the view's full grid), so the stage carries its grid
                full = VisualTokens.from_features(torch.zeros(1, grid[0] * grid[1], 1), grid=grid)
                title = f"layer {stage.layer}" + (f", view {v}" if len(layout.grids) > 1 else "")
                stages.append((title, full.select(idx[None]), v))
    return stages


# ----------------------------------------------------------------------------------------------- gallery / CLI


def _as_loaded(model, tokenizer) -> LoadedModel | None:
    if model is None or isinstance(model, LoadedModel):
        return model
    if tokenizer is not None and hasattr(tokenizer, "image_processor"):
        return LoadedModel(model, processor=tokenizer)
    size = getattr(getattr(model.config, "vision_config", None), "image_size", None)
    return LoadedModel(model, tokenizer=tokenizer, image_size=size if isinstance(size, int) else None)


def _build_all(methods: Sequence[Any], budget, params: dict | None) -> list:
    """Build every method; ``params`` keys are ``"key"`` (every method with that field) or ``"method.key"``.

    A parameter no listed method has raises ``ValueError`` (a typo must not pass silently).
    """
    import dataclasses

    from .compressor import _REGISTRY, Compressor, _load_builtin_methods, get, unknown_method_message

    _load_builtin_methods()
    defaults = []
    for m in methods:
        if not isinstance(m, (str, Compressor)):
            raise ValueError(f"methods are given by name or as Compressor instances; got {type(m).__name__}")
        if isinstance(m, str) and m not in _REGISTRY:
            raise ValueError(unknown_method_message(m))
        defaults.append(m if isinstance(m, Compressor) else _REGISTRY[m])  # fields and name, nothing built yet
    params = dict(params or {})
    names = [d.name for d in defaults]
    used: set[str] = set()
    built = []
    for m, d in zip(methods, defaults, strict=True):
        fields = {f.name for f in dataclasses.fields(d) if f.init}
        mine = {}
        for key, value in params.items():
            prefix, dot, field = key.rpartition(".")
            if dot and prefix == d.name:
                mine[field] = value  # get() rejects a field the method lacks, naming its fields
                used.add(key)
            elif not dot and key in fields:
                mine[key] = value
                used.add(key)
        if budget is not None and not (isinstance(m, Compressor) and m.budget == budget):
            mine.setdefault("budget", budget)
        # an instance is used as given when nothing changes: rebuilding it would re-initialise trained modules
        built.append(get(m, **mine) if mine or not isinstance(m, Compressor) else m)
    unused = [k for k in params if k not in used]
    if unused:
        raise ValueError(
            f"parameter(s) {', '.join(unused)} match no method among {', '.join(names)} "
            "(give KEY=VALUE for a field of a method, or METHOD.KEY=VALUE)"
        )
    return built


def method_panels(
    loaded: LoadedModel | None,
    image: Image.Image,
    methods: Sequence[Any],
    budget: int | float | None,
    question: str = DEFAULT_QUESTION,
    grid: tuple[int, int] = (12, 12),
    params: dict | None = None,
    cell: int | None = None,
    input_panel: bool = False,
    skip_errors: bool = False,
) -> list[tuple[str, Image.Image]]:
    """One titled token map per method (and per pruning layer of a decoder-stage method); with
    ``input_panel`` first the image as the model saw it, titled with the question.

    ``skip_errors``: a method that raises ``ValueError`` / ``NotImplementedError`` while running (e.g. a budget
    its structure cannot reach on this model) gets a fully dimmed panel titled with the reason instead of
    stopping the whole grid. Unknown names and parameters always raise.
    """
    built = _build_all(methods, budget, params)  # bad names / parameters fail before any model run
    inputs = model_inputs(loaded, image, question) if loaded is not None else None
    shown = model_view(loaded, image, inputs)
    panels: list[tuple[str, Image.Image | None]] = []
    for method in built:
        try:
            stages = method_stages(loaded, method, image, question, grid, inputs)
        except (ValueError, NotImplementedError) as exc:
            if not skip_errors:
                raise
            reason = str(exc) if len(str(exc)) <= 90 else str(exc)[:87] + "..."
            panels.append((f"{method.name}  budget {method.budget}\nnot drawn: {reason}", None))
            continue
        num_views = max(v for _, _, v in stages) + 1
        for stage, tokens, v in stages:
            g, _, anchor, _ = patch_states(tokens)
            kept = int(tokens.counts[0]) if isinstance(tokens, VisualTokens) else int(anchor.sum())
            label = method.name + (" [untrained]" if getattr(method, "untrained", False) else "")
            title = panel_title(label + (f" ({stage})" if stage else ""), method.budget, kept, g[0] * g[1])
            view_image = shown if v == 0 else model_view(loaded, image, inputs, v, num_views)
            panels.append((title, token_map(view_image, tokens, cell=cell)))
    drawn = [im for _, im in panels if im is not None]
    size = drawn[0].size if drawn else (TARGET_SIDE, TARGET_SIDE)
    exact = size[0] % shown.width == 0 and size[1] % shown.height == 0
    plain = shown.resize(size, Image.Resampling.NEAREST if exact else Image.Resampling.BICUBIC)
    dimmed = Image.fromarray(np.rint(np.asarray(plain, dtype=np.float32) * DIM_FACTOR).astype(np.uint8), "RGB")
    out = [(t, im if im is not None else dimmed) for t, im in panels]
    if input_panel:
        out.insert(0, (f"input\n{question}" if loaded is not None else "input", plain))
    return out


def gallery(
    model,
    tokenizer,
    image: Any,
    methods: Sequence[Any],
    budget: int | float,
    *,
    question: str = DEFAULT_QUESTION,
    cols: int | None = None,
    cell: int | None = None,
    params: dict[str, Any] | None = None,
    skip_errors: bool = False,
) -> Image.Image:
    """Every method in ``methods`` at one ``budget`` on one image, as a titled grid of token maps.

    ``model, tokenizer``: a loaded VLM and its tokenizer (testbed-style) or processor; ``model=None`` runs the
    methods on pixel features (those needing a model signal raise ``ValueError``). ``image``: see
    :func:`to_pil`. Each panel is titled with the method, the budget and the tokens kept; a decoder-stage
    method gives one panel per pruning layer. ``params``: hyper-parameters, ``{"key": v}`` for every method
    with that field or ``{"method.key": v}`` for one. ``skip_errors``: a method that cannot run here gets a
    dimmed panel titled with the reason instead of raising (see :func:`method_panels`).
    """
    pil = to_pil(image)
    panels = method_panels(_as_loaded(model, tokenizer), pil, methods, budget, question, params=params, cell=cell,
                           skip_errors=skip_errors)
    return panel_grid(panels, cols if cols is not None else min(len(panels), 4))


def _parse_grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--grid {text!r}: expected HxW with positive integers, e.g. 12x12")
    return int(parts[0]), int(parts[1])


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    import ast

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE, e.g. fastv.layer=2")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return params


def show_main(argv: list[str] | None = None) -> int:
    """``vtcompress show``: draw which tokens a method keeps, merges and drops; write a PNG. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="vtcompress show",
        description="Draw which patches a compression method keeps (outlined), merges (one colour per merged "
        "group) and drops (dimmed) over an image, and write the map as a PNG.",
    )
    parser.add_argument("image", nargs="?", help="input image (PNG/JPEG); omit with --sample")
    parser.add_argument("--method", help="one method (see `vtcompress list`)")
    parser.add_argument("--methods", help="several methods, comma separated: a side-by-side grid")
    parser.add_argument("--budget", default="0.25", help="tokens kept per image (int) or fraction (float); 0.25")
    parser.add_argument("--model", default="testbed", help="'testbed' (default), 'none' (pixel features, no "
                        "model) or a local directory with a saved supported model")
    parser.add_argument("--out", default="token_map.png", help="output PNG (default token_map.png)")
    parser.add_argument("--sample", type=int, help="draw testbed test image N (and ask its question)")
    parser.add_argument("--question", help="prompt for text-guided methods (default: the sample's question with "
                        f"--sample, else the neutral {DEFAULT_QUESTION!r})")
    parser.add_argument("--grid", default="12x12", help="patch grid HxW for --model none (default 12x12)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyper-parameter, repeatable: KEY=VALUE (every method with that field) or "
                        "METHOD.KEY=VALUE (e.g. --param fastv.layer=3)")
    parser.add_argument("--cols", type=int, help="panels per row (default up to 4)")
    parser.add_argument("--cell", type=int, help="pixels per patch side in the map")
    parser.add_argument("--input-panel", action="store_true", help="first panel: the image as the model saw it")
    parser.add_argument("--skip-errors", action="store_true", help="a method that cannot run gets a dimmed panel "
                        "with the reason instead of stopping (always on when no method is named)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage and the error
        return int(exc.code or 0)
    try:
        path = _show(args)
    except ValueError as exc:
        print(f"vtcompress show: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _show(args) -> Path:
    from .compressor import list_methods

    if args.method and args.methods:
        raise ValueError("give --method NAME or --methods a,b,c, not both")
    if (args.image is None) == (args.sample is None):
        raise ValueError("give an IMAGE path or --sample N (a testbed test image), exactly one of them")
    budget = parse_budget(args.budget)
    grid = _parse_grid(args.grid)
    params = _parse_params(args.param)
    named = bool(args.methods or args.method)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    elif args.method:
        methods = [args.method]
    else:
        methods = default_methods()
    if not methods:
        raise ValueError(f"no method to draw; registered methods: {', '.join(list_methods()) or 'none'}")
    path = Path(args.out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out!r}: the map is written as PNG; give a path ending in .png")
    question = args.question
    if args.sample is not None:
        from .testbed.data import SKILLS, make_sample, sample_seed

        if args.sample < 0:
            raise ValueError(f"--sample {args.sample} is out of range: a test image index is >= 0")
        s = make_sample(sample_seed("test", args.sample), SKILLS[args.sample % len(SKILLS)])
        image, question = Image.fromarray(s.image, "RGB"), question or s.question
    else:
        image = _open_image(args.image)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: give a number of CPU threads >= 1")
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    if args.model == "testbed":
        methods = [_shipped_checkpoint(m, budget, params) for m in methods]
    panels = method_panels(loaded, image, methods, budget, question or DEFAULT_QUESTION, grid, params, args.cell,
                           input_panel=args.input_panel, skip_errors=args.skip_errors or not named)
    cols = args.cols if args.cols is not None else min(len(panels), 4)
    out = panel_grid(panels, cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, format="PNG")
    return path


def _shipped_checkpoint(name: str, budget, params: dict):
    """On the testbed: a trainable method whose checkpoint ships for exactly ``budget`` (and that no ``--param``
    configures) is loaded from it; anything else stays a name (a trainable one then needs a checkpoint or
    ``--param pretrained=False``, whose map is titled ``[untrained]``)."""
    import dataclasses

    from .compressor import _REGISTRY, _load_builtin_methods
    from .trainable import load_trained, trained_checkpoints

    _load_builtin_methods()
    cls = _REGISTRY.get(name)
    if cls is None or not getattr(cls, "trainable", False):
        return name
    fields = {f.name for f in dataclasses.fields(cls)}
    if any(k.rpartition(".")[0] == name or k in fields for k in params):
        return name
    if any(m == name and b == budget and type(b) is type(budget) for m, b, _ in trained_checkpoints()):
        return load_trained(name, budget)
    return name


#: drawn by ``vtcompress show`` when no method is named (those registered, in this order).
DEFAULT_METHODS = ("random", "uniform", "avg_pool", "tome", "divprune", "visionzip", "prumerge",
                   "fastv", "sparsevlm")


def default_methods() -> list[str]:
    """The methods ``vtcompress show`` draws when none is named: :data:`DEFAULT_METHODS` that are registered."""
    from .compressor import list_methods

    names = set(list_methods())
    return [m for m in DEFAULT_METHODS if m in names]
