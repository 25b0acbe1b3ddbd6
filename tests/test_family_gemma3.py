"""Gemma 3 (``Gemma3ForConditionalGeneration``): bidirectional image blocks and sliding-window layers under compression.

The tiny model (``models_util.tiny_gemma3``) has 3 text layers -- sliding (window 8), sliding, full -- and 16
placeholders per image between <start_of_image> / <end_of_image>, marked by ``token_type_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vtcompress
from family_checks import GEN, every_projector_method_with_fastv
from models_util import GEMMA3_WINDOW, IMAGE, tiny_gemma3
from vtcompress import ScoreCompressor, VisualTokens, get
from vtcompress.models import adapter_for
from vtcompress.models.context import cache_in
from vtcompress.models.decoder import attach_decoder

SEEN: list[VisualTokens] = []


@dataclass
class _Probe(ScoreCompressor):
    """Keeps the top tokens by the vision signal and records the tokens it saw."""

    name = "test_gemma3_probe"
    family = "attention"
    needs = ("cls_attn", "keys")

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        SEEN.append(tokens)
        return tokens.cls_attn


@pytest.fixture(scope="module")
def gemma3():
    return tiny_gemma3()


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _hand_masks(ids: torch.Tensor, pad: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """``[B, L, L]`` bool masks by hand: causal, or both in one contiguous run of image placeholders (one image);
    padding keys hidden; the sliding layers also need ``k > q - window``."""
    b, n = ids.shape
    img = ids == IMAGE
    start = img & ~torch.nn.functional.pad(img[:, :-1], (1, 0))
    block = torch.where(img, start.long().cumsum(1), torch.zeros_like(ids))  # 1, 2, ... per image, 0 for text
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
    full = ((k <= q)[None] | same) & pad.bool()[:, None, :]
    return {"full_attention": full, "sliding_attention": full & (k > q - window)[None]}


def _capture_lm_masks(model):
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    return seen, hook


def test_pruned_block_mask_equals_stock_mask_of_the_shortened_sequence(gemma3):
    """After projector-stage pruning the kept placeholders (and only they) carry token_type_ids 1, and the masks the
    LLM builds -- full and sliding -- are the hand-built ones of the shortened sequence: each image's kept tokens
    attend each other both ways, the window counts the shortened sequence's tokens."""
    model, make = gemma3
    inputs = make(batch=3, images=[1, 2, 0], seed=3)
    seen, hook = _capture_lm_masks(model)
    try:
        with torch.no_grad(), vtcompress.apply(model, get("fastervlm", budget=0.5)) as handle:
            model(**inputs)
        short = handle.last.inputs
        with torch.no_grad():
            model(**short)  # the stock model called with the shortened inputs directly
    finally:
        hook.remove()
    assert handle.last.num_tokens[:, 1].tolist() == [8, 8, 8]
    ids, pad = short["input_ids"], short["attention_mask"]
    assert torch.equal(short["token_type_ids"].bool(), (ids == IMAGE) & pad.bool())
    expect = _hand_masks(ids, pad, GEMMA3_WINDOW)
    real = pad.bool()
    for masks in seen:  # under apply, then stock on the shortened inputs
        for kind, want in expect.items():
            got = _allowed(masks[kind])[:, 0]
            assert torch.equal(got[real], want[real]), kind
    # an image's first kept token sees its last one (bidirectional), a text token never sees a later one
    b, first = 1, int((ids[1] == IMAGE).nonzero()[0])
    assert bool(_allowed(seen[0]["full_attention"])[b, 0, first, first + 7])


