"""Regression tests of decoder-stage defects found on configurations the other tests did not use (issue 12).

* a text-only prompt, or a batch where no row has an image, runs like the stock model for every decoder method
  (DART raised ``cannot reshape tensor of 0 elements``);
* int budgets count per image, as at the projector stage (a two-image sample with ``budget=3`` kept 3 in total);
* LLaVA-NeXT / OneVision ``image_newline`` tokens are image placeholders that carry no patch: never pruned, not
  counted;
* PyramidDrop's ``budget=1.0`` is the stock model (its later stages used to keep ``ratio`` whatever the budget).
"""

from __future__ import annotations

import pytest
import torch

from models_util import BUILDERS, IMAGE, split_samples, tiny_llava, tiny_llava_next, tiny_onevision, tiny_qwen2_vl
from vtcompress import get
from vtcompress.models.decoder import attach_decoder, language_model_of

METHODS = {
    "fastv": {"layer": 1},
    "pyramiddrop": {"layers": (1,), "ref_depth": 2},
    "sparsevlm": {"layers": (0,), "ref_depth": 2},
    "dart": {"layer": 1, "pivot_image": 2, "pivot_text": 2},
}


def _gen(model, inputs, n=3):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _runs(ids_row: torch.Tensor) -> list[torch.Tensor]:
    """Positions of each contiguous placeholder run (image) of one row."""
    pos = (ids_row == IMAGE).nonzero().squeeze(1)
    cuts = (pos[1:] != pos[:-1] + 1).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(pos, cuts.tolist()))


# ---------------------------------------------------------------------------------------------- text only
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("images", [[0], [0, 0]], ids=["one-text-only", "batch-without-images"])
def test_text_only_runs_like_stock(name, images):
    model, make = tiny_llava()
    inputs = make(batch=len(images), images=images, padding="left", seed=2)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_ids = _gen(model, inputs)
    with attach_decoder(model, get(name, budget=0.5, **METHODS[name])), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(_gen(model, inputs), ref_ids)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mixed_batch_text_only_row_matches_alone(name):
    """A row without an image next to one with an image: each row equals its own run."""
    model, make = tiny_llava()
    inputs = make(batch=2, images=[0, 1], padding="left", seed=3)
    with attach_decoder(model, get(name, budget=0.5, **METHODS[name])):
        batch = _gen(model, inputs)
        keep = inputs["attention_mask"][0].bool()
        alone = {"input_ids": inputs["input_ids"][:1, keep], "attention_mask": inputs["attention_mask"][:1, keep]}
        one = _gen(model, alone)
    n = one.shape[1] - alone["input_ids"].shape[1]
    assert torch.equal(one[0, alone["input_ids"].shape[1]:], batch[0, inputs["input_ids"].shape[1]:][:n])


# ---------------------------------------------------------------------------------------------- per image
PER_IMAGE = {
    "fastv": {"layer": 1},
    "pyramiddrop": {"layers": (1,), "ref_depth": 2},
    "sparsevlm": {"layers": (0,), "ref_depth": 2},
    "dart": {"layer": 1, "pivot_image": 2, "pivot_text": 2, "exact_budget": True},
}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", sorted(PER_IMAGE))
def test_int_budget_counts_per_image(family, name):
    model, make = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}[family]()
    inputs = make(batch=2, images=[2, 1], padding="left", seed=4)
    with attach_decoder(model, get(name, budget=3, **PER_IMAGE[name])) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual()
    for b in range(2):
        runs = _runs(inputs["input_ids"][b])
        assert len(runs) == [2, 1][b]
        for run in runs:  # 3 kept in each image
            assert int(torch.isin(kept[b], run).sum()) == 3, (b, run, kept[b])


