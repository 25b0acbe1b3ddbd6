"""Qwen3-VL: DeepStack levels follow every compression, at the projector and the decoder stage.

DeepStack (arXiv 2406.04334) adds, after LLM layer ``j``, level ``j`` of the vision features at the visual
positions. The references here are the stock model itself: a run of the full sequence whose attention mask hides
the pruned image tokens (they are then no key of any kept token, and the stock injection gives every kept token
its own level) must equal the compressed run, and a control that feeds the levels out of line must not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtcompress
from models_util import IMAGE, split_samples, tiny_qwen3_vl
from vtcompress import Compressor, VisualTokens, get
from vtcompress.compressor import METHODS, Stage
from vtcompress.models.decoder import attach_decoder
from vtcompress.models.qwen3_vl import follow_rows

torch.set_num_threads(1)


def _training_free_projector_methods() -> list[str]:
    names = []
    for name, cls in sorted(METHODS.items()):
        if cls.stage == Stage.PROJECTOR and not getattr(cls, "trainable", False) and not cls.temporal:
            names.append(name)
    return names


PROJECTOR = [n for n in _training_free_projector_methods() if n != "pixel_unshuffle"]  # the one width-changer


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3_vl()


def _levels(model, inputs):
    """Stock image features and DeepStack levels ``[level][image]`` of ``inputs``."""
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return list(out.pooler_output), [list(level) for level in out.deepstack_features]


def _holes_reference(model, inputs, keep):
    """The stock model on the FULL sequence with the dropped placeholders hidden from attention (``keep [B, S]``)
    and the full-grid M-RoPE positions: logits ``[B, S, V]``."""
    mask = inputs["attention_mask"] * keep.long()
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        return model(**(inputs | {"attention_mask": mask, "position_ids": pos})).logits


def _kept_logits(out_logits, new_mask, ref_logits, keep, mask):
    """Compressed logits of the kept real tokens next to the reference's at their original columns."""
    a, b = [], []
    for r in range(keep.shape[0]):
        orig = (keep[r] & mask[r].bool()).nonzero().squeeze(1)
        new = new_mask[r].bool().nonzero().squeeze(1)
        a.append(out_logits[r, new])
        b.append(ref_logits[r, orig])
    return torch.cat(a), torch.cat(b)


