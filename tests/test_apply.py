"""vtcompress.apply / compress_inputs on tiny stock Hugging Face VLMs of every supported family."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

import vtcompress
from models_util import BUILDERS, IMAGE, split_samples, tiny_llava, tiny_llava_next, tiny_qwen2_vl
from vtcompress import Compressor, ScoreCompressor, VisualTokens
from vtcompress.models import adapter_for, supported_families

FAMILIES = list(BUILDERS)


# ------------------------------------------------------------------------------------------ test methods
@dataclass
class NormTopK(ScoreCompressor):
    """Keep the tokens of largest feature norm: deterministic and independent of the batch."""

    name = "test_norm_topk"
    family = "baseline"

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        return tokens.x.float().norm(dim=-1)


@dataclass
class ClsTopK(ScoreCompressor):
    """FasterVLM-style: keep the top tokens by vision-encoder [CLS] (or mean) attention; also reads keys."""

    name = "test_cls_topk"
    family = "attention"
    needs = ("cls_attn", "keys")

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        assert tokens.keys is not None
        return tokens.cls_attn


@dataclass
class PairMerge(Compressor):
    """Merge raster neighbours (0,1), (2,3), ... with a size-weighted mean; the first of a pair anchors."""

    name = "test_pair_merge"
    family = "similarity"

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        n = tokens.num_tokens
        m = (n + 1) // 2
        dest = (torch.arange(n) // 2).expand(tokens.batch_size, n)
        anchor = (torch.arange(m) * 2).expand(tokens.batch_size, m)
        return tokens.merge(dest, anchor)


@dataclass
class Probe(Compressor):
    """Keeps everything and records the tokens it saw."""

    name = "test_probe"
    family = "query"
    needs = ("text",)

    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        self.seen.append(tokens)
        return tokens


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


def _hooks(model) -> dict:
    """Every forward (pre-)hook on every module. transformers installs its own output-capturing hooks on the
    first run, so snapshots are taken after a stock run."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------ equivalences