def test_dart_reference_count_is_per_image():
    """DART's reference count (visual pivots + P * int(T / P)) applies to each image of a sample."""
    model, make = tiny_llava()
    inputs = make(batch=1, images=[2], padding="left", seed=5)
    with attach_decoder(model, get("dart", budget=4, layer=1, pivot_image=1, pivot_text=1)) as handle, \
            torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual()[0]
    for run in _runs(inputs["input_ids"][0]):
        assert int(torch.isin(kept, run).sum()) == 1 + 2 * (4 // 2)


# ---------------------------------------------------------------------------------------------- image_newline
@pytest.mark.parametrize("family", ["llava_next", "onevision"])
def test_image_newline_is_never_pruned_nor_counted(family):
    model, make = {"llava_next": tiny_llava_next, "onevision": tiny_onevision}[family]()
    inputs = make(batch=2, images=[1, 1], padding="left", seed=1)
    nl = model.model.image_newline
    lm = language_model_of(model)
    seen = {}
    hook = lm.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("h", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    is_nl = (seen["h"] == nl).all(-1) & (inputs["input_ids"] == IMAGE)
    assert bool(is_nl.any(1).all())  # the packed layout has newline tokens in every image
    with attach_decoder(model, get("fastv", budget=0.25, layer=1)) as handle, torch.no_grad():
        model(**inputs)
        keep, ok = handle.kept()
        kept = handle.kept_visual()
        assert torch.equal(_gen(model, inputs), _gen(model, inputs | {"use_cache": False}))
    for b in range(2):
        newlines = is_nl[b].nonzero().squeeze(1)
        assert bool(torch.isin(newlines, keep[b][ok[b]]).all())  # every newline survives
        n_patch = int(((inputs["input_ids"][b] == IMAGE) & ~is_nl[b]).sum())
        assert len(kept[b]) == round(0.25 * n_patch)  # the budget counts patch tokens only
        assert not bool(torch.isin(kept[b], newlines).any())


# ---------------------------------------------------------------------------------------------- budget 1.0
def test_pyramiddrop_full_budget_is_stock_with_the_default_lambda():
    from transformers import LlavaForConditionalGeneration

    model, make = tiny_llava()
    cfg = model.config
    cfg.text_config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    inputs = make(batch=2, images=[1, 2], padding="left", seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
    with attach_decoder(model, get("pyramiddrop", budget=1.0, layers=(1, 2, 3), ref_depth=4)), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


# ---------------------------------------------------------------------------------------------- merged-token order
def test_sparsevlm_later_stages_keep_the_causal_order_of_appended_merged_tokens():
    """Merged tokens appended after their image's kept ones at stage 0 stay out of positional order at later
    stages: every later layer's mask must be causal in the sequence order (SDPA without a mask was right, eager and
    padded masks gathered by position were not)."""
    from transformers import LlavaForConditionalGeneration

    outs = {}
    for attn in ("eager", "sdpa"):
        model, make = tiny_llava(attn=attn)
        cfg = model.config
        cfg.text_config.num_hidden_layers = 4
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).eval()
        if attn != "sdpa":
            model.set_attn_implementation(attn)
        inputs = make(batch=3, images=[1, 2, 1], padding="left", seed=3)
        method = get("sparsevlm", budget=2, layers=(0, 1, 2), ref_depth=4, stage_tokens=(3, 2, 1))
        with attach_decoder(model, method), torch.no_grad():
            outs[attn, "batch"] = model(**inputs).logits[:, -1]
            keep = inputs["attention_mask"][1].bool()
            one = {"input_ids": inputs["input_ids"][1:2, keep], "attention_mask": inputs["attention_mask"][1:2, keep],
                   "pixel_values": inputs["pixel_values"][1:3]}
            outs[attn, "one"] = model(**one).logits[0, -1]
    for a in ("eager", "sdpa"):
        torch.testing.assert_close(outs[a, "one"], outs["eager", "batch"][1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[a, "batch"], outs["eager", "batch"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- every family
FAMILY_METHODS = {
    "fastv": {"layer": 1, "budget": 0.3},
    "pyramiddrop": {"layers": (1,), "ref_depth": 2, "budget": 0.3},
    "sparsevlm": {"layers": (0,), "ref_depth": 2, "budget": 0.3},
    "dart": {"layer": 1, "budget": 0.5, "pivot_image": 2, "pivot_text": 2},
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_every_method_every_family_cache_batch_and_full_budget(family):
    """Per-image rows, newline handling and compact positions on every family: cached == uncached, a batch with a
    two-image row and a text-only row == one by one, budget 1.0 == stock."""
    model, make = BUILDERS[family]()
    inputs = make(batch=3, images=[1, 2, 0], padding="left", seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
    for name, params in FAMILY_METHODS.items():
        with attach_decoder(model, get(name, **params)):
            cached = _gen(model, inputs)
            assert torch.equal(cached, _gen(model, inputs | {"use_cache": False})), name
            for b, one in enumerate(split_samples(inputs)):
                new = _gen(model, one)[0, one["input_ids"].shape[1]:]
                assert torch.equal(new, cached[b, inputs["input_ids"].shape[1]:][: len(new)]), (name, b)
        with attach_decoder(model, get(name, **(params | {"budget": 1.0}))), torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref), name
