"""What ``vtcompress.apply`` promises beyond one call (issue 13): multi-turn chat with a returned KV cache, handle
re-entry, ``copy.deepcopy`` inside a block, nested applies, threads, and the arguments it refuses."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtcompress
from models_util import BUILDERS, IMAGE, _clip
from vtcompress import ScoreCompressor, VisualTokens

SPECIAL = [IMAGE, 121, 122, 123]  # placeholder / vision start-end ids of the tiny models: never generated
GEN = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "suppress_tokens": SPECIAL}


@dataclass
class NormTopK(ScoreCompressor):
    """Keep the tokens of largest feature norm: deterministic, independent of the text and of the batch."""

    name = "test_guarantee_norm_topk"
    family = "baseline"

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        return tokens.x.float().norm(dim=-1)


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


def _deep_llava(layers: int = 4, seed: int = 0):
    """tiny_llava with a 4-layer LLM, so multi-stage decoder methods (SparseVLM) have room."""
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=_clip(), text_config=text, image_token_id=IMAGE, image_seq_length=16,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def _hooks(model) -> dict:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


# ------------------------------------------------------------------------------------------ multi-turn
def _conversation(inputs: dict, first, new: torch.Tensor):
    """Turn 2 as the Hugging Face chat pattern writes it: the first output's sequences, then the new tokens; and
    the same conversation from scratch (images included)."""
    ids = torch.cat([first.sequences, new], dim=1)
    grow = ids.shape[1] - inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], grow, dtype=torch.long)], dim=1)
    scratch = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        tt = inputs["mm_token_type_ids"]
        scratch["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(tt.shape[0], grow)], dim=1)
    return {"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "attention_mask": mask, **scratch}


def _same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


CASES = [(f, p) for f in ("llava", "llava_next", "onevision", "internvl") for p in ("original", "compact")]
CASES += [("qwen2_vl", None), ("qwen2_5_vl", None)]


@pytest.mark.parametrize(("family", "positions"), CASES)
def test_second_turn_with_the_cache_equals_the_conversation_from_scratch(models, family, positions):
    """A projector-stage method (its decision depends on the image only): turn 2 through the returned cache gives
    the tokens and logits of the whole conversation run from scratch under the same method (before the fix the
    cache held the shortened prompt while the ids held the original one). Continuing the cache after the block
    raises instead of mixing coordinates."""
    model, make = models[family]
    inputs = make(batch=2, images=[1, 1], seed=3)
    new = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = {**GEN, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad(), vtcompress.apply(model, NormTopK(budget=0.5), positions=positions) as handle:
        first = model.generate(**inputs, **out)
        assert int(handle.last.num_tokens[:, 1].sum()) < int(handle.last.num_tokens[:, 0].sum())
        turn2, scratch = _conversation(inputs, first, new)
        ref = model.generate(**scratch, **out)
        cont = model.generate(**turn2, past_key_values=first.past_key_values, **out)
        _same(cont, ref)
        # a third turn continues the same cache
        turn3, scratch3 = _conversation(scratch, cont, new[:, :2])
        _same(model.generate(**turn3, past_key_values=cont.past_key_values, **out), model.generate(**scratch3, **out))
    with torch.no_grad(), pytest.raises(ValueError, match="only be continued inside the same apply block"):
        model.generate(**turn2, past_key_values=first.past_key_values, **out)


def test_second_turn_after_reentry_or_with_images_is_refused(models):
    model, make = models["llava"]
    inputs = make(batch=1, images=[1], seed=2)
    out = {**GEN, "return_dict_in_generate": True}
    handle = vtcompress.apply(model, NormTopK(budget=0.5))
    with torch.no_grad(), handle:
        first = model.generate(**inputs, **out)
        turn2, scratch = _conversation(inputs, first, torch.tensor([[5, 6]]))
        with pytest.raises(ValueError, match="already holds the conversation's images"):
            model.generate(**scratch, past_key_values=first.past_key_values, **out)
        with pytest.raises(ValueError, match="do not start with the ids"):
            model.generate(input_ids=turn2["input_ids"].flip(1), attention_mask=turn2["attention_mask"],
                           past_key_values=first.past_key_values, **out)
        beams = model.generate(**inputs, **{**out, "num_beams": 2})
        with pytest.raises(ValueError, match="beam search keeps every beam"):
            model.generate(**_conversation(inputs, beams, torch.tensor([[5, 6]]))[0],
                           past_key_values=beams.past_key_values, **out)
    with torch.no_grad(), handle, pytest.raises(ValueError, match="same apply block"):
        model.generate(**turn2, past_key_values=first.past_key_values, **out)


def test_callers_own_cache_is_continued_and_guarded(models):
    """The caller passes their own DynamicCache to turn 1 (no return_dict_in_generate): turn 2 with it equals the
    conversation from scratch; after the block it refuses, like the cache generate returns."""
    from transformers import DynamicCache

    model, make = models["onevision"]
    inputs = make(batch=1, images=[1], seed=7)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad(), vtcompress.apply(model, NormTopK(budget=0.5)):
        seqs = model.generate(**inputs, past_key_values=cache, **GEN)
        ids = torch.cat([seqs, torch.tensor([[7, 8, 9]])], dim=1)
        turn2 = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        scratch = {**{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}, **turn2}
        assert torch.equal(model.generate(**turn2, past_key_values=cache, **GEN)[:, -3:],
                           model.generate(**scratch, **GEN)[:, -3:])
    with torch.no_grad(), pytest.raises(ValueError, match="same apply block"):
        model(**turn2, past_key_values=cache)


def test_second_turn_with_shortened_sequences(models):
    """restore_prompt=False: the caller continues in the cache's own (shortened) coordinates; same result."""
    model, make = models["llava"]
    inputs = make(batch=2, images=[1, 1], seed=4)
    new = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = {**GEN, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        with vtcompress.apply(model, NormTopK(budget=0.25), positions="original"):
            first = model.generate(**inputs, **out)
            turn2, _ = _conversation(inputs, first, new)
            ref = model.generate(**turn2, past_key_values=first.past_key_values, **out)
        with vtcompress.apply(model, NormTopK(budget=0.25), positions="original", restore_prompt=False) as handle:
            short = model.generate(**inputs, **out)
            assert short.sequences.shape[1] < first.sequences.shape[1]
            ids = torch.cat([short.sequences, new], dim=1)
            mask = handle.last.inputs["attention_mask"]
            mask = torch.cat([mask, mask.new_ones(2, ids.shape[1] - mask.shape[1])], dim=1)
            cont = model.generate(input_ids=ids, attention_mask=mask, past_key_values=short.past_key_values, **out)
    assert torch.equal(cont.sequences[:, -3:], ref.sequences[:, -3:])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("projector", [False, True])
def test_decoder_stage_second_turn_survives_another_prefill(models, family, projector):
    """FastV (alone, or after a projector-stage method): turn 2 through the cache is the same whether or not a
    prefill of another prompt ran in between (the decision is kept per cache, not only as the handle's last run;
    a deep copy of the cache carries it too)."""
    model, make = models[family]
    inputs = make(batch=1, images=[1], seed=5)
    other = make(batch=1, images=[1], seed=6)
    new = torch.tensor([[5, 6, 7, 8]])
    out = {**GEN, "output_logits": True, "return_dict_in_generate": True}
    methods = [NormTopK(budget=0.5)] * projector + [vtcompress.get("fastv", budget=0.25, layer=1)]
    with torch.no_grad(), vtcompress.apply(model, methods):
        first = model.generate(**inputs, **out)
        turn2, _ = _conversation(inputs, first, new)
        ref = model.generate(**turn2, past_key_values=copy.deepcopy(first.past_key_values), **out)
        model.generate(**other, **out)  # another prefill: the handle's last run is now this one
        cont = model.generate(**turn2, past_key_values=first.past_key_values, **out)
    _same(cont, ref)
    with torch.no_grad(), pytest.raises(ValueError, match="same apply block"):
        model.generate(**turn2, past_key_values=first.past_key_values, **out)


# ------------------------------------------------------------------------------------------ re-entry, copies
def test_reentering_a_handle_compresses_again(models):
    """``h = apply(...)``; ``with h:`` twice: the second block compresses too (before: it ran stock)."""
    model, make = models["llava"]
    inputs = make(batch=2, images=[1, 1])
    with torch.no_grad():
        stock = model(**inputs).logits
        hooks = _hooks(model)
        handle = vtcompress.apply(model, NormTopK(budget=0.25))
        with handle:
            first = model(**inputs).logits
        assert _hooks(model) == hooks and "generate" not in vars(model)
        with handle:
            with handle:  # nested entries of one handle count: the inner exit keeps it installed
                pass
            second = model(**inputs).logits
        assert _hooks(model) == hooks and "generate" not in vars(model)
        assert torch.equal(model(**inputs).logits, stock)
    assert first.shape[1] < stock.shape[1]
    assert torch.equal(first, second)


@pytest.mark.parametrize("method", ["projector", "both"])
def test_deepcopy_inside_apply_is_stock(models, method):
    """A deep copy made inside the block runs stock (inside and after the block) and sheds the copied hooks and
    ``generate`` on its first call; the original stays compressed."""
    model, make = models["llava"]
    inputs = make(batch=2, images=[1, 1])
    methods = [NormTopK(budget=0.25)] + ([vtcompress.get("fastv", budget=0.5, layer=1)] if method == "both" else [])
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_ids = model.generate(**inputs, **GEN)
        hooks = _hooks(model)
        with vtcompress.apply(model, methods):
            twin = copy.deepcopy(model)
            assert torch.equal(twin(**inputs).logits, stock)
            assert torch.equal(twin.generate(**inputs, **GEN), stock_ids)
            assert _hooks(twin) == hooks and "generate" not in vars(twin)
            assert model(**inputs).logits.shape[1] < stock.shape[1]
        assert torch.equal(twin(**inputs).logits, stock)


# ------------------------------------------------------------------------------------------ nesting
def test_nested_apply_composes_or_refuses(models):
    """Outer decoder-stage + inner projector-stage apply equals the list form (before: index errors deep in the
    decoder stage); the same stage twice is refused at entry with one message naming the rule."""
    model, make = models["llava"]
    inputs = make(batch=2, images=[1, 1], seed=1)
    fastv = vtcompress.get("fastv", budget=0.5, layer=1)
    with torch.no_grad():
        with vtcompress.apply(model, [NormTopK(budget=0.5), fastv]):
            ref_logits = model(**inputs).logits
            ref_ids = model.generate(**inputs, **GEN)
        for outer, inner in (([fastv], [NormTopK(budget=0.5)]), ([NormTopK(budget=0.5)], [fastv])):
            with vtcompress.apply(model, outer), vtcompress.apply(model, inner):
                assert torch.equal(model(**inputs).logits, ref_logits)
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
        for outer, inner in ((fastv, vtcompress.get("fastv", budget=0.25, layer=1)),
                             (NormTopK(budget=0.5), vtcompress.get("visionzip", budget=0.5)),
                             ([NormTopK(budget=0.5), fastv], fastv)):
            with vtcompress.apply(model, outer):
                with pytest.raises(ValueError, match="never the same stage twice"):
                    vtcompress.apply(model, inner)
                model(**inputs)  # the outer one still works


# ------------------------------------------------------------------------------------------ threads
def _worker(model, inputs, method, n, results, errors, barrier):
    try:
        barrier.wait()
        if method is None:
            with torch.no_grad():
                results.extend(model(**inputs).logits if i % 4 else model.generate(**inputs, **GEN) for i in range(n))
            return
        with torch.no_grad(), vtcompress.apply(model, method):
            for i in range(n):
                results.append(model(**inputs).logits if i % 4 else model.generate(**inputs, **GEN))
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


@pytest.mark.parametrize("pair", [("fastv", "visionzip"), ("sparsevlm", "random")])
def test_threads_share_one_model(pair):
    """Two threads x 40 calls, each in its own apply with a different method on one model, plus a thread calling
    the model outside apply: every result equals its single-thread run (before: KeyError / size mismatches,
    signal errors, and the outside thread compressed too)."""
    model = _deep_llava()
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 100, (2, 3), generator=gen), torch.full((2, 16), IMAGE),
                     torch.randint(3, 100, (2, 4), generator=gen)], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    kw = {"fastv": {"layer": 2}, "sparsevlm": {"layers": (1, 2), "ref_depth": 4}}
    methods = [vtcompress.get(name, budget=0.5, **kw.get(name, {})) for name in pair]
    n = 40
    alone = []
    with torch.no_grad():
        for m in methods:
            with vtcompress.apply(model, m):
                alone.append([model(**inputs).logits if i % 4 else model.generate(**inputs, **GEN) for i in range(4)])
        stock = [model(**inputs).logits if i % 4 else model.generate(**inputs, **GEN) for i in range(4)]
    results = [[], [], []]
    errors: list = []
    barrier = threading.Barrier(3)
    threads = [threading.Thread(target=_worker, args=(model, inputs, m, n, results[k], errors, barrier))
               for k, m in enumerate([*methods, None])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        assert len(results[k]) == n
        for i, r in enumerate(results[k]):
            torch.testing.assert_close(r, alone[k][i % 4], atol=1e-6, rtol=1e-6)
    assert len(results[2]) == n and all(torch.equal(r, stock[i % 4]) for i, r in enumerate(results[2]))
    assert "generate" not in vars(model)


def test_worker_thread_in_a_copied_context_is_governed(models):
    """A thread does not inherit the block (contextvars): the streaming pattern runs generate in a worker, which is
    governed when started in a copy of the caller's context (``contextvars.copy_context().run``)."""
    import contextvars

    model, make = models["llava"]
    inputs = make(batch=1, images=[1])
    box: dict = {}

    def work(key):
        with torch.no_grad():
            box[key] = model.generate(**inputs, **GEN)

    with torch.no_grad():
        stock = model.generate(**inputs, **GEN)
        with vtcompress.apply(model, NormTopK(budget=0.25)) as handle:
            here = model.generate(**inputs, **GEN)
            t = threading.Thread(target=contextvars.copy_context().run, args=(work, "copied"))
            u = threading.Thread(target=work, args=("plain",))
            t.start(), u.start()
            t.join(), u.join()
            assert handle.last.num_tokens[0, 1] < handle.last.num_tokens[0, 0]
    assert torch.equal(box["copied"], here) and torch.equal(box["plain"], stock)


# ------------------------------------------------------------------------------------------ arguments refused
def test_arguments_refused(models):
    model, make = models["llava"]
    with pytest.raises(ValueError, match="restore_prompt='yes'"):
        vtcompress.apply(model, NormTopK(budget=0.5), restore_prompt="yes")
    with pytest.raises(ValueError, match="positions='sideways'"):
        vtcompress.apply(model, vtcompress.get("fastv", budget=0.5, layer=1), positions="sideways")
    assert "generate" not in vars(model) and not vtcompress.models.context.active_handles(model)
    # positions= reaches a decoder-only apply (before: silently ignored)
    inputs = make(batch=1, images=[1])
    last = {}
    with torch.no_grad():
        for p in ("original", "compact"):
            with vtcompress.apply(model, vtcompress.get("fastv", budget=0.25, layer=1), positions=p):
                last[p] = model(**inputs).logits[:, -1]
    assert not torch.allclose(last["original"], last["compact"])


def test_sliding_window_llm_refuses_decoder_stage():
    from models_util import tiny_onevision

    model, make = tiny_onevision()
    text = model.config.text_config
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, 4, 0
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    with pytest.raises(ValueError, match="sliding-window attention"):
        vtcompress.apply(model, vtcompress.get("fastv", budget=0.5, layer=1))
    vtcompress.apply(model, NormTopK(budget=0.5)).remove()  # projector-stage methods only shorten the input
    assert "generate" not in vars(model)