@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_stock(models, family):
    """Budget 1.0 keeps every token: logits and generated ids are exactly the stock model's."""
    model, make = models[family]
    inputs = make(batch=3, images=[1, 0, 2])
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for method in (NormTopK(budget=1.0), ClsTopK(budget=1.0)):
            with vtcompress.apply(model, method) as handle:
                out = model(**inputs).logits
                ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert handle.last.num_tokens[:, 0].tolist() == handle.last.num_tokens[:, 1].tolist()
            assert out.shape == ref.shape
            valid = inputs["attention_mask"].bool()
            assert torch.equal(out[valid], ref[valid])  # bit-identical
            assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generate_equals_one_by_one(models, family):
    """A left-padded batch (prompts of different lengths, 0-2 images each) compressed and generated together
    gives each sample the same tokens as generating it alone."""
    model, make = models[family]
    inputs = make(batch=3, images=[2, 1, 0], seed=1)
    method = ClsTopK(budget=0.5)
    with torch.no_grad(), vtcompress.apply(model, method) as handle:
        batched = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        kept = handle.last.num_tokens
        assert bool((kept[:, 1] < kept[:, 0]).all())
        for b, one in enumerate(split_samples(inputs)):
            alone = model.generate(**one, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert torch.equal(alone[0, -4:], batched[b, -4:]), f"sample {b}"
            # generate returns the original prompt followed by the new tokens
            assert torch.equal(alone[0, :-4], one["input_ids"][0])
    assert torch.equal(batched[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_right_padding_forward_equals_one_by_one(models, family):
    model, make = models[family]
    inputs = make(batch=3, images=[1, 2, 0], padding="right", seed=2)
    with torch.no_grad(), vtcompress.apply(model, NormTopK(budget=0.5)) as handle:
        batched = model(**inputs).logits
        mask = handle.last.inputs["attention_mask"].bool()
        assert bool(mask[:, 0].all())  # still right-padded
        for b, one in enumerate(split_samples(inputs)):
            alone = model(**one).logits[0]
            torch.testing.assert_close(batched[b][mask[b]], alone, atol=1e-5, rtol=1e-5)


def test_compress_inputs_matches_apply(models):
    model, make = models["llava_next"]
    inputs = make(batch=2, images=[1, 1])
    method = ClsTopK(budget=0.4)
    res = vtcompress.compress_inputs(model, method, **inputs)
    assert "pixel_values" not in res.inputs and "image_sizes" not in res.inputs
    assert "mm_encoder_outputs" in res.inputs
    with torch.no_grad():
        explicit = model(**res.inputs).logits
        with vtcompress.apply(model, method):
            hooked = model(**inputs).logits
    assert torch.equal(explicit, hooked)
    # the per-image tokens: each image has a base view and a high-resolution view
    assert [len(t) for t in res.tokens] == [2, 2]
    for views in res.tokens:
        for t in views:
            assert t.batch_size == 1 and bool(t.mask.all())
            assert bool((t.pos[0, 1:] > t.pos[0, :-1]).all())  # spatial order
            assert int((t.assign[0] >= 0).sum()) == t.num_tokens  # pruning: one patch per kept token


# ------------------------------------------------------------------------------------------ restoration
def test_leaving_apply_restores_the_model(models):
    model, make = models["llava"]
    inputs = make(batch=2, images=[1, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
    hooks = _hooks(model)
    impl = (model.config._attn_implementation, model.config.vision_config._attn_implementation,
            model.config.text_config._attn_implementation)
    mapping = dict(AttentionInterface._global_mapping)
    config = model.config.to_dict()
    with torch.no_grad(), vtcompress.apply(model, ClsTopK(budget=4)):
        assert "generate" in vars(model)
        assert _hook_count(model) > sum(len(a) + len(b) for a, b in hooks.values())
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        short = model(**inputs).logits
    assert short.shape[1] < ref.shape[1]
    assert _hooks(model) == hooks
    assert "generate" not in vars(model)
    assert (model.config._attn_implementation, model.config.vision_config._attn_implementation,
            model.config.text_config._attn_implementation) == impl
    assert AttentionInterface._global_mapping == mapping
    assert model.config.to_dict() == config
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_remove_handle_and_exception_inside(models):
    model, make = models["qwen2_vl"]
    inputs = make(batch=1)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1)
    hooks, deltas = _hooks(model), model.model.rope_deltas
    handle = vtcompress.apply(model, NormTopK(budget=0.5))
    handle.remove()
    handle.remove()  # idempotent
    assert _hooks(model) == hooks and "generate" not in vars(model)
    with pytest.raises(RuntimeError, match="boom"), vtcompress.apply(model, NormTopK(budget=0.5)):
        with torch.no_grad():
            model(**inputs)
        raise RuntimeError("boom")
    assert _hooks(model) == hooks and "generate" not in vars(model)
    assert model.model.rope_deltas is deltas  # runtime state the stock generate keeps is put back


# ------------------------------------------------------------------------------------------ positions
def _capture_positions(model, lm):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())  # generate always builds (or forwards) position_ids

    return seen, lm.register_forward_pre_hook(hook, with_kwargs=True)


def test_qwen2_vl_mrope_positions_by_hand():
    """Kept image tokens keep their full-grid M-RoPE positions; text after the image and every decode step
    continue exactly as in the uncompressed model (reference built by hand)."""
    model, make = tiny_qwen2_vl()
    inputs = make(batch=1, images=[1])  # prompt: 2 text, <vision_start>, 4x6 patches -> 2x3 tokens, <end>, 1 text
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE).nonzero()[0])
    gh, gw = 2, 3
    n_after = len(ids) - start - gh * gw
    seen, h = _capture_positions(model, model.model.language_model)
    try:
        with torch.no_grad():
            stock = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            stock_pos = list(seen)
            seen.clear()
            with vtcompress.apply(model, NormTopK(budget=3)) as handle:
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    assert out.shape == stock.shape
    prefill = seen[0][1:, 0]  # [3, S'] (row 0 is the compact text position)
    kept = handle.last.tokens[0][0].pos[0]  # patch index in the 2x3 merged grid
    assert len(kept) == 3
    # by hand: text 0..start-1, image (start, start + r, start + c), then text from start + max(gh, gw)
    expected_img = torch.stack([torch.full_like(kept, start), start + kept // gw, start + kept % gw])
    assert torch.equal(prefill[:, start : start + 3], expected_img)
    assert torch.equal(prefill[:, :start], torch.arange(start).expand(3, -1))
    after = start + max(gh, gw) + torch.arange(n_after)
    assert torch.equal(prefill[:, start + 3 :], after.expand(3, -1))
    # decode steps: +1 per token from the last prompt position, identical to the stock model's
    last = start + max(gh, gw) + n_after - 1
    for step, (mine, ref) in enumerate(zip(seen[1:], stock_pos[1:], strict=True)):
        assert torch.equal(mine[1:, 0, -1], torch.full((3,), last + 1 + step))
        assert torch.equal(mine[-3:, :, -1:], ref[-3:, :, -1:])


def test_qwen_positions_batched_equal_full_grid(models):
    for family in ("qwen2_vl", "qwen2_5_vl"):
        model, make = models[family]
        inputs = make(batch=3, images=[1, 2, 0], seed=3)
        res = vtcompress.compress_inputs(model, NormTopK(budget=0.5), **inputs)
        full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
        pos = res.inputs["position_ids"]
        new_mask = res.inputs["attention_mask"].bool()
        for b in range(3):
            old_cols = (res.keep[b] & inputs["attention_mask"][b].bool()).nonzero().squeeze(1)
            assert torch.equal(pos[:, b][:, new_mask[b]], full[:, b, old_cols])


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_llava_1d_positions(models, positions):
    model, make = models["llava"]
    inputs = make(batch=1, images=[1])
    s = inputs["input_ids"].shape[1]
    seen, h = _capture_positions(model, model.model.language_model)
    try:
        with torch.no_grad(), vtcompress.apply(model, NormTopK(budget=4), positions=positions) as handle:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    keep = handle.last.keep[0]
    s_new = int(keep.sum())
    assert s_new == s - 12
    if positions == "original":
        assert torch.equal(seen[0][0], keep.nonzero().squeeze(1))  # original columns, with gaps
        assert [int(p[0, -1]) for p in seen[1:]] == [s, s + 1]
    else:
        assert torch.equal(seen[0][0], torch.arange(s_new))  # renumbered contiguously
        assert [int(p[0, -1]) for p in seen[1:]] == [s_new, s_new + 1]


# ------------------------------------------------------------------------------------------ layouts, budgets
def test_merge_features_reach_the_llm(models):
    """A merging method's size-weighted means are what the LLM receives, at the anchor patch's slot."""
    model, make = models["llava"]
    inputs = make(batch=1, images=[1])
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    res = vtcompress.compress_inputs(model, PairMerge(), **inputs)
    sent = res.inputs["mm_encoder_outputs"]["image"].pooler_output[0]
    torch.testing.assert_close(sent, full.reshape(8, 2, -1).mean(1), rtol=1e-6, atol=1e-6)
    tok = res.tokens[0][0]
    assert tok.pos[0].tolist() == list(range(0, 16, 2))
    assert tok.size[0].tolist() == [2.0] * 8
    assert tok.assign[0].tolist() == [i // 2 for i in range(16)]


def test_anyres_int_budget_and_newlines(models):
    """LLaVA-NeXT: an int budget is split over the base and high-resolution views (sum == budget), and a
    newline is kept exactly when its row keeps a token."""
    model, make = models["llava_next"]
    inputs = make(batch=2, images=[1, 1])
    adapter = adapter_for(model)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_sizes=inputs["image_sizes"]).pooler_output
    layouts = adapter.layouts(model, inputs, list(feats))
    res = vtcompress.compress_inputs(model, NormTopK(budget=10), **inputs)
    ids = inputs["input_ids"]
    slots = res.keep[ids == IMAGE]
    offset = 0
    for i, lay in enumerate(layouts):
        kept = slots[offset : offset + lay.view.shape[0]]
        offset += lay.view.shape[0]
        assert int((kept & (lay.patch >= 0)).sum()) == 10
        assert sum(t.num_tokens for t in res.tokens[i]) == 10
        assert len(lay.grids) == 2 and lay.grids[0] == (4, 4)
        rows_with_token = set(lay.group[kept & (lay.patch >= 0) & (lay.view == 1)].tolist())
        kept_newlines = set(lay.group[kept & lay.sep].tolist())
        assert rows_with_token == kept_newlines
        assert int(lay.sep.sum()) == lay.grids[1][0]  # one newline per high-resolution row
    assert int(res.num_tokens[:, 1].sum()) == int(res.inputs["attention_mask"].sum() - inputs["attention_mask"].sum()
                                                 + res.num_tokens[:, 0].sum())


def test_text_signal_is_the_prompt_embedding(models):
    model, make = models["internvl"]
    inputs = make(batch=2, images=[0, 2])
    probe = Probe(budget=1.0)
    vtcompress.compress_inputs(model, probe, **inputs)
    ids, mask = inputs["input_ids"][1], inputs["attention_mask"][1].bool()
    expected = model.get_input_embeddings()(ids[mask & (ids != IMAGE)])
    seen = probe.seen[0]
    assert seen.text is not None and seen.batch_size == 1 + 2  # views: 1 tile + 2 tiles, same grid
    for r in range(seen.batch_size):
        torch.testing.assert_close(seen.text[r][seen.text_mask[r]], expected)


def test_composition_runs_in_list_order(models):
    model, make = models["llava"]
    inputs = make(batch=1)
    res = vtcompress.compress_inputs(model, [PairMerge(), NormTopK(budget=3)], **inputs)
    t = res.tokens[0][0]
    assert t.num_tokens == 3 and t.size[0].tolist() == [2.0] * 3
    assert all(p % 2 == 0 for p in t.pos[0].tolist())


# ------------------------------------------------------------------------------------------ round trip, errors
def test_save_and_load_then_apply(tmp_path):
    model, make = tiny_llava(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    from transformers import LlavaForConditionalGeneration

    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tiny").eval()
    inputs = make(batch=2, images=[1, 1])
    with torch.no_grad():
        ref = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vtcompress.apply(loaded, vtcompress.get("fastervlm", budget=1.0)):
            same = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vtcompress.apply(loaded, vtcompress.get("fastervlm", budget=4)) as handle:
            out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(same, ref)
    assert out.shape == ref.shape
    assert handle.last.num_tokens[:, 1].tolist() == [4, 4]


def test_unsupported_model_lists_families():
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    with pytest.raises(ValueError, match="supported families") as err:
        vtcompress.apply(lm, NormTopK(budget=0.5))
    for family in supported_families():
        assert family in str(err.value)
    assert set(supported_families()) == {"llava", "llava_next", "onevision", "qwen2_vl", "internvl", "qwen3_vl",
                                         "gemma3", "llava_next_video", "idefics3", "mistral3"}


def test_bad_arguments(models):
    model, make = models["qwen2_vl"]
    hooks = _hooks(model)
    with pytest.raises(ValueError, match="positions="):
        vtcompress.apply(model, NormTopK(budget=0.5), positions="shifted")
    with pytest.raises(ValueError, match="compact"):
        vtcompress.apply(model, NormTopK(budget=0.5), positions="compact")
    with pytest.raises(ValueError, match="Compressor"):
        vtcompress.apply(model, [NormTopK(budget=0.5), 3])
    with pytest.raises(ValueError, match="unknown method"):
        vtcompress.apply(model, "no_such_method")
    with pytest.raises(ValueError, match="placeholder"):
        inputs = make(batch=1)
        inputs["input_ids"] = inputs["input_ids"][:, 1:]
        inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
        inputs["input_ids"][0, -1] = IMAGE
        vtcompress.compress_inputs(model, NormTopK(budget=0.5), **inputs)
    assert _hooks(model) == hooks and "generate" not in vars(model)


def test_text_only_batch_passes_through(models):
    model, make = models["llava"]
    inputs = make(batch=2, images=[0, 0])
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtcompress.apply(model, NormTopK(budget=0.5)):
            assert torch.equal(model(**inputs).logits, ref)


def test_signal_the_model_cannot_give(models):
    @dataclass
    class NeedsDepth(NormTopK):
        needs = ("depth",)

    model, make = models["llava"]
    with pytest.raises(ValueError, match="'depth'.*provides cls_attn, keys, text"):
        vtcompress.compress_inputs(model, NeedsDepth(budget=0.5), **make(batch=1))


def test_signal_layer_out_of_range(models):
    @dataclass
    class Deep(ClsTopK):
        signal_layer: int = 7

    model, make = models["llava"]
    with pytest.raises(ValueError, match="signal_layer=7"):
        vtcompress.compress_inputs(model, Deep(budget=0.5), **make(batch=1))


def test_anyres_builder_family(models):
    assert adapter_for(tiny_llava_next()[0]).family == "llava_next"


# ------------------------------------------------------------------------------------------ registered methods
def _registered_projector_methods() -> list[str]:
    """The training-free projector-stage methods acting on images (the temporal ones: tests/test_temporal.py)."""
    return [r["name"] for r in vtcompress.method_info() if r["stage"] == "projector" and not r["trainable"]
            and r["family"] != "temporal"]


def _build(name: str, budget):
    try:
        return vtcompress.get(name, budget=budget)
    except ValueError:  # methods whose output count is structural (pixel unshuffle) reject other budgets
        return None


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "internvl"])
def test_every_registered_projector_method_runs(models, family):
    """Every built-in projector-stage method runs through apply on a padded multi-image batch: fewer tokens,
    finite logits over the shortened sequence, the original prompt returned by generate; at budget 1.0 a
    method that keeps every token gives the stock logits."""
    model, make = models[family]
    inputs = make(batch=3, images=[1, 0, 2])
    with torch.no_grad():
        ref = model(**inputs).logits
    names = _registered_projector_methods()
    assert {"random", "fastervlm", "visionzip"} <= set(names)
    for name in names:
        method = _build(name, 0.5)
        if method is None:
            continue
        with torch.no_grad(), vtcompress.apply(model, method) as handle:
            logits = model(**inputs).logits
            ids = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        res = handle.last
        before, after = res.num_tokens[:, 0], res.num_tokens[:, 1]
        assert bool((after <= before).all()) and bool((after < before).any()), name
        removed = int((before - after).sum())
        assert int(res.inputs["attention_mask"].sum()) == int(inputs["attention_mask"].sum()) - removed, name
        assert logits.shape[1] == res.inputs["input_ids"].shape[1] and bool(torch.isfinite(logits).all()), name
        assert torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]), name
        full = _build(name, 1.0)
        if full is None:
            continue
        with torch.no_grad(), vtcompress.apply(model, full) as handle:
            logits = model(**inputs).logits
        # PruMerge / PruMerge+ add their neighbours to every kept token (the reference), even at an unchanged count
        if torch.equal(handle.last.num_tokens[:, 0], handle.last.num_tokens[:, 1]) and \
                name not in ("prumerge", "prumerge_plus"):
            m = inputs["attention_mask"].bool()
            torch.testing.assert_close(logits[m], ref[m], atol=1e-6, rtol=0, msg=name)


