"""Idefics3 / SmolVLM through the stock classes: tiles plus a global view as views of one image, the marker
tokens kept, pixel-shuffle signals, cached == uncached, restoration, every training-free method and FastV."""

from __future__ import annotations

import pytest
import torch

import vtcompress
from family_checks import (
    GEN,
    check_cached_equals_uncached,
    check_every_training_free_method_and_fastv,
    check_half_precision,
    check_restoration,
    check_second_turn,
    decoder_kept_per_image,
)
from models_util import FAKE, GLOBAL, IMAGE, tiny_idefics3, tiny_smolvlm
from test_apply import ClsTopK, NormTopK, Probe
from vtcompress.models import adapter_for


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def built(request):
    return (tiny_idefics3 if request.param == "idefics3" else tiny_smolvlm)(seed=2)


def test_tiles_are_views_and_markers_stay(built):
    """Image k has ``rows*cols`` tiles plus its global tile, each a 2x2 view; an int budget is split over them;
    every marker / newline / <fake_token_around_image> token survives in order, only placeholders go."""
    model, make = built
    inputs = make(batch=3, images=[1, 0, 2])  # tiles: 1 (not split); 3 (1x2 + global), 3 (2x1 + global)
    assert adapter_for(model).image_tiles(model, inputs) == [1, 3, 3]
    res = vtcompress.compress_inputs(model, NormTopK(budget=5), **inputs)
    assert [[t.grid for t in views] for views in res.tokens] == [[(2, 2)], [(2, 2)] * 3, [(2, 2)] * 3]
    assert [[t.num_tokens for t in views] for views in res.tokens] == [[4], [2, 2, 1], [2, 2, 1]]
    assert res.num_tokens.tolist() == [[4, 4], [12, 5], [12, 5]]
    ids, new = inputs["input_ids"], res.inputs["input_ids"]
    for b in range(3):
        old_text = ids[b][inputs["attention_mask"][b].bool() & (ids[b] != IMAGE)]
        new_text = new[b][res.inputs["attention_mask"][b].bool() & (new[b] != IMAGE)]
        assert torch.equal(old_text, new_text)
    # each tile's run holds exactly its view's kept tokens, after its marker
    row = new[2][res.inputs["attention_mask"][2].bool()]
    runs = torch.diff(torch.nn.functional.pad((row == IMAGE).long(), (1, 1))).nonzero().squeeze(1).reshape(-1, 2)
    assert (runs[:, 1] - runs[:, 0]).tolist() == [2, 2, 1, 2, 2, 1]
    assert [int(row[s - 1]) for s in runs[:, 0]][2::3] == [GLOBAL, GLOBAL]
    assert int((row == FAKE).sum()) == int((ids[2] == FAKE).sum())


def test_full_budget_with_padded_tiles_and_beams_equals_stock(built):
    """pixel_attention_mask (a partly padded tile) and beam search / several returns: budget 1.0 is the stock
    model bit for bit."""
    model, make = built
    inputs = make(batch=2, images=[2, 1], seed=3)
    pam = torch.ones(inputs["pixel_values"].shape[:2] + inputs["pixel_values"].shape[-2:], dtype=torch.bool)
    pam[0, 1, :, 8:] = False  # the right half of a tile is padding
    inputs["pixel_values"][0, 1, :, :, 8:] = 0
    inputs["pixel_attention_mask"] = pam
    beams = {**GEN, "num_beams": 2, "num_return_sequences": 2}
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, **GEN)
        ref_beams = model.generate(**inputs, **beams)
        with vtcompress.apply(model, ClsTopK(budget=1.0)) as handle:
            out = model(**inputs).logits
            assert "pixel_attention_mask" not in handle.last.inputs
            ids = model.generate(**inputs, **GEN)
            got_beams = model.generate(**inputs, **beams)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(out[valid], ref[valid])
    assert torch.equal(ids, ref_ids) and torch.equal(got_beams, ref_beams)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check_half_precision(tiny_idefics3, dtype)


def test_cached_equals_uncached(built):
    check_cached_equals_uncached(*built)


def test_restoration(built):
    check_restoration(*built)


def test_second_turn_through_the_cache_equals_the_conversation_from_scratch(built):
    check_second_turn(*built)


def test_every_training_free_projector_method_and_fastv(built):
    check_every_training_free_method_and_fastv(*built)


