"""Decoder-stage pruning (FastV, PyramidDrop, SparseVLM, DART) on tiny stock Hugging Face VLMs.

What is checked:
* the signal is the textbook attention row (eager ``output_attentions``) and FastV keeps exactly its top-k;
* full budget == unpatched model, removing the hooks restores the model (no hooks, identical logits);
* generate with the KV cache == generate without it, token for token; a padded batch == one by one;
* every family (LLaVA, OneVision, Qwen2-VL M-RoPE, InternVL), through ``attach_decoder`` and ``apply``;
* the selection rules as pure functions on synthesized signals (closed-form references).
"""

from __future__ import annotations

import pytest
import torch

import vtcompress
from models_util import IMAGE, tiny_internvl, tiny_llava, tiny_onevision, tiny_qwen2_vl
from vtcompress import VisualTokens, get
from vtcompress.methods.attention import scale_layers
from vtcompress.models.decoder import attach_decoder, attention_rows, language_model_of

BUILDERS = {"llava": tiny_llava, "onevision": tiny_onevision, "qwen2_vl": tiny_qwen2_vl, "internvl": tiny_internvl}


def _deep_llava(layers: int = 4, attn: str = "sdpa", seed: int = 0):
    """tiny_llava with a deeper LLM (multi-stage schedules need more than 2 layers)."""
    from transformers import LlavaForConditionalGeneration

    model, make = tiny_llava(seed=seed, attn=attn)
    cfg = model.config
    cfg.text_config.num_hidden_layers = layers
    torch.manual_seed(seed)
    deep = LlavaForConditionalGeneration(cfg).eval()
    if attn != "sdpa":
        deep.set_attn_implementation(attn)

    def make_inputs(**kw):
        return make(**kw)

    return deep, make_inputs


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _gen(model, inputs, n=4, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def _row(inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded LLaVA-style batch, unpadded (its pixel rows follow the image counts)."""
    keep = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, keep],
           "attention_mask": inputs["attention_mask"][b : b + 1, keep]}
    counts = (inputs["input_ids"] == IMAGE).sum(1).tolist()
    per = counts[b]
    if "pixel_values" in inputs and per:
        tokens_per_image = 16
        start = sum(counts[:b]) // tokens_per_image
        out["pixel_values"] = inputs["pixel_values"][start : start + per // tokens_per_image]
    return out


def _same_new_tokens(single: torch.Tensor, batched: torch.Tensor) -> None:
    """New tokens of one sample alone == its row of the batch (the batch row may go on with pads after EOS)."""
    n = single.shape[0]
    assert torch.equal(single, batched[:n])
    assert bool((batched[n:] == 0).all())


def _split(family: str, inputs: dict, b: int) -> dict:
    """Sample ``b`` (one image per sample) of a tiny-model batch, unpadded, with its own image inputs."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    pix = inputs["pixel_values"]
    if family == "llava":
        out["pixel_values"] = pix[b : b + 1]
    elif family == "internvl":
        tiles = [1 + k % 3 for k in range(inputs["input_ids"].shape[0])]  # tiny_internvl: image k has 1 + k % 3
        out["pixel_values"] = pix[sum(tiles[:b]) : sum(tiles[: b + 1])]
    elif family == "qwen2_vl":
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        out["pixel_values"] = pix[sum(sizes[:b]) : sum(sizes[: b + 1])]
        out["image_grid_thw"] = inputs["image_grid_thw"][b : b + 1]
    elif family == "onevision":
        out["pixel_values"] = pix[b : b + 1]
        out["image_sizes"] = inputs["image_sizes"][b : b + 1]
        out["batch_num_images"] = torch.tensor([1])
    return out


# ---------------------------------------------------------------------------------------------- the signal
def test_attention_rows_equal_eager_output_attentions():
    model, make = tiny_llava(attn="eager")
    inputs = make(batch=2, images=[1, 1], padding="left")
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
    lm = language_model_of(model)
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    h = lm.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    ok = inputs["attention_mask"].bool()
    length = ok.shape[1]
    q_idx = torch.tensor([[length - 1, length - 3, length - 6]]).expand(2, -1)
    with torch.no_grad():
        rows = attention_rows(lm.layers[1], seen["hidden"], seen["pe"], q_idx, ok, chunk=5)
    expect = ref.attentions[1].mean(1).gather(1, q_idx[..., None].expand(-1, -1, length))
    torch.testing.assert_close(rows, expect, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rows.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fastv_keeps_topk_of_textbook_attention(attn):
    """FastV at K keeps the top-k visual tokens of layer K-1's head-mean attention row of the last token."""
    model, make = tiny_llava(attn=attn)
    inputs = make(batch=3, images=[1, 1, 1], padding="left")
    eager, _ = tiny_llava(attn="eager")
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions[0]  # layer K-1 = 0
    budget = 0.25
    with attach_decoder(model, [get("fastv", budget=budget, layer=1)]) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual()
    for b in range(3):
        vis = (inputs["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        row = att[b, :, -1].mean(0)[vis]
        k = round(budget * len(vis))
        expect = vis[row.topk(k).indices].sort().values
        assert torch.equal(kept[b], expect)


# ---------------------------------------------------------------------------------------------- identities
def test_full_budget_is_unpatched_and_remove_restores():
    model, make = tiny_llava()
    inputs = make(batch=3, images=[1, 1, 1], padding="left")
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_ids = _gen(model, inputs)
    before = _hook_count(model)  # after a first forward: transformers adds its own output-recording hooks lazily
    with attach_decoder(model, [get("fastv", budget=1.0, layer=1)]):
        assert _hook_count(model) > before
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(_gen(model, inputs), ref_ids)
    assert _hook_count(model) == before
    handle = attach_decoder(model, get("fastv", budget=0.25, layer=1))
    with torch.no_grad():
        pruned = model(**inputs).logits
    handle.remove()
    assert _hook_count(model) == before
    assert pruned.shape[1] < ref.shape[1]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_pruned_shapes_and_last_logits_sdpa_equal_eager():
    sd, make = tiny_llava(attn="sdpa")
    ea, _ = tiny_llava(attn="eager")
    inputs = make(batch=2, images=[1, 1], padding="left")
    outs = []
    for model in (sd, ea):
        with attach_decoder(model, get("fastv", budget=0.5, layer=1)) as handle, torch.no_grad():
            outs.append((model(**inputs).logits, handle.kept()[0]))
    (ls, ks), (le, ke) = outs
    assert torch.equal(ks, ke)
    n_img = int((inputs["input_ids"][0] == IMAGE).sum())
    assert ls.shape[1] == inputs["input_ids"].shape[1] - n_img // 2
    torch.testing.assert_close(ls[:, -1], le[:, -1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_generate_cache_equals_no_cache_and_batch_equals_single(attn):
    model, make = tiny_llava(attn=attn)
    inputs = make(batch=3, images=[1, 2, 1], padding="left", seed=3)  # ragged: 16 / 32 / 16 visual tokens
    method = get("fastv", budget=0.3, layer=1)
    with attach_decoder(model, method) as handle:
        cached = _gen(model, inputs, n=5)
        uncached = _gen(model, inputs, n=5, use_cache=False)
        assert torch.equal(cached, uncached)
        with torch.no_grad():
            batch_last = model(**inputs).logits[:, -1]
        kept_batch = handle.kept_visual()
        for b in range(3):
            single = _row(inputs, b)
            ids = _gen(model, single, n=5)
            _same_new_tokens(ids[0, single["input_ids"].shape[1]:], cached[b, inputs["input_ids"].shape[1]:])
            with torch.no_grad():
                last = model(**single).logits[:, -1]
            torch.testing.assert_close(last[0], batch_last[b], rtol=1e-4, atol=1e-5)
            shift = inputs["input_ids"].shape[1] - single["input_ids"].shape[1]
            assert torch.equal(handle.kept_visual()[0] + shift, kept_batch[b])
            n_img = int((single["input_ids"] == IMAGE).sum())
            assert len(kept_batch[b]) == round(0.3 * n_img)


def test_right_padding_prefill_matches_single():
    model, make = tiny_llava()
    inputs = make(batch=2, images=[2, 1], padding="right", seed=1)
    with attach_decoder(model, get("fastv", budget=0.5, layer=1)) as handle, torch.no_grad():
        out = model(**inputs).logits
        keep, ok = handle.kept()
        for b in range(2):
            single = _row(inputs, b)
            ref = model(**single).logits[0, -1]
            last = int(torch.nonzero(ok[b]).max())
            torch.testing.assert_close(out[b, last], ref, rtol=1e-4, atol=1e-5)


def test_ragged_rows_fill_with_masked_dropped_tokens():
    """A row with few pads: fillers beyond its pads are dropped visual tokens, masked out; rows match singles."""
    model, _ = tiny_llava()
    gen = torch.Generator().manual_seed(5)
    text = lambda n: torch.randint(3, 100, (n,), generator=gen).tolist()  # noqa: E731
    rows = [text(20) + [IMAGE] * 16 + text(3), text(2) + [IMAGE] * 32 + text(3)]
    length = max(map(len, rows))
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    pix = torch.randn(3, 3, 16, 16, generator=gen)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}
    with attach_decoder(model, get("fastv", budget=0.25, layer=1)) as handle:
        cached = _gen(model, inputs, n=4)
        assert torch.equal(cached, _gen(model, inputs, n=4, use_cache=False))
        keep, ok = handle.kept()
        assert handle.run.decisions[0].fix  # row 1 needs non-pad fillers
        assert [int(v.numel()) for v in handle.kept_visual()] == [4, 8]
        assert keep.shape[1] == 20 + 4 + 3
        singles = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long),
                    "pixel_values": p} for r, p in zip(rows, (pix[:1], pix[1:]), strict=True)]
        for b, single in enumerate(singles):
            _same_new_tokens(_gen(model, single, n=4)[0, len(rows[b]):], cached[b, length:])


# ---------------------------------------------------------------------------------------------- multi-stage
def test_pyramiddrop_stages_on_deeper_model():
    model, make = _deep_llava(layers=4)
    inputs = make(batch=2, images=[1, 2], padding="left", seed=2)
    method = get("pyramiddrop", budget=0.5, layers=(1, 2, 3), ref_depth=4, ratio=0.5)
    assert method.schedule(4) == (1, 2, 3)
    with attach_decoder(model, method) as handle:
        cached = _gen(model, inputs, n=4)
        assert torch.equal(cached, _gen(model, inputs, n=4, use_cache=False))
        stages = [handle.kept_visual(s) for s in range(3)]
    n_img = (inputs["input_ids"] == IMAGE).sum(1).tolist()
    for b in range(2):
        expect = [round(0.5 * n_img[b])]
        expect += [round(0.5 * expect[-1])]
        expect += [round(0.5 * expect[-1])]
        assert [len(s[b]) for s in stages] == expect
        for s in (1, 2):  # each stage keeps a subset of the previous one
            assert set(stages[s][b].tolist()) <= set(stages[s - 1][b].tolist())
    for b in range(2):
        single = _row(inputs, b)
        with attach_decoder(model, method):
            _same_new_tokens(_gen(model, single, n=4)[0, single["input_ids"].shape[1]:],
                             cached[b, inputs["input_ids"].shape[1]:])


def test_pyramiddrop_later_stage_uses_own_layer_attention_of_pruned_sequence():
    """Stage 2 at layer 3 ranks the survivors by layer 3's OWN attention row (PyramidDrop's reference), computed on
    the stage-1 sequence entering it, at its compact (renumbered) positions."""
    model, make = _deep_llava(layers=4, attn="eager")
    inputs = make(batch=1, images=[1], padding="left", seed=4)
    method = get("pyramiddrop", budget=0.5, layers=(1, 3), ref_depth=4, ratio=0.5)
    lm = language_model_of(model)
    seen = {}
    hook = lm.layers[3].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("h", a[0] if a else kw["hidden_states"]), with_kwargs=True, prepend=True)
    with attach_decoder(model, method) as handle, torch.no_grad():
        model(**inputs)
        keep0, ok0 = handle.kept(0)
        kept1 = handle.kept_visual(1)[0]
        pid = handle.run.decisions[0].pid
        assert torch.equal(pid[0], torch.arange(keep0.shape[1]))  # compact positions after the first drop
        pe = lm.rotary_emb(seen["h"], pid)
        row = attention_rows(lm.layers[3], seen["h"], pe, torch.tensor([[keep0.shape[1] - 1]]), ok0)[0, 0]
    hook.remove()
    vis0 = (inputs["input_ids"][0].gather(0, keep0[0]) == IMAGE).nonzero().squeeze(1)
    k = int(16 * 0.5 * 0.5)  # int(n0 * budget * lambda)
    expect = keep0[0][vis0[row[vis0].topk(k).indices]].sort().values
    assert torch.equal(kept1, expect)


# ---------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_families_generate_and_batch(family):
    model, make = BUILDERS[family]()
    inputs = make(batch=2, images=[1, 1], padding="left", seed=1)
    method = get("fastv", budget=0.5, layer=1)
    with attach_decoder(model, method) as handle:
        cached = _gen(model, inputs, n=4)
        assert torch.equal(cached, _gen(model, inputs, n=4, use_cache=False))
        n_img = handle.run.vis.sum(1).tolist()  # visual tokens that carry a patch (image_newline tokens do not)
        assert [len(v) for v in handle.kept_visual()] == [round(0.5 * n) for n in n_img]
        for b in range(2):
            one = _split(family, inputs, b)
            ids = _gen(model, one, n=4)
            _same_new_tokens(ids[0, one["input_ids"].shape[1]:], cached[b, inputs["input_ids"].shape[1]:])
    with torch.no_grad():
        ref = model(**inputs).logits
        with attach_decoder(model, get("fastv", budget=1.0, layer=1)):
            assert torch.equal(model(**inputs).logits, ref)


def test_qwen2_vl_textbook_selection_with_mrope():
    model, make = tiny_qwen2_vl(attn="eager")
    inputs = make(batch=2, images=[1, 1], padding="left", seed=2)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[0]
    with attach_decoder(model, get("fastv", budget=0.5, layer=1)) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual()
    for b in range(2):
        vis = (inputs["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        row = att[b, :, -1].mean(0)[vis]
        assert torch.equal(kept[b], vis[row.topk(round(0.5 * len(vis))).indices].sort().values)


# ---------------------------------------------------------------------------------------------- through apply
def test_apply_fastv_and_composition_with_visionzip():
    model, make = tiny_llava()
    inputs = make(batch=2, images=[1, 1], padding="left", seed=6)
    before_ids = _gen(model, inputs)
    before = _hook_count(model)
    fastv = get("fastv", budget=0.5, layer=1)
    with vtcompress.apply(model, fastv):
        direct = _gen(model, inputs)
    with attach_decoder(model, fastv):
        assert torch.equal(_gen(model, inputs), direct)
    with vtcompress.apply(model, [get("visionzip", budget=8), fastv]) as handle:
        cached = _gen(model, inputs)
        assert torch.equal(cached, _gen(model, inputs, use_cache=False))
        kept = handle._decoder.kept_visual()
        assert [len(v) for v in kept] == [4, 4]  # 16 -> 8 (VisionZip) -> 4 (FastV)
    assert _hook_count(model) == before
    assert torch.equal(_gen(model, inputs), before_ids)


# ---------------------------------------------------------------------------------------------- pure rules
def _tokens(b=2, n=10, q=1, seed=0, counts=None):
    g = torch.Generator().manual_seed(seed)
    mask = None
    if counts is not None:
        mask = torch.arange(n)[None] < torch.tensor(counts)[:, None]
    t = VisualTokens.from_features(torch.randn(b, n, 8, generator=g), grid=(1, n), mask=mask)
    return t.replace(attn=torch.rand(b, n, q, generator=g))


def test_fastv_rule_closed_form():
    t = _tokens(counts=[10, 7])
    out = get("fastv", budget=0.3)(t)
    for b, n in enumerate([10, 7]):
        k = round(0.3 * n)
        expect = t.attn[b, :n, 0].topk(k).indices.sort().values
        assert torch.equal(out.pos[b][out.mask[b]], expect)
    out = get("fastv", budget=8)(t)  # an int budget above a row's count keeps the whole row
    assert out.counts.tolist() == [8, 7]


def test_pyramiddrop_rule_stages():
    t = _tokens(n=16, counts=[16, 12])
    m = get("pyramiddrop", budget=0.5, ratio=0.25)
    s0 = m.compress_stage(t, 0)
    assert s0.counts.tolist() == [8, 6]
    s1 = m.compress_stage(s0, 1)
    assert s1.counts.tolist() == [2, 1]  # int(8 * 0.25), int(6 * 0.25): the reference truncates
    score = s0.attn[..., 0].masked_fill(~s0.mask, -1)
    for b, k in enumerate([2, 1]):
        assert set(s0.pos[b][score[b].topk(k).indices].tolist()) == set(s1.pos[b][s1.mask[b]].tolist())


def test_scale_layers_and_bad_values():
    assert scale_layers((8, 16, 24), 32, 32) == (8, 16, 24)
    assert scale_layers((8, 16, 24), 32, 8) == (2, 4, 6)
    assert scale_layers((8, 16, 24), 32, 2) == (1,)
    with pytest.raises(ValueError, match="layer"):
        get("fastv", layer=0)
    with pytest.raises(ValueError, match="ratio"):
        get("pyramiddrop", ratio=1.5)
    model, _ = tiny_llava()
    with pytest.raises(ValueError, match="out of range"):
        attach_decoder(model, get("fastv", layer=2))
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="stage"):
        attach_decoder(model, get("visionzip", budget=8))


def test_bf16_runs_and_keeps_budget():
    model, make = tiny_llava()
    model = model.to(torch.bfloat16)
    inputs = make(batch=2, images=[1, 1], padding="left")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with attach_decoder(model, get("fastv", budget=0.5, layer=1)) as handle:
        cached = _gen(model, inputs, n=3)
        assert torch.equal(cached, _gen(model, inputs, n=3, use_cache=False))
        assert [len(v) for v in handle.kept_visual()] == [8, 8]


# ---------------------------------------------------------------------------------------------- every decoder method
DECODER_TABLE = [
    ("fastv", {"budget": 0.3, "layer": 1}),
    ("pyramiddrop", {"budget": 0.5, "layers": (1, 3), "ref_depth": 4, "ratio": 0.5}),
    ("sparsevlm", {"budget": 0.25, "layers": (1, 2, 3), "ref_depth": 4}),
    ("sparsevlm", {"budget": 6, "layers": (1, 3), "ref_depth": 4}),
    ("dart", {"budget": 0.5, "layer": 2, "pivot_image": 2, "pivot_text": 2, "exact_budget": True}),
]


@pytest.mark.parametrize("name,params", DECODER_TABLE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DECODER_TABLE)])
def test_decoder_methods_cache_batch_and_budget(name, params):
    model, make = _deep_llava(layers=4)
    inputs = make(batch=3, images=[1, 2, 1], padding="left", seed=3)
    method = get(name, **params)
    n_img = (inputs["input_ids"] == IMAGE).sum(1)
    with attach_decoder(model, method) as handle:
        cached = _gen(model, inputs, n=4)
        assert torch.equal(cached, _gen(model, inputs, n=4, use_cache=False))
        with torch.no_grad():
            model(**inputs)
        final = torch.tensor([len(v) for v in handle.kept_visual(-1)])
        per_image = torch.tensor(16)  # budgets count per image: rows have 1, 2, 1 images of 16 tokens
        if name == "pyramiddrop":
            one = int(16 * 0.5 * 0.5)  # int(n0 * budget * lambda) at the last stage
        elif isinstance(params["budget"], int):
            one = int(per_image.clamp(max=params["budget"]))
        else:
            one = round(16 * params["budget"])
        expect = n_img // 16 * one
        assert torch.equal(final, expect), (final, expect)
        for b in range(3):
            single = _row(inputs, b)
            _same_new_tokens(_gen(model, single, n=4)[0, single["input_ids"].shape[1]:],
                             cached[b, inputs["input_ids"].shape[1]:])


@pytest.mark.parametrize("name", ["sparsevlm", "dart", "pyramiddrop"])
def test_decoder_methods_full_budget_is_unpatched(name):
    model, make = _deep_llava(layers=4)
    inputs = make(batch=2, images=[1, 2], padding="left", seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
    params = {"dart": {"layer": 2}, "sparsevlm": {"layers": (1, 3), "ref_depth": 4},
              "pyramiddrop": {"layers": (1, 3), "ref_depth": 4, "ratio": 1.0}}[name]
    with attach_decoder(model, get(name, budget=1.0, **params)), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_sparsevlm_recycled_tokens_are_member_means():
    """In the model: a recycled token's hidden state entering layer K is the mean of its cluster's states."""
    from vtcompress.methods.query import SparseVLM

    model, make = _deep_llava(layers=4)
    inputs = make(batch=1, images=[2], padding="left", seed=7)
    method = get("sparsevlm", budget=0.25, layers=(1,), ref_depth=4)  # prunes layer 1's output: K = 2
    lm = language_model_of(model)
    seen = {}
    orig = SparseVLM.compress_stage

    def spy(self, tokens, stage, num_stages=1, **kw):
        out = orig(self, tokens, stage, num_stages, **kw)
        seen["tokens"], seen["out"] = tokens, out
        return out

    hook = lm.layers[2].register_forward_hook(lambda m, a, out: seen.__setitem__("h2_in", a[0]), with_kwargs=False)
    grab = lm.layers[2].register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("pre", a[0] if a else None),
                                                  with_kwargs=True, prepend=False)
    SparseVLM.compress_stage = spy
    try:
        with attach_decoder(model, method), torch.no_grad():
            model(**inputs)
    finally:
        SparseVLM.compress_stage = orig
        hook.remove()
        grab.remove()
    tokens, out = seen["tokens"], seen["out"]
    merged = out.mask & (out.size > 1)
    assert bool(merged.any())
    assert int(out.counts[0]) == round(0.25 * 16)  # per image (one row per image)
    for j in merged[0].nonzero().squeeze(1).tolist():
        members = (out.assign[0] == j).nonzero().squeeze(1)
        torch.testing.assert_close(out.x[0, j], tokens.x[0, members].mean(0))
        assert int(out.size[0, j]) == len(members)
    # the layer received the merged state at the centre's slot
    h = seen["h2_in"][0]
    assert any(torch.allclose(h[i], out.x[0, j]) for j in merged[0].nonzero().squeeze(1).tolist()
               for i in range(h.shape[0]))


def test_text_raters_and_dpc_knn_closed_form():
    from vtcompress.methods.query import dpc_knn, text_raters

    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    text = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0]]])
    raters = text_raters(x, torch.ones(1, 2, dtype=torch.bool), text, torch.ones(1, 3, dtype=torch.bool))
    assert raters.tolist() == [[True, False, False]]
    g = torch.Generator().manual_seed(0)
    blob = torch.cat([torch.randn(5, 4, generator=g) * 0.01, torch.randn(5, 4, generator=g) * 0.01 + 10])[None]
    valid = torch.ones(1, 10, dtype=torch.bool)
    center, owner = dpc_knn(blob, valid, torch.tensor([2]))
    assert int(center.sum()) == 2
    assert bool(center[0, :5].any()) and bool(center[0, 5:].any())
    c0, c1 = center[0, :5].nonzero()[0].item(), 5 + center[0, 5:].nonzero()[0].item()
    assert owner[0].tolist() == [c0] * 5 + [c1] * 5


