"""Token maps (vtcompress.viz): pixels read back, panel layout, the ``vtcompress show`` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vtcompress.tokens import VisualTokens
from vtcompress.viz import (
    DIM_FACTOR,
    GRID_SHADE,
    OUTLINE,
    PALETTE,
    TINT_ALPHA,
    panel_grid,
    patch_states,
    to_pil,
    token_map,
)

GRID = (4, 5)  # non-square on purpose: rows and columns must not be swapped
CELL = 16


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(GRID[0] * CELL, GRID[1] * CELL, 3), dtype=np.uint8)


def _tokens(b: int = 1) -> VisualTokens:
    n = GRID[0] * GRID[1]
    return VisualTokens.from_features(torch.randn(b, n, 8), grid=GRID)


def _cell(arr: np.ndarray, p: int, inset: int = 0) -> np.ndarray:
    """Pixels of patch ``p`` (raster order), ``inset`` px trimmed from every side."""
    r, c = divmod(p, GRID[1])
    return arr[r * CELL + inset : (r + 1) * CELL - inset, c * CELL + inset : (c + 1) * CELL - inset]


def _band_width() -> int:
    return max(1, CELL // 12)


def test_dropped_dimmed_kept_untouched_inside_outline():
    img = _image()
    kept = [0, 6, 13]
    t = _tokens().select(torch.tensor([kept]))
    out = np.asarray(token_map(img, t, cell=CELL))
    assert out.shape == img.shape
    w = _band_width()
    for p in range(GRID[0] * GRID[1]):
        if p in kept:
            # inside the outline: the input pixels, bit for bit
            np.testing.assert_array_equal(_cell(out, p, w), _cell(img, p, w))
            # the outline band: top row and left column of the cell are the outline colour
            r, c = divmod(p, GRID[1])
            assert (out[r * CELL, c * CELL : (c + 1) * CELL] == OUTLINE).all()
            assert (out[r * CELL : (r + 1) * CELL, (c + 1) * CELL - 1] == OUTLINE).all()
        else:
            # the cell minus its grid line (top row, left column): pixel * DIM_FACTOR
            ref = np.rint(_cell(img, p)[1:, 1:].astype(np.float32) * DIM_FACTOR)
            np.testing.assert_array_equal(_cell(out, p)[1:, 1:], ref)
            # the grid line: dimmed, then shaded
            ref_line = np.rint(_cell(img, p)[0, 1:].astype(np.float32) * DIM_FACTOR * GRID_SHADE)
            np.testing.assert_array_equal(_cell(out, p)[0, 1:], ref_line)


def test_merged_patches_share_a_colour_and_groups_differ():
    img = np.full((GRID[0] * CELL, GRID[1] * CELL, 3), 128, dtype=np.uint8)
    t = _tokens()
    n = t.num_patches
    # token 0 <- patches {0, 1, 5}; token 1 <- {2, 3}; every other patch is its own token; patch 19 dropped
    dest = torch.full((1, n), -1, dtype=torch.long)
    dest[0, [0, 1, 5]] = 0
    dest[0, [2, 3]] = 1
    singles = [p for p in range(n) if p not in (0, 1, 5, 2, 3, 19)]
    dest[0, singles] = torch.arange(2, 2 + len(singles))
    anchor = torch.tensor([[0, 3, *singles]])  # token 1 sits at patch 3, so patch 2 is a plain member
    merged = t.merge(dest, anchor)
    assert merged.size[0, 0] == 3 and merged.size[0, 1] == 2
    out = np.asarray(token_map(img, merged, cell=CELL))
    w = _band_width()
    inner = [_cell(out, p, w) for p in range(n)]
    tint0 = 128 * (1 - TINT_ALPHA) + np.asarray(PALETTE[0], np.float32) * TINT_ALPHA
    tint1 = 128 * (1 - TINT_ALPHA) + np.asarray(PALETTE[1], np.float32) * TINT_ALPHA
    colour0, colour1 = np.rint(tint0), np.rint(tint1)
    for p in (0, 1, 5):
        assert (inner[p] == colour0).all(), p
    for p in (2, 3):
        assert (inner[p] == colour1).all(), p
    assert not np.array_equal(colour0, colour1)
    for p in singles:
        assert (inner[p] == 128).all(), p  # kept single patches: untouched
    assert (inner[19] == round(128 * DIM_FACTOR)).all()
    # no grid line inside a group (patch 1's left edge, patch 5's top edge: both border patch 0 of their own
    # group); a line between two groups (patch 2's left edge borders patch 1 of group 0)
    assert (out[2 : CELL - 2, CELL] == colour0).all()  # patch 1's left column
    assert (out[CELL, 2 : CELL - 2] == colour0).all()  # patch 5's top row
    assert (out[2 : CELL - 2, 2 * CELL] == np.rint(tint1 * GRID_SHADE)).all()  # patch 2's left column
    # anchors are outlined, the other members of a group are not
    assert (out[0, 0:CELL] == OUTLINE).all()  # patch 0's top band
    assert not (out[0, CELL : 2 * CELL] == OUTLINE).all(axis=-1).any()  # patch 1 is merged into 0, no outline


def test_kept_mask_assignment_and_tokens_draw_the_same():
    img = _image(1)
    kept = torch.zeros(GRID[0] * GRID[1], dtype=torch.bool)
    kept[[1, 2, 7, 19]] = True
    via_tokens = token_map(img, _tokens().select(kept.nonzero().T), cell=CELL)
    via_mask = token_map(img, kept, grid=GRID, cell=CELL)
    via_assign = token_map(img, torch.where(kept, kept.cumsum(0) - 1, -1), grid=GRID, cell=CELL)
    np.testing.assert_array_equal(np.asarray(via_tokens), np.asarray(via_mask))
    np.testing.assert_array_equal(np.asarray(via_tokens), np.asarray(via_assign))


def test_batched_row_equals_single_image():
    img = _image(2)
    t = _tokens(3)
    idx = torch.tensor([[0, 3, 4, 9], [1, 2, 18, 0], [5, 6, 7, 8]])
    valid = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4])
    sel = t.select(idx, valid)
    for b in range(3):
        one = sel.row(b)
        np.testing.assert_array_equal(np.asarray(token_map(img, sel, index=b, cell=CELL)),
                                      np.asarray(token_map(img, one, cell=CELL)))
    grid, assign, anchor, group = patch_states(sel, index=1)
    assert grid == GRID and anchor.sum() == 3 and (assign >= 0).sum() == 3 and set(group) == {0, 1}


def test_image_types_agree():
    img = _image(3)
    t = _tokens().select(torch.tensor([[0, 4, 8]]))
    ref = np.asarray(token_map(img, t, cell=CELL))
    chw_u8 = torch.from_numpy(img).permute(2, 0, 1)
    chw_f = chw_u8.float() / 255.0
    for im in (Image.fromarray(img), chw_u8, chw_f, chw_f[None]):
        np.testing.assert_array_equal(np.asarray(token_map(im, t, cell=CELL)), ref)
    # normalised pixel values (negative) are stretched for display, not rejected
    assert to_pil(torch.randn(3, 8, 8)).size == (8, 8)


def test_default_cell_enlarges_small_images():
    t = VisualTokens.from_features(torch.randn(1, 144, 4))
    out = token_map(np.zeros((96, 96, 3), np.uint8), t.select(torch.tensor([[0]])))
    assert out.size == (384, 384)  # 12 patches x 32 px: the long side reaches TARGET_SIDE


def test_panel_grid_layout():
    a = Image.new("RGB", (40, 30), (255, 0, 0))
    b = Image.new("RGB", (50, 20), (0, 255, 0))
    c = Image.new("RGB", (10, 10), (0, 0, 255))
    pad = 6
    out = panel_grid([("a", a), ("b: a longer title\nsecond line", b), ("c", c)], cols=2, pad=pad)
    cw, ch, cols, rows = 50, 30, 2, 2
    assert out.width == cols * cw + (cols + 1) * pad
    th = (out.height - rows * ch - (rows + 1) * pad) / rows
    assert th == int(th) and th > 0
    th = int(th)
    arr = np.asarray(out)
    for i, im in enumerate((a, b, c)):
        r, col = divmod(i, cols)
        x0, y0 = pad + col * (cw + pad), pad + r * (th + ch + pad) + th
        np.testing.assert_array_equal(arr[y0 : y0 + im.height, x0 : x0 + im.width], np.asarray(im))
    # titles are drawn (dark pixels) above the first panel, nothing below the last panel
    assert (arr[pad : pad + th, pad : pad + cw] < 100).any()


def test_decoder_layers_become_side_by_side_panels():
    img = _image(4)
    n = GRID[0] * GRID[1]
    k2 = torch.arange(n) % 2 == 0
    k6 = torch.arange(n) % 4 == 0
    out = token_map(img, {2: k2, 6: k6}, grid=GRID, cell=CELL)
    pad = 8
    assert out.width == 2 * GRID[1] * CELL + 3 * pad
    panel2 = np.asarray(token_map(img, k2, grid=GRID, cell=CELL))
    th = out.height - GRID[0] * CELL - 2 * pad
    np.testing.assert_array_equal(np.asarray(out)[pad + th : pad + th + GRID[0] * CELL, pad : pad + GRID[1] * CELL],
                                  panel2)
    same = token_map(img, [("layer 2: 10 kept", k2), ("layer 6: 5 kept", k6)], grid=GRID, cell=CELL)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(same))


@pytest.mark.parametrize(
    "image, tokens, kwargs, message",
    [
        ("not an image", None, {}, "image must be"),
        (np.zeros((4, 4, 5), np.uint8), None, {}, "numpy image must have shape"),
        (torch.zeros(2, 3, 4, 4), None, {}, "tensor image must have shape"),
        (None, torch.ones(15, dtype=torch.bool), {}, "not a square grid"),
        (None, torch.ones(20, dtype=torch.bool), {"grid": (3, 3)}, "grid (3, 3) has 9 patches"),
        (None, torch.ones(20), {"grid": GRID}, "must be bool"),
        (None, "tokens", {}, "tokens_or_result must be"),
        (None, [("a",)], {}, "(title, tokens) pairs"),
        (None, {}, {}, "no stages"),
        (None, "batch", {"index": 1}, "index=1 is out of range"),
        (None, "batch", {"cell": 0}, "cell must be an int >= 1"),
        (None, "batch", {"grid": (5, 4)}, "does not match the tokens' grid"),
    ],
)
def test_bad_input_raises_clear_value_error(image, tokens, kwargs, message):
    image = _image() if image is None else image
    tokens = _tokens() if tokens is None or (isinstance(tokens, str) and tokens == "batch") else tokens
    with pytest.raises(ValueError) as err:
        token_map(image, tokens, **kwargs)
    assert message in str(err.value)


def test_panel_grid_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        panel_grid([])
    with pytest.raises(ValueError, match="cols must be an int >= 1"):
        panel_grid([("a", Image.new("RGB", (4, 4)))], cols=0)


# ------------------------------------------------------------------------------------------ vtcompress show

PAD = 8  # panel_grid's default padding


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A randomly initialised testbed-architecture LLaVA (12 x 12 patches, 4 LLM layers) saved like a user's model."""
    from vtcompress.testbed.model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, vision_hidden=32, text_hidden=32, vision_layers=2, text_layers=4).eval()
    path = tmp_path_factory.mktemp("tiny_testbed")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def _panels(png, n_panels: int, cell: int = 32, grid: int = 12) -> list[np.ndarray]:
    """Cut a one-row panel grid written by ``vtcompress show`` back into its maps."""
    arr = np.asarray(Image.open(png).convert("RGB"))
    side = cell * grid
    assert arr.shape[1] == n_panels * side + (n_panels + 1) * PAD
    th = arr.shape[0] - side - 2 * PAD
    assert th > 0
    return [arr[PAD + th : PAD + th + side, PAD + i * (side + PAD) : PAD + i * (side + PAD) + side]
            for i in range(n_panels)]


