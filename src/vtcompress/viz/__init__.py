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

A **clip** (``VisualTokens`` with ``frames = T``) is drawn by :func:`clip_strip` as its ``T`` frames side by
side (wrapped into rows of 8), each frame's map as above with group sizes counted over the whole clip; a patch
merged into a token anchored in ANOTHER frame (temporal merging) is tinted with that token's colour and hatched
with :data:`CROSS_FRAME` diagonals. Each frame is captioned with its index and the tokens anchored in it; a title
line above and a legend below. ``vtcompress show --clip T`` draws a testbed clip through a method.

Three modules: :mod:`~vtcompress.viz.render` draws (numpy / PIL only), :mod:`~vtcompress.viz.runner` runs a
method on one image through a model (its inputs, the vision tower and LLM under the method) and returns the
tokens to draw, :mod:`~vtcompress.viz.cli` is the command line ``vtcompress show`` (:func:`show_main`), which
runs a method on a model (the embedded testbed by default, or any supported model saved in a local directory,
loaded by :func:`vtcompress.loading.load_model`) and writes the map as a PNG.
"""

from ..loading import LoadedModel, load_model
from .cli import DEFAULT_METHODS, default_clip_methods, default_methods, show_main
from .render import (
    CROSS_FRAME,
    DIM_FACTOR,
    GRID_SHADE,
    OUTLINE,
    PALETTE,
    TINT_ALPHA,
    clip_panels,
    clip_strip,
    panel_grid,
    panel_title,
    patch_states,
    to_pil,
    token_map,
)
from .runner import (
    DEFAULT_QUESTION,
    build_methods,
    clip_strips,
    clip_tokens,
    gallery,
    method_panels,
    method_stages,
    model_inputs,
    model_view,
    pixel_tokens,
)

__all__ = [
    "DIM_FACTOR",
    "TINT_ALPHA",
    "GRID_SHADE",
    "OUTLINE",
    "PALETTE",
    "DEFAULT_QUESTION",
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
    "build_methods",
    "method_panels",
    "default_methods",
    "DEFAULT_METHODS",
    "CROSS_FRAME",
    "clip_panels",
    "clip_strip",
    "clip_strips",
    "clip_tokens",
    "default_clip_methods",
]