# ------------------------------------------------------------------------------------------ projector stage
@pytest.mark.parametrize("name", ["fastervlm", "divprune", "random", "uniform"])
def test_pruned_run_equals_stock_with_the_dropped_tokens_hidden(qwen3, name):
    """Selection at the projector stage == the stock model with the dropped image tokens masked out: every kept
    token (text and image) has the same logits, so each kept image token received its own DeepStack levels."""
    model, make = qwen3
    inputs = make(batch=3, images=[2, 1, 0], seed=3)
    res = vtcompress.compress_inputs(model, get(name, budget=0.5), **inputs)
    assert bool((res.num_tokens[:, 1] < res.num_tokens[:, 0]).all())
    with torch.no_grad():
        out = model(**res.inputs).logits
    ref = _holes_reference(model, inputs, res.keep)
    got, want = _kept_logits(out, res.inputs["attention_mask"], ref, res.keep, inputs["attention_mask"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_misaligned_levels_are_caught_by_the_reference(qwen3):
    """Control: the same comparison with each image's levels taken from its first kept-count rows (what an
    implementation that forgot the kept indices would inject) differs from the reference."""
    model, make = qwen3
    inputs = make(batch=3, images=[2, 1, 0], seed=3)
    res = vtcompress.compress_inputs(model, get("fastervlm", budget=0.5), **inputs)
    _, levels = _levels(model, inputs)
    enc = res.inputs["mm_encoder_outputs"]["image"]
    kept = [int(f.shape[0]) for f in enc.pooler_output]
    enc.deepstack_features = [[lv[:k] for lv, k in zip(level, kept, strict=True)] for level in levels]
    with torch.no_grad():
        out = model(**res.inputs).logits
    ref = _holes_reference(model, inputs, res.keep)
    got, want = _kept_logits(out, res.inputs["attention_mask"], ref, res.keep, inputs["attention_mask"])
    assert (got - want).abs().max() > 1e-3


def _cells_mean(level: torch.Tensor, assign: torch.Tensor, m: int) -> torch.Tensor:
    """``[m, D]``: the mean of the rows of ``level [N0, D]`` per output token ``assign [N0]`` (-1: dropped)."""
    out = torch.zeros(m, level.shape[1], dtype=torch.float64)
    cnt = torch.zeros(m, dtype=torch.float64)
    ok = assign >= 0
    out.index_add_(0, assign[ok], level[ok].double())
    cnt.index_add_(0, assign[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    return (out / cnt[:, None]).float()


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "tome", "avg_pool", "max_pool", "bilinear", "uniform",
                                  "random", "visionzip"])
def test_levels_follow_the_method_in_closed_form(qwen3, name):
    """Each DeepStack level of each image goes through the method's own operation with its decisions: a kept
    token's level rows (selection), its group's mean (ToMe, average pooling), the value at the patch that won the
    channel's max (max pooling), the bilinear resize of the level grid, VisionZip's target + mean of the tokens
    it absorbed."""
    model, make = qwen3
    inputs = make(batch=2, images=[2, 1], seed=4)
    feats, levels = _levels(model, inputs)
    method = get(name, budget=0.5)
    res = vtcompress.compress_inputs(model, method, **inputs)
    out = res.inputs["mm_encoder_outputs"]["image"].deepstack_features
    assert len(out) == len(levels) == 2
    for i, thw in enumerate(inputs["image_grid_thw"].tolist()):
        grid = (thw[1] // 2, thw[2] // 2)
        tok = res.tokens_of(i, 0)
        pos, assign, m = tok.pos[0], tok.assign[0], tok.num_tokens
        for j in range(len(levels)):
            lv, got = levels[j][i], out[j][i]
            assert got.shape == (m, lv.shape[1])
            if name in ("fastervlm", "divprune", "uniform", "random"):
                want = lv[pos]
            elif name in ("tome", "avg_pool"):
                want = _cells_mean(lv, assign, m)
            elif name == "max_pool":
                x = feats[i]
                want = torch.empty_like(got)
                for t in range(m):
                    members = (assign == t).nonzero().squeeze(1)
                    win = members[x[members].argmax(0)]  # [D]: the patch holding each channel's max
                    want[t] = lv[win, torch.arange(lv.shape[1])]
            elif name == "bilinear":
                layout = grid
                h, w = method._cells(VisualTokens.from_features(lv[None], grid))[1]
                img = lv.reshape(1, *layout, -1).permute(0, 3, 1, 2).float()
                want = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)[0].flatten(1).T
            else:  # visionzip: each kept token's own rows, plus the mean of the others it absorbed
                want = lv[pos].clone()
                for t in range(m):
                    others = ((assign == t) & (torch.arange(assign.numel()) != pos[t])).nonzero().squeeze(1)
                    if others.numel():
                        want[t] = want[t] + lv[others].mean(0)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6, msg=f"image {i} level {j}")


@pytest.mark.parametrize("name", [n for n in PROJECTOR if n not in ("prumerge", "prumerge_plus")])
def test_full_budget_is_stock_for_every_method(qwen3, name):
    """Budget 1.0 keeps every token and every DeepStack level row: logits and greedy ids bit-identical to stock.
    (PruMerge / PruMerge+ choose their count adaptively, capped by the budget: they prune at 1.0 too.)"""
    model, make = qwen3
    inputs = make(batch=3, images=[1, 0, 2], seed=5)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        with vtcompress.apply(model, get(name, budget=1.0)):
            out = model(**inputs).logits
            ids = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(out[valid], ref[valid])
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("name", PROJECTOR)
def test_every_method_batched_equals_one_by_one_and_cached_equals_uncached(qwen3, name):
    """Every training-free projector method: a left-padded batch of 3 (prompt lengths differ, 2/1/0 images)
    generates what each sample generates alone, and cached generation equals uncached."""
    model, make = qwen3
    inputs = make(batch=3, images=[2, 1, 0], seed=6)
    gen = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with torch.no_grad(), vtcompress.apply(model, get(name, budget=0.5)) as handle:
        batched = model.generate(**inputs, **gen)
        assert bool((handle.last.num_tokens[:, 1] < handle.last.num_tokens[:, 0]).all())
        assert torch.equal(batched, model.generate(**inputs, use_cache=False, **gen))
        for b, one in enumerate(split_samples(inputs)):
            alone = model.generate(**one, **gen)
            assert torch.equal(alone[0, -3:], batched[b, -3:]), f"sample {b}"


def test_width_changing_and_non_linear_methods_are_refused(qwen3):
    model, make = qwen3
    inputs = make(batch=1, images=[1], seed=7)

    class Squash(Compressor):  # keeps every token but maps the features non-linearly
        name = "test_squash"
        family = "transformation"

        def compress(self, tokens: VisualTokens) -> VisualTokens:
            return tokens.replace(x=torch.tanh(tokens.x))

    with pytest.raises(ValueError, match="not linear in the image features"):
        vtcompress.compress_inputs(model, Squash(budget=1.0), **inputs)
    with pytest.raises(ValueError, match="feature width|divisible"):  # either way, one clear error
        vtcompress.compress_inputs(model, get("pixel_unshuffle", budget=0.25), **inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """In bf16 / fp16 budget 1.0 is stock bit for bit, and the levels of merging and pooling methods follow (the
    linearity check passes at half precision)."""
    model, make = tiny_qwen3_vl(seed=2)
    model.to(dtype)
    inputs = make(batch=2, images=[1, 2], seed=14)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtcompress.apply(model, get("tome", budget=1.0)):
            assert torch.equal(model(**inputs).logits, ref)
        _, levels = _levels(model, inputs)
        for name in ("tome", "avg_pool", "visionzip", "bilinear"):
            res = vtcompress.compress_inputs(model, get(name, budget=0.5), **inputs)
            out = res.inputs["mm_encoder_outputs"]["image"].deepstack_features
            assert out[0][0].dtype == dtype
            if name in ("tome", "avg_pool"):
                for i in range(3):
                    tok = res.tokens_of(i, 0)
                    want = _cells_mean(levels[1][i].float(), tok.assign[0], tok.num_tokens)
                    torch.testing.assert_close(out[1][i].float(), want, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ decoder stage
def _perturb_level(model, level: int, rows: torch.Tensor, scale: float = 3.0):
    """Forward hook on the tower's DeepStack merger ``level`` that rewrites its output rows ``rows`` (flat
    indices over the batch's merged tokens)."""
    merger = model.model.visual.deepstack_merger_list[level]

    def hook(module, args, out):
        out = out.clone()
        out[rows] = out[rows] * scale + 1.0
        return out

    return merger.register_forward_hook(hook)


def test_fastv_inside_the_injection_layers_injects_the_kept_rows():
    """FastV at K = 1 with levels injected after layers 0 and 1: level 1 goes to the kept visual tokens only.
    Rewriting level 1 of every DROPPED token leaves the output bit-identical (a misaligned injection would hand
    some of those rows to kept tokens); rewriting it for the kept ones changes it, with the same kept set."""
    model, make = tiny_qwen3_vl(seed=1)
    inputs = make(batch=1, images=[2], seed=8)
    with torch.no_grad(), attach_decoder(model, get("fastv", layer=1, budget=0.4)) as dec:
        ref = model(**inputs).logits[:, -1]
        kept = dec.kept_visual()[0]
        vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
        is_kept = torch.isin(vis, kept)
        assert 0 < int(is_kept.sum()) < vis.numel()
        for rows, same in ((torch.arange(vis.numel())[~is_kept], True), (torch.arange(vis.numel())[is_kept], False)):
            h = _perturb_level(model, 1, rows)
            try:
                out = model(**inputs).logits[:, -1]
            finally:
                h.remove()
            assert torch.equal(dec.kept_visual()[0], kept)
            assert torch.equal(out, ref) == same
        # level 0 goes in after layer 0, where every token still is, but a dropped token's row ends there (the
        # decision reads layer 0's input): its level 0 reaches nothing either
        h = _perturb_level(model, 0, torch.arange(vis.numel())[~is_kept])
        try:
            assert torch.equal(model(**inputs).logits[:, -1], ref)
        finally:
            h.remove()


def test_decoder_budget_one_is_stock_inside_and_after_the_injection_layers(qwen3):
    """A decoder budget of 1.0 is the stock model bit for bit, injections included: the takeover of the
    injections (pre-hook on the language model, forward hooks on layers 0 and 1) calls the stock
    ``_deepstack_process`` with the stock mask and levels until something is pruned."""
    model, make = qwen3
    inputs = make(batch=3, images=[1, 0, 2], seed=9)
    with torch.no_grad():
        ref = model(**inputs).logits
        for layer in (1, 2):
            with attach_decoder(model, get("fastv", layer=layer, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("name,params", [("fastv", {"layer": 1, "budget": 0.3}),
                                         ("sparsevlm", {"layers": (0,), "ref_depth": 3, "budget": 0.4}),
                                         ("pyramiddrop", {"layers": (1,), "ref_depth": 3, "budget": 0.3})])
def test_decoder_methods_with_a_projector_method_batched_and_cached(qwen3, name, params):
    """Projector-stage VisionZip then a decoder method inside the injection layers: batch == one by one,
    cached == uncached (SparseVLM merges before the last injection: its recycled tokens get their members'
    mean level)."""
    model, make = qwen3
    inputs = make(batch=3, images=[2, 1, 0], seed=10)
    gen = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with torch.no_grad(), vtcompress.apply(model, [get("visionzip", budget=0.75), get(name, **params)]):
        batched = model.generate(**inputs, **gen)
        assert torch.equal(batched, model.generate(**inputs, use_cache=False, **gen))
        for b, one in enumerate(split_samples(inputs)):
            assert torch.equal(model.generate(**one, **gen)[0, -3:], batched[b, -3:]), f"sample {b}"


def test_follow_rows_closed_form():
    """Two stages: a prune keeps rows (0, 2, 3, 4) of 5 (row 4 a filler), then a merge sends rows 1 and 2 into
    row 1 and drops row 0: the kept visual rows get their own level rows, a merged row its members' mean."""
    mask = torch.tensor([[False, True, True, True, True]])
    level = torch.arange(8.0).reshape(4, 2)  # rows of positions 1, 2, 3, 4
    rel0 = torch.tensor([[0, 2, 3, 4]])
    real0 = torch.tensor([[True, True, True, False]])
    rel1 = torch.tensor([[1, 3]])
    real1 = torch.tensor([[True, True]])
    into1 = torch.tensor([[-1, 0, 0, 1]])  # prefix text dropped, positions 2 and 3 merged into row 0
    rows, feats = follow_rows(mask, level, [(rel0, real0, None)])
    assert rows.tolist() == [[False, True, True, False]]
    assert torch.equal(feats, level[[1, 2]])
    rows, feats = follow_rows(mask, level, [(rel0, real0, None), (rel1, real1, into1)])
    assert rows.tolist() == [[True, False]]  # row 1 came from the filler only: not visual
    assert torch.equal(feats, (level[1] + level[2])[None] / 2)


# ------------------------------------------------------------------------------------------ restoration, signals
def test_leaving_apply_restores_the_model(qwen3):
    model, make = qwen3
    inputs = make(batch=2, images=[1, 2], seed=11)
    with torch.no_grad():
        ref = model(**inputs).logits
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    impl = dict(model.config.vision_config.__dict__).get("_attn_implementation")
    with torch.no_grad(), vtcompress.apply(model, [get("visionzip", budget=0.5), get("fastv", layer=1, budget=0.5)]):
        changed = model(**inputs).logits
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == before
    assert dict(model.config.vision_config.__dict__).get("_attn_implementation") == impl
    assert changed.shape[1] < ref.shape[1]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_signal_is_mean_attention_received_at_the_last_block(qwen3):
    """Without [CLS], the attention signal is the per-image mean attention each patch receives at the last block
    (recomputed by hand from its q / k with the vision RoPE), summed over each 2x2 merger group; keys averaged."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    from vtcompress.models import adapter_for
    from vtcompress.models.signals import capture_signals

    model, make = qwen3
    inputs = make(batch=2, images=[1, 1], seed=12)
    adapter = adapter_for(model)
    block = adapter.vision_layers(model)[-1]
    seen = {}
    h = block.attn.register_forward_pre_hook(lambda m, a, k: seen.update(k, x=a[0]), with_kwargs=True)
    try:
        with capture_signals(model, model.config.vision_config, block.attn, has_cls=False, keys=True) as rec, \
                torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        h.remove()
    assert model.config.vision_config._attn_implementation == "sdpa"
    feats = list(out.pooler_output)
    attn = adapter.signal_to_features(model, inputs, [a[..., None] for a in rec.attn], "sum", feats)
    keys = adapter.signal_to_features(model, inputs, rec.keys, "mean", feats)
    x, (cos, sin), cu = seen["x"], seen["position_embeddings"], seen["cu_seqlens"]
    q, k, _ = block.attn.qkv(x).reshape(x.shape[0], 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    for i in range(2):
        s, e = int(cu[i]), int(cu[i + 1])
        qi, ki = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1)
        received = ((qi @ ki.transpose(1, 2)) * block.attn.scaling).softmax(-1).mean(1).mean(0)
        torch.testing.assert_close(attn[i][:, 0], received.reshape(-1, 4).sum(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(keys[i], ki.mean(0).reshape(-1, 4, ki.shape[-1]).mean(1), atol=1e-5, rtol=0)


def test_moe_variant_same_path():
    """Qwen3-VL-MoE goes through the same adapter: budget 1.0 is stock, a compressed batch equals one by one."""
    model, make = tiny_qwen3_vl(moe=True)
    inputs = make(batch=2, images=[1, 2], seed=13)
    gen = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)
        with vtcompress.apply(model, get("fastervlm", budget=1.0)):
            assert torch.equal(model.generate(**inputs, **gen), ref)
        with vtcompress.apply(model, [get("tome", budget=0.5), get("fastv", layer=1, budget=0.5)]):
            batched = model.generate(**inputs, **gen)
            for b, one in enumerate(split_samples(inputs)):
                assert torch.equal(model.generate(**one, **gen)[0, -3:], batched[b, -3:])