def _outlined(panel: np.ndarray, cell: int = 32, grid: int = 12) -> int:
    """Cells whose whole top pixel row is the outline colour: the kept tokens' anchors."""
    rows = panel[::cell][:grid].reshape(grid, grid, cell, 3)
    return int((rows == OUTLINE).all(axis=(-1, -2)).sum())


def test_show_writes_the_map_of_compress_inputs(tiny_dir, tmp_path):
    from vtcompress import get
    from vtcompress.models import compress_inputs
    from vtcompress.testbed import encode, make_sample
    from vtcompress.testbed.data import SKILLS, sample_seed
    from vtcompress.viz import show_main

    path, model, tok = tiny_dir
    out = tmp_path / "map.png"
    assert show_main(["--sample", "2", "--method", "visionzip", "--budget", "20", "--model", str(path),
                      "--out", str(out)]) == 0
    (panel,) = _panels(out, 1)
    sample = make_sample(sample_seed("test", 2), SKILLS[2 % len(SKILLS)])
    enc = encode(tok, [sample], model.config)
    enc.pop("answer_ids")
    with torch.no_grad():
        res = compress_inputs(model, get("visionzip", budget=20), **enc)
    ref = np.asarray(token_map(sample.image, res.tokens[0][0]))
    np.testing.assert_array_equal(panel, ref)
    assert _outlined(panel) == 20


