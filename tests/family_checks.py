"""Checks every model family passes, shared by the per-family test files (``test_family_*.py``), so each family
file states only what is specific to the family."""

from __future__ import annotations

import torch
from transformers import AttentionInterface

import vtcompress
from models_util import IMAGE, SPECIAL, split_samples
from test_apply import ClsTopK, NormTopK, _hooks
from vtcompress import get

# placeholders are never generated: an uncached run re-reads the whole sequence, whose placeholder count must match
GEN = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "suppress_tokens": list(SPECIAL)}


def check_cached_equals_uncached(model, make, seed: int = 4) -> None:
    """Cached and uncached generation agree, one sample and a padded 0/1/2-image batch, both position schemes."""
    gen = {**GEN, "suppress_tokens": [IMAGE]}
    for inputs in (make(batch=1, images=[1], seed=seed), make(batch=3, images=[1, 0, 2], seed=seed)):
        for positions in ("original", "compact"):
            with torch.no_grad(), vtcompress.apply(model, ClsTopK(budget=0.5), positions=positions):
                cached = model.generate(**inputs, **gen)
                uncached = model.generate(**inputs, use_cache=False, **gen)
            assert torch.equal(cached, uncached), positions


def check_restoration(model, make, seed: int = 5) -> None:
    """A projector method composed with FastV, then the block is left: hooks, attention implementations, the
    attention registry and the config are as before, logits and generate are the stock model's."""
    inputs = make(batch=2, images=[2, 1], seed=seed)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, **GEN)
    hooks = _hooks(model)
    impl = (model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation)
    mapping = dict(AttentionInterface._global_mapping)
    config = model.config.to_dict()
    with torch.no_grad(), vtcompress.apply(model, [ClsTopK(budget=0.3), vtcompress.get("fastv", budget=0.5, layer=1)]):
        short = model.generate(**inputs, **GEN)
    assert short.shape == ref_ids.shape
    assert _hooks(model) == hooks and "generate" not in vars(model)
    assert (model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation) == impl
    assert AttentionInterface._global_mapping == mapping and model.config.to_dict() == config
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_ids)


def check_every_training_free_method_and_fastv(model, make, seed: int = 6) -> list[str]:
    """Every registered training-free projector method runs on a padded 0/1/2-image batch (fewer tokens, the
    original prompt returned); at budget 1.0 a method that keeps every token is the stock model; FastV at 1.0
    is the stock model and at 0.5 a batch equals its samples one by one. Returns the methods that ran."""
    inputs = make(batch=3, images=[1, 0, 2], seed=seed)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, **GEN)
    names = [r["name"] for r in vtcompress.method_info() if r["stage"] == "projector" and not r["trainable"]
             and r["family"] != "temporal"]  # temporal methods act on clips: tests/test_temporal.py
    ran = []
    for name in names:
        try:
            method, full = vtcompress.get(name, budget=0.5), vtcompress.get(name, budget=1.0)
        except ValueError:  # a structural output count (pixel unshuffle's fixed 4x)
            continue
        with torch.no_grad(), vtcompress.apply(model, method) as handle:
            try:
                ids = model.generate(**inputs, **GEN)
            except ValueError as err:  # a width-changing method on a projector that does not take it
                assert "feature width" in str(err), name
                continue
        before, after = handle.last.num_tokens[:, 0], handle.last.num_tokens[:, 1]
        assert bool((after <= before).all()) and bool((after < before).any()), name
        assert torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]), name
        with torch.no_grad(), vtcompress.apply(model, full) as handle:
            logits = model(**inputs).logits
        # PruMerge / PruMerge+ add their neighbours to every kept token (the reference), even at an unchanged count
        if torch.equal(handle.last.num_tokens[:, 0], handle.last.num_tokens[:, 1]) and \
                name not in ("prumerge", "prumerge_plus"):
            m = inputs["attention_mask"].bool()
            torch.testing.assert_close(logits[m], ref[m], atol=1e-6, rtol=0, msg=name)
        ran.append(name)
    assert {"fastervlm", "visionzip", "prumerge", "prumerge_plus", "divprune", "tome", "random", "uniform",
            "avg_pool"} <= set(ran), ran
    with torch.no_grad():
        with vtcompress.apply(model, vtcompress.get("fastv", budget=1.0, layer=1)):
            assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
        with vtcompress.apply(model, vtcompress.get("fastv", budget=0.5, layer=1)):
            batched = model.generate(**inputs, **GEN)
            for b, one in enumerate(split_samples(inputs)):
                assert torch.equal(model.generate(**one, **GEN)[0, -3:], batched[b, -3:]), b
    return ran