def test_decoder_stage_budgets_count_per_image_across_tiles(built):
    """The decoder stage groups an image's tile runs (between marker tokens) into one image: an int FastV budget
    is per image, alone and after a projector method."""
    model, make = built
    inputs = make(batch=3, images=[1, 0, 2], seed=9)  # 4, -, 12 + 12 tokens

    def closes(row):  # the <fake_token_around_image> right after each global tile's run
        fake = (row == FAKE).nonzero().squeeze(1)
        return [int(fake[fake > g][0]) for g in (row == GLOBAL).nonzero().squeeze(1)]

    fastv = vtcompress.get("fastv", budget=5, layer=1)
    assert decoder_kept_per_image(model, inputs, fastv, closes) == [[4], [], [5, 5]]
    both = [NormTopK(budget=7), vtcompress.get("fastv", budget=5, layer=1)]
    assert decoder_kept_per_image(model, inputs, both, closes) == [[4], [], [5, 5]]


def test_mean_attention_and_keys_equal_a_by_hand_reference(built):
    """The tower has no [CLS]: the signal is the head-mean attention each patch receives (mean over the
    queries of its tile), summed over the 2x2 patches of a shuffled token; keys are averaged over them. Both
    computed by hand from the last layer's input; the vision tower keeps SDPA."""
    model, make = built
    inputs = make(batch=2, images=[1, 1], seed=7)  # tiles 1 and 3
    layer = adapter_for(model).vision_layers(model)[-1]
    seen = []
    h = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    probe = Probe(budget=1.0)
    probe.needs = ("cls_attn", "keys")
    try:
        vtcompress.compress_inputs(model, probe, **inputs)
    finally:
        h.remove()
    assert model.config.vision_config._attn_implementation == "sdpa"
    attn_mod = layer.self_attn
    x = layer.layer_norm1(seen[0])  # [tiles, 16, C]
    t, n, c = x.shape
    heads = attn_mod.num_heads
    q = attn_mod.q_proj(x).view(t, n, heads, -1).transpose(1, 2)
    k = attn_mod.k_proj(x).view(t, n, heads, -1).transpose(1, 2)
    recv = ((q @ k.transpose(-1, -2)) * attn_mod.scale).softmax(-1).mean(2).mean(1)  # [tiles, 16]
    keys = k.mean(1)  # [tiles, 16, Dh]

    def by_token(v):  # [tiles, 16, C'] on the 4x4 patch grid -> [tiles, 4, 4, C'] grouped by 2x2 blocks
        v = v.reshape(t, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5)  # (tile, row, col, dr, dc, C')
        return v.reshape(t, 4, 4, -1)

    ref_attn = by_token(recv[..., None]).sum(2)[..., 0]
    ref_keys = by_token(keys).mean(2)
    assert len(probe.seen) == 1 and probe.seen[0].batch_size == t  # the 4 same-grid views in one batch
    torch.testing.assert_close(probe.seen[0].cls_attn, ref_attn, atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.seen[0].keys, ref_keys, atol=1e-5, rtol=0)


def test_bad_prompts_are_refused(built):
    model, make = built
    inputs = make(batch=1, images=[1], seed=8)
    short = dict(inputs)
    short["input_ids"] = inputs["input_ids"].clone()
    short["input_ids"][0, (inputs["input_ids"][0] == IMAGE).nonzero()[0]] = 5  # a 3-token run
    with pytest.raises(ValueError, match="runs of \\[3\\] tokens"):
        vtcompress.compress_inputs(model, NormTopK(budget=0.5), **short)
    other = make(batch=2, images=[1, 1], seed=8)
    other["input_ids"] = other["input_ids"].clone()
    other["input_ids"][1][other["input_ids"][1] == GLOBAL] = 7  # the second sample's global marker is changed
    with pytest.raises(ValueError, match="global image marker"):
        vtcompress.compress_inputs(model, NormTopK(budget=0.5), **other)
    extra = dict(inputs)
    extra["pixel_values"] = torch.cat([inputs["pixel_values"], torch.randn(1, 1, 3, 16, 16)], dim=1)
    with pytest.raises(ValueError, match="tiles per sample"):
        vtcompress.compress_inputs(model, NormTopK(budget=0.5), **extra)