def test_show_several_methods_side_by_side(tiny_dir, tmp_path):
    from vtcompress.testbed import samples
    from vtcompress.viz import show_main

    path = tiny_dir[0]
    out = tmp_path / "grid.png"
    assert show_main(["--sample", "0", "--methods", "uniform,avg_pool,fastv", "--budget", "36",
                      "--model", str(path), "--out", str(out), "--input-panel"]) == 0
    shown, uniform, pooled, fastv = _panels(out, 4)
    # the input panel: the 96 x 96 sample, each pixel a 4 x 4 block
    image = samples("test", 1)[0].image
    np.testing.assert_array_equal(shown, image.repeat(4, axis=0).repeat(4, axis=1))
    assert _outlined(uniform) == 36 and _outlined(pooled) == 36 and _outlined(fastv) == 36
    # pooling merges every patch: no patch is dimmed, so no cell is as dark as a dropped one in the uniform map
    assert pooled.mean() > uniform.mean()


def test_show_decoder_method_one_panel_per_pruning_layer(tiny_dir, tmp_path):
    from vtcompress.viz import show_main

    path = tiny_dir[0]
    out = tmp_path / "pyramid.png"
    assert show_main(["--sample", "1", "--method", "pyramiddrop", "--budget", "0.5", "--param", "layers=(1,2,3)",
                      "--param", "ref_depth=4", "--model", str(path), "--out", str(out)]) == 0
    panels = _panels(out, 3)
    assert [_outlined(p) for p in panels] == [72, 36, 18]