def test_projector_signal_is_pooled_mean_attention_received(gemma3):
    """SigLIP has no [CLS]: the signal is the mean attention each patch receives in the last tower layer (eager
    reference), summed over the 2x2 patches each pooled token covers; keys are the head-mean keys averaged over them.
    SDPA stays on in the tower."""
    model, make = gemma3
    inputs = make(batch=2, images=[1, 1], seed=5)
    SEEN.clear()
    with torch.no_grad():
        vtcompress.compress_inputs(model, _Probe(budget=0.5), **inputs)
        assert model.config.vision_config._attn_implementation == "sdpa"
        tower = model.model.vision_tower
        last = tower.encoder.layers[-1]
        got_keys = {}
        hook = last.self_attn.k_proj.register_forward_hook(lambda m, a, out: got_keys.__setitem__("k", out))
        model.set_attn_implementation({"vision_config": "eager"})
        try:
            att = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
        finally:
            model.set_attn_implementation({"vision_config": "sdpa"})
            hook.remove()
    n, h, p2, _ = att.shape
    received = att.mean(1).mean(1)  # [images, P*P]: head mean, then mean over the queries
    side = int(p2**0.5)
    pooled = torch.nn.functional.avg_pool2d(received.reshape(n, 1, side, side), 2).flatten(1) * 4
    keys = got_keys["k"].reshape(n, p2, h, -1).mean(2)  # head-mean keys [images, P*P, hd]
    keys = torch.nn.functional.avg_pool2d(keys.transpose(1, 2).reshape(n, -1, side, side), 2).flatten(2).transpose(1, 2)
    tok = SEEN[-1]
    torch.testing.assert_close(tok.cls_attn, pooled, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tok.keys, keys, atol=1e-5, rtol=1e-5)


