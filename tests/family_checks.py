"""Checks every model family's test file runs on its tiny model (kept here so each family file states only what is
specific to the family)."""

from __future__ import annotations

import torch

import vtcompress
from models_util import SPECIAL, split_samples
from vtcompress import get

# placeholders are never generated: an uncached run re-reads the whole sequence, whose placeholder count must match
GEN = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "suppress_tokens": list(SPECIAL)}


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
    names = [r["name"] for r in vtcompress.method_info() if r["stage"] == "projector" and not r["trainable"]]
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