def test_show_user_image_without_model(tmp_path, capsys):
    from vtcompress.viz import show_main

    img = tmp_path / "in.png"
    Image.fromarray(_image(5)).save(img)
    out = tmp_path / "sub" / "map.png"
    assert show_main([str(img), "--model", "none", "--grid", "4x5", "--method", "uniform", "--budget", "5",
                      "--cell", "16", "--out", str(out)]) == 0
    with Image.open(out) as im:
        im.verify()
    arr = np.asarray(Image.open(out).convert("RGB"))
    assert arr.shape[1] == GRID[1] * CELL + 2 * PAD
    assert "wrote" in capsys.readouterr().out
    # the same through the `vtcompress` entry point
    from vtcompress.cli import main

    again = tmp_path / "again.png"
    assert main(["show", str(img), "--model", "none", "--grid", "4x5", "--method", "uniform", "--budget", "5",
                 "--cell", "16", "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{missing}", "--model", "none", "--method", "uniform"], "does not exist"),
        (["{garbage}", "--model", "none", "--method", "uniform"], "cannot read image"),
        (["--sample", "0", "--model", "none", "--method", "fastervlm"], "needs the 'cls_attn' signal"),
        (["--sample", "0", "--model", "none", "--method", "fastv"], "needs a model"),
        (["--sample", "0", "--model", "none", "--method", "uniform", "--budget", "500"], "out of range"),
        (["--sample", "0", "--model", "none", "--method", "uniform", "--budget", "1.5"], "out of range"),
        (["--sample", "0", "--model", "none", "--method", "uniform", "--budget", "lots"], "not a number"),
        (["--sample", "0", "--model", "none", "--method", "no_such_method"], "unknown method"),
        (["--sample", "0", "--model", "none", "--method", "uniform", "--param", "layer=2"], "match no method"),
        (["--sample", "0", "--model", "{missing}", "--method", "uniform"], "expected 'testbed', 'none'"),
        (["--model", "none", "--method", "uniform"], "IMAGE path or --sample"),
        (["--sample", "0", "--model", "none", "--method", "uniform", "--out", "{tmp}/map.jpg"], "PNG"),
    ],
)
def test_show_bad_input_exit_code_and_message(argv, message, tmp_path, capsys):
    from vtcompress.viz import show_main

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    subs = {"{missing}": str(tmp_path / "missing.png"), "{garbage}": str(garbage)}
    argv = [subs.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "never.png")]
    assert show_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("vtcompress show: error:")
    assert not (tmp_path / "never.png").exists()


