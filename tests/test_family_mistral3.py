"""Mistral 3 / Pixtral through the stock classes: native-resolution grids from image_sizes, [IMG_BREAK] /
[IMG_END] never pruned, signals under 2-D RoPE and the block-diagonal mask, cached == uncached, restoration,
every training-free method and FastV, decoder-stage budgets per image across its rows."""

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
from models_util import IMAGE, IMG_BREAK, IMG_END, pixtral_prompt, tiny_mistral3
from test_apply import ClsTopK, NormTopK, Probe
from vtcompress.models import adapter_for
from vtcompress.models.description import modeling_function


@pytest.fixture(scope="module")
def built():
    return tiny_mistral3(seed=2)


def _rows_of(row: torch.Tensor) -> list[list[int]]:
    """Per image of one prompt row, the number of [IMG] tokens in each of its rows (between breaks)."""
    images, cur, count = [], [], 0
    for t in row.tolist():
        if t == IMAGE:
            count += 1
        elif t in (IMG_BREAK, IMG_END):
            cur.append(count)
            count = 0
            if t == IMG_END:
                images.append(cur)
                cur = []
    return images


def test_grids_rows_and_breaks(built):
    """Each image is one view of its merged grid (image_sizes / 8 px); an int budget keeps that many per image;
    every [IMG_BREAK] and [IMG_END] stays, and each kept token sits in its own row, before that row's break
    (a row whose tokens are all pruned keeps its break)."""
    model, make = built
    inputs = make(batch=3, images=[1, 0, 3], seed=1)  # grids 2x3; -; 3x2, 2x2, 4x1
    res = vtcompress.compress_inputs(model, NormTopK(budget=2), **inputs)
    assert [[t.grid for t in views] for views in res.tokens] == [[(2, 3)], [(3, 2)], [(2, 2)], [(4, 1)]]
    assert res.num_tokens.tolist() == [[6, 2], [6, 2], [4, 2], [4, 2]]
    ids, new = inputs["input_ids"], res.inputs["input_ids"]
    for b in range(3):
        old_text = ids[b][inputs["attention_mask"][b].bool() & (ids[b] != IMAGE)]
        new_text = new[b][res.inputs["attention_mask"][b].bool() & (new[b] != IMAGE)]
        assert torch.equal(old_text, new_text)  # breaks and ends included, in order
    images = _rows_of(new[0]) + _rows_of(new[2])
    for views, rows in zip(res.tokens, images, strict=True):
        tok = views[0]
        per_row = torch.bincount(tok.pos[0] // tok.grid[1], minlength=tok.grid[0]).tolist()
        assert rows == per_row
    assert any(0 in rows for rows in images)  # some row lost every token and kept its break


def test_full_budget_and_beams_equal_stock(built):
    model, make = built
    inputs = make(batch=3, images=[2, 0, 2], seed=3)
    beams = {**GEN, "num_beams": 2, "num_return_sequences": 2}
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, **GEN)
        ref_beams = model.generate(**inputs, **beams)
        with vtcompress.apply(model, ClsTopK(budget=1.0)) as handle:
            out = model(**inputs).logits
            assert "image_sizes" not in handle.last.inputs and "pixel_values" not in handle.last.inputs
            ids = model.generate(**inputs, **GEN)
            got_beams = model.generate(**inputs, **beams)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(out[valid], ref[valid])
    assert torch.equal(ids, ref_ids) and torch.equal(got_beams, ref_beams)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check_half_precision(tiny_mistral3, dtype)


def test_cached_equals_uncached(built):
    check_cached_equals_uncached(*built)


def test_restoration(built):
    check_restoration(*built)


def test_second_turn_through_the_cache_equals_the_conversation_from_scratch(built):
    check_second_turn(*built)


def test_every_training_free_projector_method_and_fastv(built):
    check_every_training_free_method_and_fastv(*built)


def test_decoder_stage_budgets_count_per_image_across_rows(built):
    """The decoder stage groups an image's rows (runs between [IMG_BREAK] tokens) into one image, also when the
    projector stage pruned whole rows."""
    model, make = built
    inputs = make(batch=3, images=[1, 0, 3], seed=4)  # 6, -, 6 + 4 + 4 tokens

    def closes(row):
        return (row == IMG_END).nonzero().squeeze(1).tolist()

    assert decoder_kept_per_image(model, inputs, vtcompress.get("fastv", budget=3, layer=1), closes) == \
        [[3], [], [3, 3, 3]]
    both = [NormTopK(budget=2), vtcompress.get("fastv", budget=0.5, layer=1)]
    assert decoder_kept_per_image(model, inputs, both, closes) == [[1], [], [1, 1, 1]]


