"""Review of issue 13's guarantees on inputs beyond tests/test_guarantees.py: signals that methods rank by but
``VisualTokens.validate`` did not check, DART's text pivots of another width, decoder-stage layers assigned inside
an active block, multi-turn chat with a decoder-stage method whose decision does not depend on the later text
(so the from-scratch conversation is a valid reference), and three threads with composed method lists."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

import vtcompress
from methods_util import make_tokens
from models_util import BUILDERS, IMAGE
from test_guarantees import GEN, NormTopK, _conversation, _deep_llava, _same
from vtcompress.methods.attention import FastV


# ------------------------------------------------------------------------------------------ signal values
def _tokens():
    return make_tokens(b=2, grid=(4, 4), d=6, counts=[16, 11], seed=3)


def test_nan_keys_attn_text_are_refused():
    """Before: NaN keys (DART, ToMe's metric), NaN decoder attention (FastV, SparseVLM, PyramidDrop) and NaN prompt
    embeddings were accepted and ranked silently. Padding (invalid tokens / prompt rows) may still hold anything."""
    t = _tokens()
    keys = t.keys.clone()
    keys[0, 3, 1] = float("nan")
    attn = torch.rand(2, 16, 3)
    bad_attn = attn.clone()
    bad_attn[1, 2, 0] = float("inf")
    text = t.text.clone()
    text[1, 0, 0] = float("nan")
    for tokens, message, methods in (
        (t.replace(keys=keys), "keys contain NaN/inf", ["dart", "tome"]),
        (t.replace(attn=bad_attn), "attn contains NaN/inf", ["fastv", "pyramiddrop"]),
        (t.replace(text=text), "text contains NaN/inf", ["dart"]),
    ):
        with pytest.raises(ValueError, match=message):
            tokens.validate()
        for name in methods:
            with pytest.raises(ValueError, match=message):
                vtcompress.get(name, budget=4)(tokens)
    # not read, not checked: padded tokens (row 1 has 11 valid) and padded prompt rows
    pad = attn.clone()
    pad[1, 12:] = float("nan")
    pad[:, :, 2] = float("nan")
    text_mask = torch.tensor([[True, True, False]] * 2)
    t.replace(attn=pad, text_mask=text_mask).validate()
    padded_text = t.text.clone()
    padded_text[:, 2] = float("nan")
    t.replace(text=padded_text, text_mask=text_mask).validate()


def test_dart_text_pivots_of_another_width_are_refused():
    """Before: a RuntimeError from a gather deep in DART; text pivots are compared with the visual tokens."""
    t = _tokens().replace(text=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"text pivots need prompt embeddings of the tokens' width.*\[B, T, 5\]"):
        vtcompress.get("dart", budget=4)(t)
    vtcompress.get("dart", budget=4, pivot_text=0)(t).validate()  # image pivots only: the text is not read


# ------------------------------------------------------------------------------------------ fields inside a block
def _deep_inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 100, (2, 3), generator=gen), torch.full((2, 16), IMAGE),
                     torch.randint(3, 100, (2, 4), generator=gen)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


def test_decoder_layer_assigned_inside_a_block_is_refused():
    """Before: ``m.layer = 3`` inside the block kept pruning at layer 1 (the hooks' plan), silently; a layer out of
    range was accepted too. Now the next call raises one clear error; the plan back as installed runs again."""
    model = _deep_llava()
    inputs = _deep_inputs()
    fastv = vtcompress.get("fastv", budget=0.5, layer=1)
    pdrop = vtcompress.get("pyramiddrop", budget=0.5, layers=(1, 2), ref_depth=4)
    with torch.no_grad():
        with vtcompress.apply(model, fastv):
            ref = model(**inputs).logits
            fastv.layer = 3
            with pytest.raises(ValueError, match=r"layers changed inside the apply block \(fastv \(1,\) -> \(3,\)\)"):
                model(**inputs)
            with pytest.raises(ValueError, match="layers changed inside the apply block"):
                model.generate(**inputs, **GEN)
            fastv.layer = 1
            assert torch.equal(model(**inputs).logits, ref)
        with vtcompress.apply(model, pdrop):
            model(**inputs)
            pdrop.layers = (2, 3)  # ref_depth 4 on 4 layers: stages (2, 3) instead of (1, 2)
            with pytest.raises(ValueError, match=r"pyramiddrop \(1, 2\) -> \(2, 3\)"):
                model(**inputs)
            pdrop.layers = (2, 1)  # the same stages in another order: the same plan
            model(**inputs)
    assert "generate" not in vars(model)


# ------------------------------------------------------------------------------------------ multi-turn, decoder stage
@dataclass
class HiddenNormFastV(FastV):
    """FastV's pruning, scored by the hidden-state norm of each visual token at layer ``K - 1``: a causal LLM gives
    the image tokens the same hidden states whatever text follows them, so the decision of turn 1 is also the one
    a from-scratch run of the whole conversation makes, and turn 2 through the pruned cache must equal it exactly
    (FastV's own score reads the LAST token's attention, which moves with the conversation)."""

    name = "test_hidden_norm_fastv"

    def score(self, tokens):
        return tokens.x.float().norm(dim=-1)


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    if family not in models:
        models[family] = BUILDERS[family]()
    return models[family]


@pytest.mark.parametrize(("family", "images", "projector"), [
    ("llava", [1, 1], False), ("llava_next", [2, 1], True), ("qwen2_5_vl", [1, 0], True), ("internvl", [1, 1], True),
    ("onevision", [0, 1], False),
])
def test_decoder_stage_second_turn_equals_the_conversation_from_scratch(models, family, images, projector):
    """Left-padded batch of two (rows with 2 / 1 / 0 images), alone or after a projector-stage method, turn 2 with
    a different ``max_new_tokens``: tokens and logits equal the whole conversation from scratch."""
    model, make = _model(models, family)
    inputs = make(batch=2, images=images, seed=3)
    new = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = {**GEN, "output_logits": True, "return_dict_in_generate": True}
    out2 = {**out, "max_new_tokens": 5, "min_new_tokens": 5}
    methods = [NormTopK(budget=0.5)] * projector + [HiddenNormFastV(budget=0.5, layer=1)]
    with torch.no_grad(), vtcompress.apply(model, methods):
        first = model.generate(**inputs, **out)
        turn2, scratch = _conversation(inputs, first, new)
        ref = model.generate(**scratch, **out2)
        cont = model.generate(**turn2, past_key_values=first.past_key_values, **out2)
    _same(cont, ref)


# ------------------------------------------------------------------------------------------ threads
def test_three_threads_with_composed_lists_and_failing_blocks():
    """Three threads with different [projector, decoder] lists, each also entering (and failing inside) a nested
    decoder apply now and then, and a fourth whose blocks raise after a call and which calls the model outside
    them: every result equals its single-thread run, the outside calls are stock, the model comes back clean."""
    model = _deep_llava()
    inputs = _deep_inputs()
    fastv = {"budget": 0.5, "layer": 2}
    lists = [[NormTopK(budget=0.5), vtcompress.get("fastv", **fastv)],
             [vtcompress.get("visionzip", budget=0.5), vtcompress.get("pyramiddrop", budget=0.5, layers=(1, 2),
                                                                      ref_depth=4)],
             [vtcompress.get("random", budget=0.5)]]
    with torch.no_grad():
        stock = model(**inputs).logits
        alone = []
        for methods in lists:
            with vtcompress.apply(model, methods):
                alone.append((model(**inputs).logits, model.generate(**inputs, **GEN)))
    results: list = [[] for _ in range(4)]
    errors: list = []
    barrier = threading.Barrier(4)

    def work(k):
        try:
            barrier.wait()
            for i in range(6):
                with torch.no_grad(), vtcompress.apply(model, lists[k]):
                    results[k].append((model(**inputs).logits, model.generate(**inputs, **GEN)))
                    if k == 2 and i % 2 == 0:  # random is projector-only: a decoder apply nests inside it
                        with pytest.raises(RuntimeError), vtcompress.apply(model, vtcompress.get("fastv", **fastv)):
                            model(**inputs)
                            raise RuntimeError("boom")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def failing():
        try:
            barrier.wait()
            for _ in range(6):
                with pytest.raises(KeyError), torch.no_grad(), vtcompress.apply(model, lists[0]):
                    model(**inputs)
                    raise KeyError("boom")
                with torch.no_grad():
                    results[3].append(model(**inputs).logits)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)] + [threading.Thread(target=failing)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(3):
        assert len(results[k]) == 6
        for logits, ids in results[k]:
            torch.testing.assert_close(logits, alone[k][0], atol=1e-6, rtol=1e-6)
            assert torch.equal(ids, alone[k][1])
    assert len(results[3]) == 6 and all(torch.equal(r, stock) for r in results[3])
    assert "generate" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
