"""Encoder-stage ToMe (``tome_encoder``) inside stock vision towers: CLIP (LLaVA-1.5) and SigLIP (LLaVA-OneVision).

Every check compares against the stock model or a closed-form / hand computation:
full budget == unpatched, exact duplicates merged with proportional attention == unmerged, a layer's output
== a manual eager computation with the log(size) bias, batched == one by one, no hooks left behind.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from vtcompress import Compressor, VisualTokens, get
from vtcompress.models.encoder import encoder_merging, resolve_encoder_spec
from vtcompress.ops import bipartite_soft_matching

IMAGE = 120
GRID = (8, 8)  # 32x32 px images, 4 px patches
N0 = GRID[0] * GRID[1]


def tiny_llava(attn: str = "sdpa", seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 shape: CLIP tower (3 layers, hidden 32, [CLS]) read at hidden_states[-2], LLaMA (hidden 32)."""
    torch.manual_seed(seed)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=4)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vis, text_config=text, image_token_id=IMAGE, image_seq_length=N0,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model


def tiny_onevision(seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision shape: SigLIP tower (no prefix token, 3 layers) read at hidden_states[-1]."""
    torch.manual_seed(seed)
    vis = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=32, patch_size=4)
    text = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    cfg = LlavaOnevisionConfig(vision_config=vis, text_config=text, image_token_index=IMAGE, video_token_index=121,
                               image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def image_features(model, pix):
    out = model.model.get_image_features(pixel_values=pix, vision_feature_layer=-2,
                                         vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


def prompt(k: int, batch: int = 1, seed: int = 0):
    """``batch`` prompts: 3 text tokens, ``k`` image placeholders, 4 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 100, (batch, 3), generator=gen), torch.full((batch, k), IMAGE),
                     torch.randint(3, 100, (batch, 4), generator=gen)], dim=1)
    return ids, torch.ones_like(ids)


def hook_counts(model) -> list[tuple[int, int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs))
            for m in model.modules()]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def pix():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------- schedule
def test_schedule_meets_budget_and_halving_limit():
    m = get("tome_encoder", budget=64)
    s = m.schedule(576, 23)  # LLaVA-1.5: 576 patches, 23 layers before hidden_states[-2]
    assert sum(s) == 576 - 64 and len(s) == 23
    assert max(s) - min(s) <= 1  # even spread where the halving limit does not bind
    n = 576
    for r in s:
        assert r <= n // 2
        n -= r
    # a tight budget front-loads: 64 -> 32 -> 16 is the only way to 16 in two layers
    assert get("tome_encoder", budget=16).schedule(64, 2) == [32, 16]
    assert get("tome_encoder", budget=0.25).schedule(64, 2) == [32, 16]
    assert get("tome_encoder", budget=1.0).schedule(64, 2) == [0, 0]
    # halving binds in the last layer: min(R, n // 2, n - k) with the least R reaching 64 (R = 159 leaves 65)
    assert get("tome_encoder", budget=64).schedule(576, 4) == [160, 160, 128, 64]
    assert get("tome_encoder", r=20).schedule(64, 3) == [20, 20, 12]  # ToMe's r, capped at half the tokens
    assert get("tome_encoder", r=(5, 0, 2)).schedule(64, 3) == [5, 0, 2]
    with pytest.raises(ValueError, match="out of reach"):
        get("tome_encoder", budget=15).schedule(64, 2)
    with pytest.raises(ValueError, match="r=\\(1, 2\\)"):
        get("tome_encoder", r=(1, 2)).schedule(64, 3)
    with pytest.raises(ValueError, match="metric"):
        get("tome_encoder", metric="cosine")
    with pytest.raises(ValueError, match="r must be"):
        get("tome_encoder", r=-1)