def test_mean_attention_and_keys_equal_a_by_hand_reference(built):
    """No [CLS]: the signal is the head-mean attention each patch receives from its own image's queries (2-D
    RoPE applied, images kept apart by the block-diagonal mask), summed over the 2x2 patches a merged token
    covers; keys (after RoPE) averaged over them. By hand from the last layer's input; the same per image in a
    batch as alone; SDPA kept."""
    model, make = built
    inputs = make(batch=2, images=[1, 1], seed=5)  # 16x24 and 24x16 px: 4x6 and 6x4 patches
    desc = adapter_for(model)
    attn = desc.vision_attention(desc.vision_layers(model)[-1])
    seen = []
    h = attn.register_forward_pre_hook(lambda _m, args, kw: seen.append(kw), with_kwargs=True)
    probe = Probe(budget=1.0)
    probe.needs = ("cls_attn", "keys")
    try:
        vtcompress.compress_inputs(model, probe, **inputs)
    finally:
        h.remove()
    assert model.config.vision_config._attn_implementation == "sdpa"
    x, (cos, sin) = seen[0]["hidden_states"][0], seen[0]["position_embeddings"]
    heads, dh = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(-1, heads, dh).transpose(0, 1)[None]
    k = attn.k_proj(x).view(-1, heads, dh).transpose(0, 1)[None]
    q, k = modeling_function(attn, "apply_rotary_pos_emb")(q, k, cos, sin, unsqueeze_dim=0)
    grids = [(4, 6), (6, 4)]
    start = 0
    for i, (hp, wp) in enumerate(grids):
        n = hp * wp
        qi, ki = q[0, :, start : start + n], k[0, :, start : start + n]
        recv = ((qi @ ki.transpose(-1, -2)) * attn.scaling).softmax(-1).mean(1).mean(0)  # [n]
        keys = ki.mean(0)  # [n, Dh]

        def pool(v, hp=hp, wp=wp):  # [n, C] on the patch grid -> [tokens, 4 patches, C]
            return v.reshape(hp // 2, 2, wp // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(-1, 4, v.shape[-1])

        view = next(t for t in probe.seen if t.grid == (hp // 2, wp // 2))
        torch.testing.assert_close(view.cls_attn[0], pool(recv[:, None]).sum(1)[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(view.keys[0], pool(keys).mean(1), atol=1e-5, rtol=0)
        alone = Probe(budget=1.0)
        alone.needs = ("cls_attn",)
        one = {"input_ids": inputs["input_ids"][i : i + 1], "attention_mask": inputs["attention_mask"][i : i + 1],
               "pixel_values": inputs["pixel_values"][i : i + 1], "image_sizes": inputs["image_sizes"][i : i + 1]}
        vtcompress.compress_inputs(model, alone, **one)
        torch.testing.assert_close(alone.seen[0].cls_attn, view.cls_attn, atol=1e-6, rtol=0)
        start += n


def test_bad_prompts_are_refused(built):
    model, make = built
    inputs = make(batch=1, images=[1], seed=6)
    short = dict(inputs)
    short["input_ids"] = inputs["input_ids"].clone()
    short["input_ids"][0, (inputs["input_ids"][0] == IMAGE).nonzero()[0]] = 5  # a row of 2 instead of 3
    with pytest.raises(ValueError, match="placeholder|rows of"):
        vtcompress.compress_inputs(model, NormTopK(budget=0.5), **short)
    row = inputs["input_ids"][0].tolist()  # one 2x3 image: its 6 [IMG] as 3 rows of 2 instead
    first, last = row.index(IMAGE), row.index(IMG_END)
    row = row[:first] + pixtral_prompt(3, 2) + row[last + 1 :]
    reshaped = {**inputs, "input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
    with pytest.raises(ValueError, match="rows of \\[\\[2, 2, 2\\]\\]"):
        vtcompress.compress_inputs(model, NormTopK(budget=0.5), **reshaped)
    other = make(batch=2, images=[1, 1], seed=6)
    other["input_ids"] = other["input_ids"].clone()
    other["input_ids"][1][other["input_ids"][1] == IMG_END] = 7
    with pytest.raises(ValueError, match="IMG_END"):
        vtcompress.compress_inputs(model, NormTopK(budget=0.5), **other)