def test_width_changing_method_is_refused(models):
    model, make = models["llava"]
    with pytest.raises(ValueError, match="feature width from 32 to 128"):
        vtcompress.compress_inputs(model, vtcompress.get("pixel_unshuffle", budget=0.25), **make(batch=1))


def test_encoder_stage_then_projector_on_llava(models):
    """ToMe inside the vision tower (encoder stage), then a projector method; the placeholder runs shrink
    to the merged count, provenance comes from the encoder, and batched == one by one."""
    model, make = models["llava"]
    inputs = make(batch=3, images=[1, 0, 2], seed=4)
    with torch.no_grad():
        model(**inputs)
    hooks = _hooks(model)
    with torch.no_grad(), vtcompress.apply(model, [NormTopK(budget=4), vtcompress.get("tome_encoder", budget=8)]) \
            as handle:
        batched = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert handle.last.num_tokens[:, 1].tolist() == [4, 4, 4]
        tok = handle.last.tokens[0][0]
        assert tok.grid == (4, 4) and float(tok.size.sum()) <= 16 and float(tok.size.min()) >= 1
        assert set((tok.assign[0][tok.assign[0] >= 0]).tolist()) == set(range(4))
        for b, one in enumerate(split_samples(inputs)):
            alone = model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert torch.equal(alone[0, -3:], batched[b, -3:])
    assert _hooks(model) == hooks
    other, make_other = models["qwen2_vl"]
    with pytest.raises(ValueError, match="encoder-stage methods are supported on: llava"):
        vtcompress.compress_inputs(other, vtcompress.get("tome_encoder", budget=8), **make_other(batch=1))
    with pytest.raises(ValueError, match="CLS"):
        vtcompress.compress_inputs(model, [vtcompress.get("tome_encoder", budget=8), ClsTopK(budget=4)],
                                   **make(batch=1))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_projector_then_decoder_stage(models, family):
    """A projector method composed with FastV (decoder stage, delegated to attach_decoder): full budgets give
    the stock ids; compressed, a batch equals its samples one by one; every hook goes away."""
    model, make = models[family]
    inputs = make(batch=3, images=[1, 0, 2], seed=5)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1)
        hooks = _hooks(model)
        ref = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        with vtcompress.apply(model, [vtcompress.get("fastv", budget=1.0, layer=1), NormTopK(budget=1.0)]):
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False), ref)
        with vtcompress.apply(model, [ClsTopK(budget=0.5), vtcompress.get("fastv", budget=0.5, layer=1)]):
            batched = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            for b, one in enumerate(split_samples(inputs)):
                alone = model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
                assert torch.equal(alone[0, -3:], batched[b, -3:])
    assert _hooks(model) == hooks and "generate" not in vars(model)
    with pytest.raises(ValueError, match="decoder-stage"):
        vtcompress.compress_inputs(model, vtcompress.get("fastv", budget=0.5), **inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_full_budget(dtype):
    model, make = tiny_llava_next(seed=1)
    model.to(dtype)
    inputs = make(batch=2, images=[2, 1])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        with vtcompress.apply(model, ClsTopK(budget=1.0)):
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False), ref)
        res = vtcompress.compress_inputs(model, ClsTopK(budget=0.5), **inputs)
    assert all(f.dtype == dtype for f in res.inputs["mm_encoder_outputs"]["image"].pooler_output)