# --------------------------------------------------------------------------------------------- kernel
def reference_tome_dest(metric: torch.Tensor, r: int) -> list[int]:
    """ToMe's bipartite soft matching for one row, written plainly: output slot of every token."""
    n = metric.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    best = {i: max(b, key=lambda j: (float(m[i] @ m[j]), -j)) for i in a}
    score = {i: float(m[i] @ m[best[i]]) for i in a}
    merged = sorted(a, key=lambda i: (-score[i], i))[:r]
    kept = [t for t in range(n) if t not in merged]
    slot = {t: s for s, t in enumerate(kept)}
    return [slot[best[t]] if t in merged else slot[t] for t in range(n)]


def test_bipartite_plan_matches_plain_reference():
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(3, 11, 5, generator=gen, dtype=torch.float64)
    for r in (0, 1, 4, 5):
        dest, anchor = bipartite_soft_matching(metric, r)
        for row in range(3):
            assert dest[row].tolist() == reference_tome_dest(metric[row], r)
        assert anchor.shape == (3, 11 - r) and bool((anchor[:, 1:] > anchor[:, :-1]).all())
    # r beyond half the tokens is capped; padded rows only merge their valid tokens
    mask = torch.tensor([[True] * 11, [True] * 6 + [False] * 5, [True] + [False] * 10])
    dest, anchor = bipartite_soft_matching(metric, torch.tensor([9, 9, 9]), mask)
    assert (anchor >= 0).sum(1).tolist() == [6, 3, 1]
    assert bool((dest[~mask] == -1).all())
    assert dest[1, :6].tolist() == reference_tome_dest(metric[1, :6], 3)


def test_compress_on_visual_tokens_keeps_mass_and_provenance():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, N0, 16, generator=gen)
    mask = torch.ones(2, N0, dtype=torch.bool)
    mask[1, 40:] = False
    tokens = VisualTokens.from_features(x, GRID, mask=mask, keys=torch.randn(2, N0, 8, generator=gen))
    out = get("tome_encoder", budget=0.25)(tokens)
    assert out.counts.tolist() == [16, 10]
    assert torch.allclose(out.size.sum(1), torch.tensor([64.0, 40.0]))
    for b in range(2):
        k = int(out.counts[b])
        assign = out.assign[b]
        assert bool((assign[mask[b]] >= 0).all()) and bool((assign[~mask[b]] == -1).all())
        assert torch.equal(torch.bincount(assign[mask[b]], minlength=k).float(), out.size[b, :k])
        # each token's anchor patch belongs to it, and the size-weighted mean is exact
        assert torch.equal(assign[out.pos[b, :k]], torch.arange(k))
        means = torch.zeros(k, 16).index_add_(0, assign[mask[b]], x[b][mask[b]]) / out.size[b, :k, None]
        assert torch.allclose(out.x[b, :k], means, atol=1e-5)


