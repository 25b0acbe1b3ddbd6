"""Vision-encoder signals captured under SDPA equal the eager-attention references."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AttentionInterface

from models_util import tiny_internvl, tiny_llava, tiny_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl
from vtcompress.models import adapter_for
from vtcompress.models.signals import SIGNAL_ATTENTION, attention_signal, capture_signals


def _capture(model, inputs, layer=-2, keys=True):
    adapter = adapter_for(model)
    layers = adapter.vision_layers(model)
    enc = adapter.encoder_kwargs(model, inputs)
    with capture_signals(model, adapter.vision_config(model), adapter.attention_module(layers[layer]),
                         has_cls=adapter.num_prefix_tokens(model) > 0, keys=keys) as rec, torch.no_grad():
        out = adapter.base(model).get_image_features(**enc)
    return rec, out, adapter


def _eager_attentions(model, tower_input, **kw):
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            return model.model.vision_tower(tower_input, output_attentions=True, **kw).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})


@pytest.mark.parametrize("build", [tiny_llava, tiny_internvl], ids=["clip", "internvit"])
def test_cls_attention_under_sdpa_equals_eager_row(build):
    model, make = build()
    inputs = make(batch=2, images=[1, 2])
    rec, out, _ = _capture(model, inputs, layer=-2)
    eager = _eager_attentions(model, inputs["pixel_values"])
    ref = eager[-2][:, :, 0].mean(1)  # [images, T]: the [CLS] row, head mean
    assert len(rec.attn) == 1
    torch.testing.assert_close(rec.attn[0], ref, atol=1e-5, rtol=0)
    # the features are bit-identical to a stock run
    with torch.no_grad():
        stock = adapter_for(model).base(model).get_image_features(pixel_values=inputs["pixel_values"])
    for a, b in zip(out.pooler_output, stock.pooler_output, strict=True):
        assert torch.equal(a, b)


def test_mean_attention_received_without_cls_equals_eager():
    """SigLIP (OneVision) has no [CLS]: the signal is the attention each token receives, mean over queries."""
    model, make = tiny_onevision()
    inputs = make(batch=1, images=[1])
    rec, _, adapter = _capture(model, inputs, layer=-1)
    assert adapter.num_prefix_tokens(model) == 0
    pix = inputs["pixel_values"][0]
    eager = _eager_attentions(model, pix)
    ref = eager[-1].mean(2).mean(1)  # [crops, T]
    torch.testing.assert_close(rec.attn[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.attn[0].sum(-1), torch.ones(pix.shape[0]), atol=1e-5, rtol=0)


def test_keys_are_head_mean_of_k_proj():
    model, make = tiny_llava()
    inputs = make(batch=2, images=[1, 1])
    layer = adapter_for(model).vision_layers(model)[-2]
    seen = []
    h = layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        rec, _, _ = _capture(model, inputs, layer=-2)
    finally:
        h.remove()
    k = seen[0]
    ref = k.reshape(*k.shape[:2], 4, -1).mean(2)  # 4 heads
    torch.testing.assert_close(rec.keys[0], ref, atol=1e-6, rtol=0)


def test_capture_restores_implementation_and_registry():
    model, make = tiny_llava()
    before = dict(AttentionInterface._global_mapping)
    impl = model.config.vision_config._attn_implementation
    _capture(model, make(batch=1))
    assert SIGNAL_ATTENTION not in AttentionInterface._global_mapping
    assert AttentionInterface._global_mapping == before
    assert model.config.vision_config._attn_implementation == impl == "sdpa"
    # an exception inside the context restores too
    adapter = adapter_for(model)
    with pytest.raises(RuntimeError), capture_signals(model, adapter.vision_config(model),
                                                      adapter.vision_layers(model)[0].self_attn, has_cls=True):
        raise RuntimeError
    assert AttentionInterface._global_mapping == before
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_flash_attention_is_refused():
    cfg = types.SimpleNamespace(_attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="flash_attention_2"):
        with capture_signals(None, cfg, torch.nn.Identity(), has_cls=True):
            pass


def test_qwen2_vl_signal_matches_manual_attention():
    """Qwen2-VL: per-image mean attention received (recomputed by hand from the block's q/k with the vision
    RoPE), summed over each 2x2 merger group, and head-mean keys averaged over it."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    model, make = tiny_qwen2_vl()
    inputs = make(batch=2, images=[1, 1])
    adapter = adapter_for(model)
    block = adapter.vision_layers(model)[-2]
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0]
        seen.update(kwargs)

    h = block.attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        rec, out, _ = _capture(model, inputs)
    finally:
        h.remove()
    feats = list(out.pooler_output)
    attn = adapter.signal_to_features(model, inputs, [a[..., None] for a in rec.attn], "sum", feats)
    keys = adapter.signal_to_features(model, inputs, rec.keys, "mean", feats)
    x, (cos, sin), cu = seen["x"], seen["position_embeddings"], seen["cu_seqlens"]
    heads = block.attn.num_heads
    q, k, _ = block.attn.qkv(x).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    for i in range(2):
        s, e = int(cu[i]), int(cu[i + 1])
        qi, ki = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1)  # [H, L, d]
        p = ((qi @ ki.transpose(1, 2)) * block.attn.scaling).softmax(-1)
        received = p.mean(1).mean(0)  # [L]
        torch.testing.assert_close(attn[i][:, 0], received.reshape(-1, 4).sum(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(keys[i], ki.mean(0).reshape(-1, 4, ki.shape[-1]).mean(1), atol=1e-5, rtol=0)


def test_qwen2_5_vl_window_order_is_undone():
    """Qwen2.5-VL blocks see patches in window order (groups of 4); a signal recorded in that order maps
    back so that merged token g pools exactly patches 4g..4g+3."""
    from transformers.vision_utils import get_vision_window_index

    model, make = tiny_qwen2_5_vl()
    inputs = make(batch=2, images=[1, 1])  # grids 4x6 and 6x4: 2x3 and 3x2 merged tokens, several windows
    vc = model.config.vision_config
    wi, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2, window_size=vc.window_size,
                                    patch_size=vc.patch_size)
    assert not torch.equal(wi, torch.arange(len(wi)))  # the windows really reorder
    patches = int(inputs["image_grid_thw"].prod(-1).sum())
    recorded = torch.arange(patches, dtype=torch.float32).reshape(-1, 4)[wi].reshape(1, patches, 1)
    feats = [torch.zeros(6, 1), torch.zeros(6, 1)]
    pooled = adapter_for(model).signal_to_features(model, inputs, [recorded], "mean", feats)
    expected = torch.arange(12, dtype=torch.float32) * 4 + 1.5
    torch.testing.assert_close(torch.cat(pooled)[:, 0], expected)


def test_internvl_shuffle_groups_are_2x2_blocks():
    model, make = tiny_internvl()
    inputs = make(batch=1, images=[1])  # one tile: 4x4 patches -> 2x2 tokens
    adapter = adapter_for(model)
    index = torch.arange(17, dtype=torch.float32)[None, :, None] - 1  # [CLS] = -1, patches 0..15
    onehot = torch.nn.functional.one_hot(index.long().clamp(min=0)[..., 0], 16).float()
    onehot[:, 0] = 0  # the [CLS] row is dropped anyway
    groups = adapter.signal_to_features(model, inputs, [onehot], "sum", [torch.zeros(4, 1)])[0]  # [4, 16]
    members = [sorted(g.nonzero().squeeze(1).tolist()) for g in groups]
    for m in members:
        rows = {p // 4 for p in m}
        cols = {p % 4 for p in m}
        assert len(m) == 4 and len(rows) == 2 and len(cols) == 2
        assert max(rows) - min(rows) == 1 and max(cols) - min(cols) == 1
    assert sorted(p for m in members for p in m) == list(range(16))


def test_attention_signal_closed_form():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    p = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1)
    torch.testing.assert_close(attention_signal(q, k, None, 0.5, has_cls=True), p[:, :, 0].mean(1))
    torch.testing.assert_close(attention_signal(q, k, None, 0.5, has_cls=False), p.mean(2).mean(1))
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[..., :3] = True
    pm = ((q @ k.transpose(-1, -2)) * 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(attention_signal(q, k, mask, 0.5, has_cls=False), pm.mean(2).mean(1))


def test_mean_attention_in_query_chunks(monkeypatch):
    """The no-[CLS] signal is accumulated over query chunks; tiny chunks give the same result."""
    import vtcompress.models.signals as sig

    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    whole = attention_signal(q, k, None, None, has_cls=False)
    monkeypatch.setattr(sig, "_CHUNK_ELEMENTS", 2 * 3 * 9 * 2)  # 2 queries per chunk
    torch.testing.assert_close(attention_signal(q, k, None, None, has_cls=False), whole)
    p = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1)
    torch.testing.assert_close(whole, p.mean(2).mean(1))