def test_gallery_every_method_at_one_budget(tiny_dir):
    from vtcompress.viz import gallery

    _, model, tok = tiny_dir
    image = _image(6)
    out = gallery(model, tok, image, ["random", "divprune", "fastv"], 0.25, cols=2)
    side = 12 * 32
    assert out.size[0] == 2 * side + 3 * PAD
    th = (out.size[1] - 2 * side - 3 * PAD) / 2
    assert th == int(th) and th > 0
    arr = np.asarray(out)
    y = PAD + int(th)
    assert _outlined(arr[y : y + side, PAD : PAD + side]) == 36
    with pytest.raises(ValueError, match="needs the 'cls_attn' signal"):
        gallery(None, None, image, ["fastervlm"], 0.25)


def test_model_dir_with_processor_draws_on_what_the_model_saw(tmp_path):
    """A saved model with an AutoProcessor (CLIP centre crop): the map is drawn over the crop, not the input."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vtcompress.testbed.model import build_tokenizer
    from vtcompress.viz import load_model, model_inputs, model_view, show_main

    tok = build_tokenizer()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    wide = np.zeros((32, 48, 3), np.uint8)
    wide[:, :8] = (255, 0, 0)  # cropped away by the 32 x 32 centre crop
    wide[:, 8:40] = _image(7)[:32, :32]
    wide[:, 40:] = (0, 0, 255)  # cropped away
    loaded = load_model(str(tmp_path / "m"))
    seen = np.asarray(model_view(loaded, Image.fromarray(wide), model_inputs(loaded, Image.fromarray(wide))))
    assert seen.shape == (32, 32, 3)
    assert np.abs(seen.astype(int) - wide[:, 8:40].astype(int)).max() <= 1
    img = tmp_path / "wide.png"
    Image.fromarray(wide).save(img)
    out = tmp_path / "map.png"
    assert show_main([str(img), "--model", str(tmp_path / "m"), "--method", "uniform", "--budget", "8",
                      "--out", str(out)]) == 0
    (panel,) = _panels(out, 1, cell=96, grid=4)
    assert _outlined(panel, cell=96, grid=4) == 8


def test_gallery_skip_errors_gives_a_dimmed_panel(tiny_dir):
    from vtcompress.viz import gallery

    _, model, tok = tiny_dir
    image = np.ascontiguousarray(_image(8)[:, :64])  # square, 64 x 64 (the testbed resizes it to 96 x 96)
    bad = {"fastv.layer": 9}  # the tiny LLM has 4 layers: fastv cannot prune at layer 9
    with pytest.raises(ValueError, match="layer=9 is out of range"):
        gallery(model, tok, image, ["uniform", "fastv"], 36, params=bad)
    out = gallery(model, tok, image, ["uniform", "fastv"], 36, params=bad, skip_errors=True)
    side = 12 * 32
    assert out.size[0] == 2 * side + 3 * PAD
    arr = np.asarray(out)
    y = out.size[1] - PAD - side
    failed = arr[y : y + side, 2 * PAD + side : 2 * PAD + 2 * side].astype(np.float32)
    plain = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST), np.float32)
    np.testing.assert_array_equal(failed, np.rint(plain * DIM_FACTOR))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "internvl"])
def test_every_family_maps_projector_and_decoder_stages(family):
    """Stock tiny models of each family: a full budget keeps every patch of every view, at the projector stage
    (compress_inputs) and at the decoder stage (one prefill with the decoder hooks); half a budget keeps at
    most half of the first image's placeholders inside the LLM."""
    from models_util import BUILDERS
    from vtcompress import get
    from vtcompress.viz import LoadedModel, method_stages

    model, make_inputs = BUILDERS[family]()
    inputs = make_inputs(batch=1)
    loaded = LoadedModel(model)
    image = Image.new("RGB", (32, 32))
    for name, params in (("uniform", {}), ("fastv", {"layer": 1})):
        stages = method_stages(loaded, get(name, budget=1.0, **params), image, inputs=inputs)
        assert stages
        views = sorted({v for _, _, v in stages})
        assert views == list(range(2 if family == "llava_next" else 1))  # anyres: base and high-resolution grid
        for _, tokens, _ in stages:
            assert int(tokens.counts[0]) == tokens.num_patches
            assert (np.asarray(token_map(image, tokens, cell=8)) == OUTLINE).all(axis=-1).any()
    n_placeholders = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    half = method_stages(loaded, get("fastv", budget=0.5, layer=1), image, inputs=inputs)
    kept = sum(int(t.counts[0]) for _, t, _ in half)
    assert 0 < kept <= round(0.5 * n_placeholders)