# --------------------------------------------------------------------------------------------- LLaVA (CLIP)
@pytest.mark.parametrize("method", [dict(r=0), dict(budget=1.0), dict(budget=N0)])
def test_full_budget_is_the_unpatched_model(llava, pix, method):
    ids, am = prompt(N0, batch=2)
    with torch.no_grad():
        ref_feat = image_features(llava, pix)
        ref_logits = llava(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        with encoder_merging(llava, None, get("tome_encoder", **method)) as handle:
            assert handle.num_patch_tokens == N0
            feat = image_features(llava, pix)
            logits = llava(input_ids=ids, attention_mask=am, pixel_values=pix).logits
            tokens = handle.tokens
    assert torch.equal(feat, ref_feat)
    # nothing merged: the bookkeeping is the identity over the grid
    assert torch.equal(tokens.assign, torch.arange(N0).expand(2, N0)) and bool((tokens.size == 1).all())
    assert torch.equal(logits, ref_logits)


def test_budget_gives_fewer_tokens_and_consistent_provenance(llava, pix):
    k = 20
    method = get("tome_encoder", budget=k)
    ids, am = prompt(k, batch=2)
    with torch.no_grad(), encoder_merging(llava, None, method) as handle:
        assert handle.schedule == [24, 20] and handle.num_patch_tokens == k
        feats = image_features(llava, pix)
        tokens = handle.tokens
        # the stock forward accepts the k features per image for k placeholders
        logits = llava(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        hs = llava.model.vision_tower(pix, output_hidden_states=True).hidden_states
    assert feats.shape == (2, k, 32) and logits.shape == (2, ids.shape[1], 128)
    # the model's own hidden_states record the merged states: 1 + 64, 1 + 40, 1 + 20, 1 + 20 tokens
    assert [h.shape[1] for h in hs] == [65, 41, 21, 21]
    assert torch.equal(tokens.x, hs[-2][:, 1:])
    assert torch.equal(llava.model.multi_modal_projector(tokens.x), feats)
    assert tokens.x.shape == (2, k, 32) and tokens.keys.shape == (2, k, 8)
    assert torch.equal(tokens.size.sum(1), torch.full((2,), float(N0)))
    for b in range(2):
        assign = tokens.assign[b]
        assert bool((assign >= 0).all()) and int(assign.max()) == k - 1
        assert torch.equal(torch.bincount(assign, minlength=k).float(), tokens.size[b])
        assert torch.equal(assign[tokens.pos[b]], torch.arange(k))
        assert bool((tokens.pos[b, 1:] > tokens.pos[b, :-1]).all())  # spatial order
    rows = handle.rows()
    assert len(rows) == 2 and torch.equal(rows[1].x[0], tokens.x[1])


@pytest.mark.parametrize("recorder_first", [True, False])
def test_hidden_states_recorder_sees_merged_states_whatever_the_hook_order(pix, recorder_first):
    """transformers installs its hidden_states recorder (a forward hook) lazily, on the first call that asks for
    hidden states: before our hooks or after them, the recorded states must be the merged ones."""
    model = tiny_llava()
    tower = model.model.vision_tower
    with torch.no_grad():
        if recorder_first:
            tower(pix, output_hidden_states=True)
        with encoder_merging(model, None, get("tome_encoder", budget=20)) as handle:
            hs = tower(pix, output_hidden_states=True).hidden_states
            feats = image_features(model, pix)
    assert [h.shape[1] for h in hs] == [65, 41, 21, 21]
    assert torch.equal(hs[-2][:, 1:], handle.tokens.x)
    assert torch.equal(feats, model.model.multi_modal_projector(handle.tokens.x))


def test_batched_equals_one_by_one(llava, pix):
    method = get("tome_encoder", budget=0.25)
    with torch.no_grad(), encoder_merging(llava, None, method) as handle:
        both = image_features(llava, pix)
        assign_both = handle.tokens.assign
        singles = [image_features(llava, pix[i : i + 1]) for i in range(2)]
        assign_last = handle.tokens.assign
    assert torch.allclose(both, torch.cat(singles), atol=1e-5)
    assert torch.equal(assign_both[1:], assign_last)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_merging_exact_duplicates_with_proportional_attention_is_lossless(attn):
    """Two identical tokens attend and are attended like one token of size 2 with a log(2) bias (ToMe, sec. 3).

    Without position embeddings, an image whose patches come in identical horizontal pairs has exact duplicate
    tokens; merging them (cosine 1, so they are the best edges) and adding log(size) must reproduce the unmerged
    tower's features patch for patch.
    """
    model = tiny_llava(attn=attn, seed=2)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.zero_()
    half = torch.randn(2, 3, 32, 4, 4, generator=torch.Generator().manual_seed(5))  # 4 px columns, 4 per pair
    pix = half.repeat_interleave(2, dim=3).reshape(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        with encoder_merging(model, None, get("tome_encoder", r=(20, 0))) as handle:
            merged = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
            tokens = handle.tokens
        no_prop = encoder_merging(model, None, get("tome_encoder", r=(20, 0), prop_attn=False))
        with no_prop:
            plain = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert merged.shape == (2, N0 - 20, 32)
    assert sorted(set(tokens.size.flatten().tolist())) == [1.0, 2.0]
    assert torch.allclose(tokens.unmerge(merged), ref, atol=1e-5)
    # without the bias the merged pairs are under-weighted: the result differs
    assert not torch.allclose(tokens.unmerge(plain), ref, atol=1e-3)


def test_layer_output_equals_manual_eager_attention_with_log_size_bias(llava, pix):
    """Layer 1 after a merge in layer 0: recompute it by hand, softmax(q k^T / sqrt(d) + log s) v."""
    with torch.no_grad(), encoder_merging(llava, None, get("tome_encoder", r=(24, 0))) as handle:
        hs = llava.model.vision_tower(pix, output_hidden_states=True).hidden_states
        size = torch.cat([torch.ones(2, 1), handle.tokens.size], dim=1)  # [CLS] has size 1
        layer = llava.model.vision_tower.encoder.layers[1]
        x = hs[1]
        assert x.shape[1] == 1 + N0 - 24
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        heads = lambda t: t.view(2, -1, 4, 8).transpose(1, 2)
        q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
        logits = q @ k.transpose(-1, -2) / math.sqrt(8) + size.log()[:, None, None, :]
        a = (F.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(2, -1, 32)
        y = x + attn.out_proj(a)
        y = y + layer.mlp(layer.layer_norm2(y))
    assert torch.allclose(hs[2], y, atol=1e-5)


def test_leaving_removes_every_hook_and_restores_outputs(llava, pix):
    ids, am = prompt(N0)
    with torch.no_grad():
        llava.model.vision_tower(pix, output_hidden_states=True)  # installs the stock recorder hooks once
        before = hook_counts(llava)
        ref = llava(input_ids=ids, attention_mask=am, pixel_values=pix[:1]).logits
        handle = encoder_merging(llava, None, get("tome_encoder", budget=0.5))
        with handle:
            assert hook_counts(llava) != before
            image_features(llava, pix)
        assert hook_counts(llava) == before
        after = llava(input_ids=ids, attention_mask=am, pixel_values=pix[:1]).logits
        handle.remove()  # idempotent
    assert torch.equal(after, ref)
    # an error inside the context removes the hooks too
    with pytest.raises(RuntimeError, match="boom"), encoder_merging(llava, None, get("tome_encoder", budget=0.5)):
        raise RuntimeError("boom")
    assert hook_counts(llava) == before


def test_cached_generate_equals_uncached(llava, pix):
    k = 16
    ids, am = prompt(k, batch=2)
    with torch.no_grad(), encoder_merging(llava, None, get("tome_encoder", budget=k)):
        kw = dict(input_ids=ids, attention_mask=am, pixel_values=pix, max_new_tokens=5, do_sample=False)
        cached = llava.generate(**kw, use_cache=True)
        uncached = llava.generate(**kw, use_cache=False)
    assert torch.equal(cached, uncached)


def test_through_vtcompress_apply_equals_direct_use(llava, pix):
    """``vtcompress.apply`` routes encoder-stage methods here: same logits as shortening the prompt by hand."""
    from vtcompress.models.apply import apply

    k = 20
    ids_full, am_full = prompt(N0, batch=2)
    ids_k, am_k = prompt(k, batch=2)  # the same text around k placeholders
    with torch.no_grad():
        ref = llava(input_ids=ids_full, attention_mask=am_full, pixel_values=pix).logits
        with apply(llava, get("tome_encoder", budget=1.0)):
            same = llava(input_ids=ids_full, attention_mask=am_full, pixel_values=pix).logits
        with encoder_merging(llava, None, get("tome_encoder", budget=k)):
            direct = llava(input_ids=ids_k, attention_mask=am_k, pixel_values=pix).logits
        with apply(llava, get("tome_encoder", budget=k), positions="compact"):
            via = llava(input_ids=ids_full, attention_mask=am_full, pixel_values=pix).logits
    assert torch.equal(same, ref)
    assert via.shape == direct.shape == (2, 3 + k + 4, 128)
    assert torch.allclose(via, direct, atol=1e-5)


def test_bfloat16_tower_merges_to_budget(pix):
    model = tiny_llava().to(torch.bfloat16)
    with torch.no_grad(), encoder_merging(model, None, get("tome_encoder", budget=16)) as handle:
        feats = image_features(model, pix.to(torch.bfloat16))
    assert feats.dtype == torch.bfloat16 and feats.shape == (2, 16, 32)
    assert torch.equal(handle.tokens.size.sum(1), torch.full((2,), float(N0)))


# --------------------------------------------------------------------------------------------- SigLIP (OneVision)
def test_siglip_tower_without_prefix_token(pix):
    model = tiny_onevision()
    tower = model.model.vision_tower
    spec = resolve_encoder_spec(model)
    assert spec.num_prefix_tokens == 0 and spec.feature_layers == (3,) and spec.grid == GRID
    with torch.no_grad():
        ref = tower(pix, output_hidden_states=True)
        with encoder_merging(model, None, get("tome_encoder", budget=1.0)):
            same = tower(pix, output_hidden_states=True)
        with encoder_merging(model, None, get("tome_encoder", budget=12)) as handle:
            out = tower(pix, output_hidden_states=True)
            assert handle.schedule == [20, 20, 12]  # 52 evenly (18, 17, 17) overruns 29 // 2: R = 20 is the least
    assert torch.equal(same.last_hidden_state, ref.last_hidden_state)
    assert [h.shape[1] for h in out.hidden_states] == [64, 44, 24, 12]
    tokens = handle.tokens
    assert torch.equal(tokens.x, out.hidden_states[-1])  # no prefix: every token is a patch token
    assert torch.equal(tokens.size.sum(1), torch.full((2,), float(N0)))
    for b in range(2):
        assert torch.equal(torch.bincount(tokens.assign[b], minlength=12).float(), tokens.size[b])


def test_explicit_arguments_and_errors(llava, pix):
    layers = list(llava.model.vision_tower.encoder.layers)
    # explicit arguments override the config: read hidden_states[1], so only layer 0 merges
    with torch.no_grad(), encoder_merging(llava, None, get("tome_encoder", budget=40), layers=layers,
                                          num_prefix_tokens=1, feature_layer=1, grid=GRID) as handle:
        assert handle.schedule == [24]
        hs = llava.model.vision_tower(pix, output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in hs] == [65, 41, 41, 41]
    # several feature layers (concatenated by the model): merging stops before the first, all hold the same tokens
    with torch.no_grad(), encoder_merging(llava, None, get("tome_encoder", budget=40), feature_layer=[2, 1]) as handle:
        hs = llava.model.vision_tower(pix, output_hidden_states=True).hidden_states
    assert handle.schedule == [24]
    assert torch.equal(handle.tokens.x, torch.cat([hs[2][:, 1:], hs[1][:, 1:]], dim=-1))
    with pytest.raises(ValueError, match="encoder-stage"):
        encoder_merging(llava, None, Compressor(budget=0.5))  # the base class is a projector-stage method
    with pytest.raises(ValueError, match="feature_layer 7"):
        encoder_merging(llava, None, get("tome_encoder"), feature_layer=7)
    with pytest.raises(ValueError, match="embeddings"):
        encoder_merging(llava, None, get("tome_encoder", budget=0.5), feature_layer=0)
    with pytest.raises(ValueError, match="out of reach"):
        encoder_merging(llava, None, get("tome_encoder", budget=8))

    class WrongSchedule:  # an encoder-stage method whose schedule does not fit the tower
        stage, name = "encoder", "wrong"

        def schedule(self, num_patches, num_layers):
            return [num_patches]

    with pytest.raises(ValueError, match="expected 2 ints"):
        encoder_merging(llava, None, WrongSchedule())
    flash = tiny_llava()
    for layer in flash.model.vision_tower.encoder.layers:
        layer.self_attn.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        encoder_merging(flash, None, get("tome_encoder", budget=0.5))
    assert hook_counts(flash) == hook_counts(tiny_llava())