def test_fastv_row_is_the_sliding_layers_eager_row(gemma3):
    """FastV scores with layer K-1's attention row of the last token; on a sliding layer that row is zero outside the
    window (the eager reference), so the kept set is its top-k with ties to the lower index -- and some kept image
    tokens lie outside the window (a window-blind score would rank them differently)."""
    _, make = gemma3
    model, _ = tiny_gemma3(attn="eager")
    inputs = make(batch=2, images=[1, 1], seed=2)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[0]  # layer 0: sliding
    with attach_decoder(model, get("fastv", budget=0.5, layer=1)) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual()
    outside = 0
    for b in range(2):
        vis = (inputs["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        row = att[b, :, -1].mean(0)[vis]
        top = row.sort(descending=True, stable=True).indices[:8]
        assert torch.equal(kept[b], vis[top].sort().values)
        outside += int((row[top] == 0).sum())
    assert outside > 0


def _reference_generate(model, inputs: dict, dropped: torch.Tensor, layer: int, n: int):
    """The stock model whose layers >= ``layer`` never see the ``dropped [B, L]`` prompt tokens as keys (their own
    masks -- window, image blocks, padding -- otherwise unchanged): greedy ids and prefill logits."""
    lm = model.model.language_model

    def make_hook(j):
        def hook(mod, args, kwargs):
            cache = cache_in(kwargs)  # `past_key_values` up to transformers 5.23, `cache` from 5.24
            # this layer's own count (the cache's total would already include the earlier layers of this forward)
            past = cache.layers[j].get_seq_length() if cache is not None else 0
            hidden = args[0] if args else kwargs["hidden_states"]
            q = hidden.shape[1]
            mask = kwargs["attention_mask"]
            if mask is None:  # SDPA's causal skip: everything before the query is visible
                cached = cache.layers[j].keys.shape[-2] if past else 0
                mask = torch.ones(hidden.shape[0], 1, q, cached + q, dtype=torch.bool).tril(cached)
            kv = mask.shape[-1]
            cols = torch.arange(past + q - kv, past + q)  # absolute positions of the mask's keys
            inside = cols < dropped.shape[1]
            hide = torch.zeros(dropped.shape[0], kv, dtype=torch.bool)
            hide[:, inside] = dropped[:, cols[inside]]
            m = _allowed(mask) & ~hide[:, None, None, :]
            kwargs["attention_mask"] = m if mask.dtype == torch.bool else torch.zeros_like(mask).masked_fill(
                ~m, torch.finfo(mask.dtype).min)
            return args, kwargs
        return hook

    hooks = [lm.layers[j].register_forward_pre_hook(make_hook(j), with_kwargs=True)
             for j in range(layer, len(lm.layers))]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            ids = model.generate(**inputs, **GEN)
    finally:
        for h in hooks:
            h.remove()
    return ids, logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_equals_stock_model_without_the_dropped_keys(attn, layer):
    """FastV at layer K (1: a sliding layer and the full one pruned; 2: only the full one) equals the stock model in
    which layers >= K cannot see the dropped tokens: prefill logits at every kept position and 6 greedy tokens, on a
    left-padded batch whose decode steps slide the window past the image (the pruned sliding layer caches its last
    window - 1 kept tokens, the stock one its last window - 1 tokens)."""
    model, make = tiny_gemma3(attn=attn)
    inputs = make(batch=3, images=[1, 2, 0], seed=4)
    with attach_decoder(model, get("fastv", budget=0.25, layer=layer)) as handle, torch.no_grad():
        logits = model(**inputs).logits
        keep, ok = handle.kept()
        vis = handle.run.vis.clone()
        ids = model.generate(**inputs, **GEN)
    kept = torch.zeros_like(vis)
    kept.scatter_(1, keep, ok & vis.gather(1, keep))
    dropped = vis & ~kept
    assert int(dropped.sum()) == 3 * 12  # 4 of 16 kept per image
    ref_ids, ref_logits = _reference_generate(model, inputs, dropped, layer, GEN["max_new_tokens"])
    assert torch.equal(ids, ref_ids)
    want = ref_logits.gather(1, keep[..., None].expand(-1, -1, ref_logits.shape[-1]))
    torch.testing.assert_close(logits[ok], want[ok], atol=1e-5, rtol=1e-5)


def test_every_projector_method_and_fastv_batch_cache_restore(gemma3):
    """Every training-free projector-stage method, composed with FastV: a left-padded batch (0/1/2 images, different
    lengths) gives each sample its one-by-one tokens, cached == uncached; budget 1.0 is the stock model; leaving the
    block restores the model exactly (``family_checks``)."""
    model, make = gemma3
    every_projector_method_with_fastv(model, make(batch=3, images=[2, 1, 0], seed=1))


def test_encoder_stage_is_refused_clearly(gemma3):
    model, make = gemma3
    with pytest.raises(ValueError, match="encoder-stage methods are supported on"):
        vtcompress.compress_inputs(model, get("tome_encoder", budget=0.5), **make(batch=1))


def test_description_resolves_to_the_stock_modules(gemma3):
    model, _ = gemma3
    desc = adapter_for(model)
    base = model.model
    assert desc.family == "gemma3" and desc.base(model) is base
    assert desc.vision_tower(model) is base.vision_tower
    assert desc.vision_layers(model) == list(base.vision_tower.encoder.layers)
    assert desc.projector(model) is base.multi_modal_projector and not desc.projector_one_to_one
    assert desc.llm_layers(model) is base.language_model.layers
    assert desc.rotary_emb(model) is base.language_model.rotary_emb
    assert desc.num_prefix_tokens(model) == 0 and desc.grid(model) == (4, 4)
    assert desc.visual_token_ids(model) == [IMAGE] and desc.video is None
    assert desc.decoder_sliding_window and not desc.supports_encoder_stage()


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_second_turn_with_the_cache_equals_the_conversation_from_scratch(gemma3, positions):
    """Turn 2 through the cache of a compressed turn 1 (the sliding layers' caches hold the shortened sequence's last
    window - 1 tokens) gives the tokens and logits of the whole conversation run from scratch under the same method
    (the scratch run's token_type_ids mark the images, the new text is 0)."""
    model, make = gemma3
    inputs = make(batch=2, images=[1, 1], seed=3)
    new = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = {**GEN, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad(), vtcompress.apply(model, get("fastervlm", budget=0.5), positions=positions):
        first = model.generate(**inputs, **out)
        ids = torch.cat([first.sequences, new], dim=1)
        grow = ids.shape[1] - inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, grow, dtype=torch.long)], dim=1)
        types = torch.cat([inputs["token_type_ids"], torch.zeros(2, grow, dtype=torch.long)], dim=1)
        scratch = model.generate(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                 pixel_values=inputs["pixel_values"], **out)
        cont = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **out)
    assert torch.equal(cont.sequences, scratch.sequences)
    for x, y in zip(cont.logits, scratch.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_flash_attention_on_sliding_layers_is_refused():
    """FlashAttention applies the window over a layer's own (pruned) keys, not in original positions: refused."""
    model, _ = tiny_gemma3()
    model.config.text_config._attn_implementation = "flash_attention_2"  # the check reads the config only
    with pytest.raises(ValueError, match="sliding-window layers .* 'sdpa' or 'eager'"):
        attach_decoder(model, get("fastv", budget=0.5, layer=1))