def test_dart_rule_closed_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 6, generator=g)
    keys = torch.randn(2, 12, 4, generator=g)
    t = VisualTokens.from_features(x, grid=(1, 12), keys=keys)
    assert get("dart", budget=5, pivot_image=1, pivot_text=0)(t).counts.tolist() == [6, 6]  # pivot + 5 // 1
    m = get("dart", budget=5, pivot_image=1, pivot_text=0, exact_budget=True)
    out = m(t)
    assert out.counts.tolist() == [5, 5]
    for b in range(2):
        pivot = int(keys[b].abs().sum(-1).argmax())
        sim = torch.nn.functional.cosine_similarity(x[b], x[b, pivot][None], dim=-1)
        sim[pivot] = float("inf")
        expect = sorted([pivot] + sim.topk(4, largest=False).indices.tolist())
        assert out.pos[b][out.mask[b]].tolist() == expect
    with pytest.raises(ValueError, match="pivot"):
        get("dart", pivot_image=0, pivot_text=0)


def test_unsupported_inputs_raise_clear_errors():
    model, make = tiny_llava()
    inputs = make(batch=1, images=[1])
    with attach_decoder(model, get("fastv", budget=0.5, layer=1)), torch.no_grad():
        with pytest.raises(ValueError, match="labels"):
            model(**inputs, labels=inputs["input_ids"])
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        with pytest.raises(ValueError, match="DynamicCache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_apply_projector_then_fastv_every_family(family):
    """One apply: DivPrune at the projector (positions kept), then FastV inside the LLM; cache, batch invariants."""
    model, make = BUILDERS[family]()
    inputs = make(batch=2, images=[1, 1], padding="left", seed=1)
    methods = [get("divprune", budget=0.5), get("fastv", budget=0.5, layer=1)]
    with vtcompress.apply(model, methods) as handle:
        cached = _gen(model, inputs, n=4)
        assert torch.equal(cached, _gen(model, inputs, n=4, use_cache=False))
        assert handle._decoder.run.mode == "continue"  # the uncached run reused the prefill's decision
        for b in range(2):
            one = _split(family, inputs, b)
            new = _gen(model, one, n=4)[0, one["input_ids"].shape[1]:]
            _same_new_tokens(new, cached[b, inputs["input_ids"].shape[1]:])


@pytest.mark.parametrize("name", ["fastv", "pyramiddrop", "sparsevlm", "dart"])
def test_decoder_rules_keep_visual_tokens_invariants(name):
    """Every decoder-stage rule on synthesized signals: exact counts, spatial order, provenance and sizes."""
    g = torch.Generator().manual_seed(3)
    b, n, q, d = 3, 40, 5, 8
    counts = torch.tensor([40, 31, 9])
    mask = torch.arange(n)[None] < counts[:, None]
    t = VisualTokens.from_features(torch.randn(b, n, d, generator=g), grid=(1, n), mask=mask,
                                   keys=torch.randn(b, n, 4, generator=g), text=torch.randn(b, q, d, generator=g),
                                   text_mask=torch.arange(q)[None] < torch.tensor([[5], [3], [1]]))
    t = t.replace(attn=torch.rand(b, n, q, generator=g))
    method = get(name, budget=0.25)
    out = method.compress_stage(t, 0, 1)
    out.validate()
    if name == "pyramiddrop":  # int(), as its reference
        expect = torch.floor(counts * 0.25).long()
    elif name == "dart":  # the visual pivots + (pivot_image + pivot_text) * int(budget * n / 8), as its reference
        expect = (4 + 8 * torch.floor(counts * 0.25 / 8)).long().clamp(max=counts)
    else:
        expect = torch.round(counts * 0.25).long()
    assert torch.equal(out.counts, expect)
    for r in range(b):
        pos = out.pos[r][out.mask[r]]
        assert bool((pos[1:] > pos[:-1]).all())
        assert bool((pos < counts[r]).all())
        kept = out.mask[r].nonzero().squeeze(1)
        assert torch.equal(out.assign[r, pos], kept)  # each kept token is the home of its anchor patch
        covered = (out.assign[r] >= 0).sum()
        assert float(out.size[r].sum()) == float(covered)
    assert get(name, budget=1.0).compress_stage(t, 0, 1).counts.tolist() == counts.tolist()


def test_sparsevlm_signal_is_eager_attention_of_prompt_rows():
    """SparseVLM's attn signal = layer K-1's eager attention rows of the prompt tokens after the image (the reference's
    layer l = K - 1 prunes its own output); the valid rows are the raters chosen once from the input embeddings."""
    from vtcompress.methods.query import SparseVLM, text_raters

    model, make = _deep_llava(layers=4, attn="eager")
    inputs = make(batch=2, images=[1, 1], padding="left", seed=8)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1
    seen = {}
    orig = SparseVLM.compress_stage

    def spy(self, tokens, stage, num_stages=1, **kw):
        seen["tokens"] = tokens
        return orig(self, tokens, stage, num_stages, **kw)

    SparseVLM.compress_stage = spy
    try:
        with attach_decoder(model, get("sparsevlm", budget=0.5, layers=(1,), ref_depth=4)) as handle, \
                torch.no_grad():
            model(**inputs)
            embeds = model.model.get_input_embeddings()(inputs["input_ids"])
            feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            run_raters = handle.run.raters[0]
    finally:
        SparseVLM.compress_stage = orig
    tokens = seen["tokens"]
    ids, ok = inputs["input_ids"], inputs["attention_mask"].bool()
    for b in range(2):
        vis = (ids[b] == IMAGE).nonzero().squeeze(1)
        prompt = (ok[b] & (ids[b] != IMAGE) & (torch.arange(ids.shape[1]) > vis[0])).nonzero().squeeze(1)
        q = len(prompt)
        expect = att[b].mean(0)[prompt][:, vis].T  # [N, Q]
        torch.testing.assert_close(tokens.attn[b, : len(vis), :q], expect, rtol=1e-5, atol=1e-6)
        text = embeds[b, prompt]
        raters = text_raters(feats[b][None], torch.ones(1, len(vis), dtype=torch.bool), text[None],
                             torch.ones(1, q, dtype=torch.bool))[0]
        assert torch.equal(tokens.text_mask[b, :q], raters) and not bool(tokens.text_mask[b, q:].any())
        assert torch.equal(run_raters[b, prompt], raters)