def decoder_kept_per_image(model, inputs, method, closes) -> list[list[int]]:
    """Visual tokens each image keeps after the decoder stage's (last) prune, per sample, image by image, in the
    prompt the decoder saw (shortened by a projector method when one runs). ``closes(ids_row) -> [int]`` gives,
    by hand, the position of the token that closes each image of a row (an image's tokens are those after the
    previous closer)."""
    with torch.no_grad(), vtcompress.apply(model, method) as handle:
        model(**inputs)
        kept = handle._decoder.kept_visual()
        ids = (handle.last.inputs if handle.last is not None else inputs)["input_ids"]
    out = []
    for b, k in enumerate(kept):
        ends = closes(ids[b])
        out.append([int(((k > lo) & (k < hi)).sum()) for lo, hi in zip([-1, *ends][: len(ends)], ends, strict=True)])
    return out


def check_second_turn(model, make, seed: int = 7) -> None:
    """Multi-turn chat: turn 2 through the KV cache a compressed turn 1 returned gives the tokens and logits of
    the whole conversation run from scratch under the same (image-only) projector method, both position schemes."""
    inputs = make(batch=2, images=[1, 1], seed=seed)
    new = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = {**GEN, "suppress_tokens": [IMAGE, 121, 122, 123], "output_logits": True, "return_dict_in_generate": True}
    for positions in ("original", "compact"):
        with torch.no_grad(), vtcompress.apply(model, NormTopK(budget=0.5), positions=positions):
            first = model.generate(**inputs, **out)
            ids = torch.cat([first.sequences, new], dim=1)
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, ids.shape[1] - inputs["attention_mask"].shape[1],
                                                                   dtype=torch.long)], dim=1)
            images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            ref = model.generate(input_ids=ids, attention_mask=mask, **images, **out)
            cont = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **out)
        assert torch.equal(cont.sequences, ref.sequences), positions
        for x, y in zip(cont.logits, ref.logits, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def check_half_precision(build, dtype: torch.dtype) -> None:
    """In ``dtype`` (bf16 / fp16): budget 1.0 generates the stock ids; compressed features keep that dtype."""
    model, make = build(seed=1)
    model.to(dtype)
    inputs = make(batch=2, images=[2, 1])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN)
        with vtcompress.apply(model, ClsTopK(budget=1.0)):
            assert torch.equal(model.generate(**inputs, **GEN), ref)
        res = vtcompress.compress_inputs(model, ClsTopK(budget=0.5), **inputs)
        model(**res.inputs)
    assert all(f.dtype == dtype for f in res.inputs["mm_encoder_outputs"]["image"].pooler_output)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def every_projector_method_with_fastv(model, inputs: dict, fastv_layer: int = 1) -> list[str]:
    """Every training-free projector-stage method, composed with FastV at ``fastv_layer``, on ``inputs`` (a
    left-padded batch): each sample gets its one-by-one tokens, cached == uncached generate, fewer image tokens;
    budget 1.0 (both stages) is the stock model bit for bit where the method keeps every token unchanged; leaving
    the blocks restores the model exactly. Returns the methods that ran."""
    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-capturing hooks on the first run
        ref_logits = model(**inputs).logits
        ref_ids = model.generate(**inputs, **GEN)
    hooks = _hook_count(model)
    names = [r["name"] for r in vtcompress.method_info() if r["stage"] == "projector" and not r["trainable"]
             and r["family"] != "temporal"]  # temporal methods act on clips: tests/test_temporal.py
    ran = []
    n_new = GEN["max_new_tokens"]
    for name in names:
        try:
            method = get(name, budget=0.5)
        except ValueError:  # a fixed-ratio method (pixel unshuffle) takes no other budget
            continue
        with torch.no_grad(), vtcompress.apply(model, [method, get("fastv", budget=0.5, layer=fastv_layer)]) as h:
            try:
                batched = model.generate(**inputs, **GEN)
            except ValueError as e:  # widens the features: refused on a model without a projector trained for it
                assert "feature width" in str(e), name
                continue
            assert torch.equal(batched, model.generate(**inputs, use_cache=False, **GEN)), name
            before, after = h.last.num_tokens.unbind(1)
            assert bool((after < before).all()), name
            for b, one in enumerate(split_samples(inputs)):
                alone = model.generate(**one, **GEN)
                assert torch.equal(alone[0, -n_new:], batched[b, -n_new:]), (name, b)
        ran.append(name)
        full = [get(name, budget=1.0), get("fastv", budget=1.0, layer=fastv_layer)]
        with torch.no_grad(), vtcompress.apply(model, full) as h:
            full_logits = model(**inputs).logits
            full_ids = model.generate(**inputs, **GEN)
        if torch.equal(h.last.num_tokens[:, 0], h.last.num_tokens[:, 1]) and \
                name not in ("prumerge", "prumerge_plus"):  # those add their neighbours to every kept token
            valid = inputs["attention_mask"].bool()
            assert torch.equal(full_logits[valid], ref_logits[valid]), name
            assert torch.equal(full_ids, ref_ids), name
    assert {"fastervlm", "visionzip", "prumerge", "divprune", "random", "avg_pool", "tome"} <= set(ran)
    assert _hook_count(model) == hooks
    assert "generate" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
    return ran
