"""Clip strips (vtcompress.viz.clip_strip): frame panels laid out, kept / merged-across-frames / dropped cells read
back, and ``vtcompress show --clip T``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vtcompress.tokens import VisualTokens
from vtcompress.viz import (
    CROSS_FRAME,
    DIM_FACTOR,
    OUTLINE,
    PALETTE,
    TINT_ALPHA,
    clip_panels,
    clip_strip,
    patch_states,
)
from vtcompress.viz.render import _hatch

torch.set_num_threads(1)

GRID = (2, 3)  # non-square on purpose
CELL = 24
PAD = 8
GREY = 200


def _frames(t: int, grid=GRID, cell=CELL, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(grid[0] * cell, grid[1] * cell, 3), dtype=np.uint8) for _ in range(t)]


def _identity_clip(t: int, grid=GRID) -> VisualTokens:
    return VisualTokens.from_features(torch.randn(1, t * grid[0] * grid[1], 4), grid=grid, frames=t)


def _hand_clip() -> VisualTokens:
    """Two frames of 2 x 3 patches (clip patches 0-5: frame 0, 6-11: frame 1) and three tokens:

    * token 0 anchored at frame 0 patch 0, with frame 1 patches 0 and 1 merged into it (temporal merging);
    * token 1 anchored at frame 0 patch 2, alone;
    * token 2 anchored at frame 1 patch 3, with frame 1 patch 4 (a merge within the frame).

    Every other patch is dropped.
    """
    assign = torch.tensor([[0, -1, 1, -1, -1, -1, 0, 0, -1, 2, 2, -1]])
    tokens = VisualTokens(x=torch.randn(1, 3, 4), mask=torch.ones(1, 3, dtype=torch.bool),
                          pos=torch.tensor([[0, 2, 9]]), grid=GRID, size=torch.tensor([[3.0, 1.0, 2.0]]),
                          assign=assign, frames=2)
    tokens.validate()
    return tokens


def _cell(panel: np.ndarray, p: int, cell: int = CELL) -> np.ndarray:
    r, c = divmod(p, GRID[1])
    return panel[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]


def _find(big: np.ndarray, small: np.ndarray, x: int) -> int:
    """The row at which ``small`` sits in ``big`` with its left edge at column ``x`` (``-1``: nowhere)."""
    h, w = small.shape[:2]
    for y in range(big.shape[0] - h + 1):
        if np.array_equal(big[y : y + h, x : x + w], small):
            return y
    return -1


# ----------------------------------------------------------------------------------------------- layout


def test_strip_has_one_panel_per_frame_side_by_side_and_wrapped():
    cw, ch = GRID[1] * CELL, GRID[0] * CELL
    four = np.asarray(clip_strip(_frames(4), _identity_clip(4), cell=CELL, title="t", legend=False))
    assert four.shape[1] == 4 * cw + 5 * PAD
    eight_tok = _identity_clip(8)
    frames8 = _frames(8)
    eight = np.asarray(clip_strip(frames8, eight_tok, cell=CELL, cols=4, title="t", legend=False))
    assert eight.shape[1] == four.shape[1]
    step = eight.shape[0] - four.shape[0]  # one more row of panels: caption + panel + pad
    th = step - ch - PAD
    assert 0 < th < 60
    # every frame's map is pasted unchanged at its place: row t // cols, column t % cols
    panels = clip_panels(frames8, eight_tok, cell=CELL)
    assert [c for c, _ in panels] == [f"frame {t}\n6 kept" for t in range(8)]
    y0 = _find(eight, np.asarray(panels[0][1]), PAD)
    assert y0 > 0
    for t, (_, im) in enumerate(panels):
        r, c = divmod(t, 4)
        x, y = PAD + c * (cw + PAD), y0 + r * step
        np.testing.assert_array_equal(eight[y : y + ch, x : x + cw], np.asarray(im))
    # more than 8 frames wrap into rows of 8 by default; the legend and the title only add height
    ten = clip_strip(_frames(10), _identity_clip(10), cell=CELL)
    assert ten.width == 8 * cw + 9 * PAD
    assert ten.height > 2 * (ch + PAD) + th


def test_frames_may_be_one_tensor_and_must_match_the_clip():
    frames = _frames(3)
    stacked = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # [T, 3, H, W] uint8
    a = clip_strip(frames, _identity_clip(3), cell=CELL)
    b = clip_strip(stacked, _identity_clip(3), cell=CELL)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="frames=3"):
        clip_strip(frames[:2], _identity_clip(3), cell=CELL)


# ----------------------------------------------------------------------------------------------- colours


def test_kept_merged_across_frames_and_dropped_cells_where_the_tokens_say():
    tokens = _hand_clip()
    grey = [np.full((GRID[0] * CELL, GRID[1] * CELL, 3), GREY, dtype=np.uint8)] * 2
    (cap0, f0), (cap1, f1) = clip_panels(grey, tokens, cell=CELL)
    assert cap0 == "frame 0\n2 kept"
    assert cap1 == "frame 1\n1 kept, 2 merged into earlier"
    f0, f1 = np.asarray(f0), np.asarray(f1)
    band = max(1, CELL // 12)
    inner = slice(band, CELL - band)
    hatch = _hatch(CELL)

    def tint(token: int) -> np.ndarray:
        return np.rint(GREY * (1 - TINT_ALPHA) + np.asarray(PALETTE[token], np.float32) * TINT_ALPHA)

    # frame 0 patch 0: token 0's anchor, outlined and tinted with token 0's colour (its group spans both frames)
    c = _cell(f0, 0)
    assert (c[0] == OUTLINE).all() and (c[:, 0] == OUTLINE).all()
    assert (c[inner, inner] == tint(0)).all()
    # frame 0 patch 2: a kept single patch, outlined, its inside untouched
    c = _cell(f0, 2)
    assert (c[0] == OUTLINE).all() and (c[inner, inner] == GREY).all()
    # frame 1 patches 0 and 1: merged into token 0 of frame 0: its tint, hatched with CROSS_FRAME, no outline
    for p in (0, 1):
        c = _cell(f1, p)
        assert not (c[CELL // 2] == OUTLINE).all(axis=-1).any()
        inside = c[1:, 1:]
        h = hatch[1:, 1:]
        assert (inside[h] == CROSS_FRAME).all()
        assert (inside[~h] == tint(0)).all()
    # frame 1 patches 3 and 4: token 2, merged within its own frame: tinted, no hatching; patch 3 outlined
    c3, c4 = _cell(f1, 3), _cell(f1, 4)
    assert (c3[0] == OUTLINE).all() and (c3[inner, inner] == tint(2)).all()
    assert (c4[1:, 1:] == tint(2)).all()  # no outline and no hatching anywhere (grid row / column aside)
    # every dropped patch dimmed, in both frames
    dim = np.rint(GREY * DIM_FACTOR)
    for frame, p in [(f0, 1), (f0, 3), (f0, 4), (f0, 5), (f1, 2), (f1, 5)]:
        assert (_cell(frame, p)[1:, 1:] == dim).all()
    # no hatching outside the cross-frame patches
    assert not (f0 == CROSS_FRAME).all(axis=-1).any()


def test_patch_states_per_frame_of_a_clip():
    tokens = _hand_clip()
    g, assign, anchor, group = patch_states(tokens, frame=1)
    assert g == GRID
    assert assign.tolist() == [0, 0, -1, 2, 2, -1]
    assert anchor.tolist() == [False, False, False, True, False, False]
    assert group.tolist() == [3, 3, 0, 2, 2, 0]  # token 0 counts its patches of every frame
    with pytest.raises(ValueError, match="frame=t"):
        patch_states(tokens)
    with pytest.raises(ValueError, match="out of range"):
        patch_states(tokens, frame=2)


# ----------------------------------------------------------------------------------------------- the CLI


def test_show_clip_writes_the_strip_of_a_temporal_method(tmp_path):
    from vtcompress.loading import load_model
    from vtcompress.testbed.data import make_clip
    from vtcompress.viz import clip_strips, clip_tokens, show_main

    out = tmp_path / "strip.png"
    assert show_main(["--clip", "4", "--method", "evs", "--budget", "0.5", "--out", str(out)]) == 0
    arr = np.asarray(Image.open(out).convert("RGB"))
    side = 12 * 16  # 12 x 12 patches, default cell 16 (a 192 px frame)
    assert arr.shape[1] == 4 * side + 5 * PAD
    loaded = load_model("testbed")
    frames = [Image.fromarray(f, "RGB") for f in make_clip(4)[0]]
    (ref,) = clip_strips(loaded, frames, ["evs"], 0.5)
    np.testing.assert_array_equal(arr, np.asarray(ref))
    # each frame encoded as the model encodes an image (vision tower + projector)
    clip = clip_tokens(loaded, frames)
    assert clip.frames == 4 and clip.grid == (12, 12)
    from vtcompress.testbed.model import pixel_values_from_images

    with torch.no_grad():
        feats = loaded.model.get_image_features(pixel_values=pixel_values_from_images([np.asarray(frames[2])]))
    torch.testing.assert_close(clip.x[0, 2 * 144 : 3 * 144], feats.pooler_output[0].float())
    # the static background: frame 0 is kept whole, later frames only where something moved or appeared
    from vtcompress import get

    kept = get("evs", budget=0.5)(clip)
    assert int(kept.counts[0]) == 288
    assert (kept.frame_of()[0][kept.mask[0]] == 0).sum() == 144