def test_model_view_picks_the_crop_of_each_view():
    """Tiles (as many views as crops): view v is crop v, un-normalised; anyres (crops and views differ in number):
    view 0 is the base crop and later views the whole input image."""
    from types import SimpleNamespace

    from vtcompress.viz import LoadedModel, model_view

    proc = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.25] * 3))
    loaded = LoadedModel(model=None, processor=proc)
    tiles = torch.stack([torch.full((3, 8, 8), float(v)) for v in (-2.0, 0.0, 2.0)])  # 0, 0.5, 1 after un-norm
    whole = Image.new("RGB", (20, 10), (1, 2, 3))
    for v, value in enumerate((0, 128, 255)):
        got = np.asarray(model_view(loaded, whole, {"pixel_values": tiles}, v, 3))
        assert got.shape == (8, 8, 3) and (got == value).all()
    anyres = {"pixel_values": tiles[None]}  # [1, crops, 3, H, W], 2 views
    assert (np.asarray(model_view(loaded, whole, anyres, 0, 2)) == 0).all()
    assert model_view(loaded, whole, anyres, 1, 2) is whole
    assert model_view(LoadedModel(model=None), whole, anyres, 0, 2) is whole  # no processor: plain resize route


def test_gallery_uses_compressor_instances_as_given():
    """The bench passes built (possibly trained) methods: same budget -> the very instance runs."""
    from vtcompress import get
    from vtcompress.viz import build_methods, gallery

    inst = get("uniform", budget=5)
    assert build_methods([inst], 5, None)[0] is inst
    other = build_methods([inst], 7, None)[0]
    assert other is not inst and other.budget == 7 and inst.budget == 5
    out = gallery(None, None, _image(9), [inst], 5)  # no model: pixel features on the default 12 x 12 grid
    assert out.size[0] == 12 * 32 + 2 * PAD
    (panel,) = [np.asarray(out)[out.size[1] - PAD - 384 : out.size[1] - PAD, PAD : PAD + 384]]
    assert _outlined(panel) == 5


def test_show_needs_nothing_but_an_image(tmp_path, monkeypatch):
    """`vtcompress show IMAGE`: the shipped testbed, the default methods, budget 0.25, token_map.png here."""
    from vtcompress.viz import show_main

    img = tmp_path / "in.png"
    Image.fromarray(_image(10)).save(img)
    monkeypatch.chdir(tmp_path)
    assert show_main([str(img), "--threads", "1"]) == 0
    with Image.open(tmp_path / "token_map.png") as im:
        assert im.format == "PNG" and im.width == 4 * 384 + 5 * PAD


def test_method_the_model_cannot_take_is_drawn_on_its_features(tiny_dir, tmp_path):
    """pixel_unshuffle widens the features past what the LLM takes: compress_inputs refuses, the map still shows
    its 2 x 2 groups (computed on the model's own features), titled 'features only'."""
    from vtcompress.viz import LoadedModel, method_stages, show_main

    path, model, tok = tiny_dir
    out = tmp_path / "pu.png"
    assert show_main(["--sample", "0", "--method", "pixel_unshuffle", "--model", str(path), "--out", str(out)]) == 0
    (panel,) = _panels(out, 1)
    assert _outlined(panel) == 36
    from vtcompress import get

    ((title, tokens, view),) = method_stages(LoadedModel(model, tokenizer=tok, image_size=96), get("pixel_unshuffle"),
                                             Image.fromarray(_image(0)))
    assert title == "features only" and view == 0
    grid, assign, anchor, group = patch_states(tokens)
    assert grid == (12, 12) and (group == 4).all() and anchor.sum() == 36
    a = assign.reshape(6, 2, 6, 2)
    assert (a == a[:, :1, :, :1]).all()  # every 2 x 2 block of patches is one token