@pytest.mark.parametrize("family", ["llava", "onevision", "qwen2_5_vl"])
def test_cached_generate_equals_uncached(models, family):
    """With gaps in the kept 1-D positions and no padding (generate then drops the all-ones mask), the uncached
    path must not read the gaps as packed-sequence boundaries."""
    model, make = models[family]
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "suppress_tokens": [IMAGE]}
    for inputs in (make(batch=1, images=[1]), make(batch=3, images=[1, 0, 2])):
        with torch.no_grad(), vtcompress.apply(model, ClsTopK(budget=0.5)):
            cached = model.generate(**inputs, **gen)
            uncached = model.generate(**inputs, use_cache=False, **gen)
        assert torch.equal(cached, uncached)


def test_onevision_downsized_high_resolution_grid():
    """anyres_max_9: a 16x16 unpadded grid is bilinearly down-sized to 12x12 by the stock packer; the layout
    map follows it (12 rows, 12 newlines), budget 1.0 is still exact and compression splits per view."""
    from models_util import tiny_onevision

    model, make = tiny_onevision(pinpoints=[[64, 64]])
    inputs = make(batch=4, images=[1, 1, 1, 1])  # image 3 is 28x28 px -> 16x16 patches -> 12x12
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        with vtcompress.apply(model, ClsTopK(budget=1.0)):
            assert torch.equal(model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False), ref)
        res = vtcompress.compress_inputs(model, NormTopK(budget=40), **inputs)
    assert [t.grid for t in res.tokens[3]] == [(4, 4), (12, 12)]
    assert sum(t.num_tokens for t in res.tokens[3]) == 40
    assert int(res.num_tokens[3, 0]) == 16 + 12 * 13


def test_one_apply_at_a_time(models):
    model, make = models["llava"]
    with vtcompress.apply(model, NormTopK(budget=0.5)):
        with pytest.raises(ValueError, match="another apply"):
            vtcompress.apply(model, NormTopK(budget=0.25))
        assert "generate" in vars(model)
    assert "generate" not in vars(model)


def test_decoder_only_method_is_delegated(models):
    """Only decoder-stage methods: apply installs no projector hook; attach_decoder
    does the work (budget 1.0 == stock), and removal is exact."""
    model, make = models["internvl"]
    inputs = make(batch=2, images=[1, 2])
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        hooks = _hooks(model)
        with vtcompress.apply(model, vtcompress.get("fastv", budget=1.0, layer=1)) as handle:
            # no projector hook; the generate dispatcher is there (it marks the KV caches the decoder stage fills)
            assert handle.adapter is None and len(handle._hooks) == 0
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert _hooks(model) == hooks


def test_gradients_reach_the_projector(models):
    """apply follows the caller's grad mode: a loss on the compressed run (labels shortened with the
    sequence) trains the projector."""
    model, make = models["llava"]
    inputs = make(batch=2, images=[1, 1])
    proj = model.model.multi_modal_projector.linear_1.weight
    proj.grad = None
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with vtcompress.apply(model, PairMerge()) as handle:
        out = model(**inputs, labels=labels)
        out.loss.backward()
    short = handle.last.inputs["labels"]
    assert short.shape == handle.last.inputs["input_ids"].shape
    kept = handle.last.inputs["attention_mask"].bool()
    assert torch.equal(short[kept], handle.last.inputs["input_ids"][kept])  # labels follow their tokens
    assert proj.grad is not None and float(proj.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_int_budget_is_per_image_across_tiles(models):
    """InternVL images of 1, 2 and 3 tiles (4 tokens each) under an int budget of 6 per image: the 1-tile
    image keeps all 4, the others keep 6 split over their tiles in proportion."""
    model, make = models["internvl"]
    inputs = make(batch=2, images=[1, 2])  # tiles 1, 2, 3
    res = vtcompress.compress_inputs(model, NormTopK(budget=6), **inputs)
    assert res.num_tokens.tolist() == [[4, 4], [8, 6], [12, 6]]
    assert [[t.num_tokens for t in views] for views in res.tokens] == [[4], [3, 3], [2, 2, 2]]
    assert res.image_sample.tolist() == [0, 1, 1]


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_beam_search_and_several_returns(models, family):
    """generate expands the compressed inputs (3-D positions, InternVL's Tensor features) for beams; the
    returned sequences start with the original prompt repeated per returned sequence."""
    model, make = models[family]
    inputs = make(batch=2, images=[1, 2])
    gen = {"max_new_tokens": 3, "min_new_tokens": 3, "num_beams": 2, "num_return_sequences": 2, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)
        with vtcompress.apply(model, NormTopK(budget=1.0)):
            assert torch.equal(model.generate(**inputs, **gen), ref)
        with vtcompress.apply(model, NormTopK(budget=0.5)):
            out = model.generate(**inputs, **gen)
    s = inputs["input_ids"].shape[1]
    assert out.shape == (4, s + 3)
    assert torch.equal(out[:, :s], inputs["input_ids"].repeat_interleave(2, dim=0))


def test_qwen_images_compressed_next_to_a_video(models):
    """A batch with images and a video: both are compressed (the video frame by frame, an int budget per clip;
    tests/test_video.py), and both reach the stock forward as encoder outputs."""
    model, make = models["qwen2_vl"]
    inputs = make(batch=2, images=[1, 1])
    vc = model.config.vision_config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    video = [122] + [121] * 8 + [123]  # 2 frames x 4x4 patches -> 8 tokens
    pads = torch.zeros(1, len(video), dtype=torch.long)
    row1 = torch.tensor([video])
    inputs["input_ids"] = torch.cat([torch.cat([pads, inputs["input_ids"][:1]], 1),
                                     torch.cat([inputs["input_ids"][1:], row1], 1)])
    inputs["attention_mask"] = torch.cat([torch.cat([pads, inputs["attention_mask"][:1]], 1),
                                          torch.cat([inputs["attention_mask"][1:], torch.ones_like(row1)], 1)])
    types = torch.tensor([[0] + [2] * 8 + [0]])
    inputs["mm_token_type_ids"] = torch.cat([torch.cat([pads, inputs["mm_token_type_ids"][:1]], 1),
                                             torch.cat([inputs["mm_token_type_ids"][1:], types], 1)])
    inputs["pixel_values_videos"] = torch.randn(2 * 16, dim, generator=torch.Generator().manual_seed(0))
    inputs["video_grid_thw"] = torch.tensor([[2, 4, 4]])
    gen = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)
        with vtcompress.apply(model, NormTopK(budget=1.0)):
            assert torch.equal(model.generate(**inputs, **gen), ref)
        res = vtcompress.compress_inputs(model, NormTopK(budget=2), **inputs)
        model(**res.inputs)
    assert set(res.inputs["mm_encoder_outputs"]) == {"image", "video"}
    assert "pixel_values_videos" not in res.inputs
    assert int((res.inputs["input_ids"] == 121).sum()) == 2  # 2 tokens for the clip: one per frame
    assert res.video_num_tokens.tolist() == [[8, 2]]
    assert res.num_tokens[:, 1].tolist() == [2, 2]
