"""Analytic prefill FLOPs (vtcompress.bench.flops) against torch's FlopCounterMode on tiny stock LLaVA models.

FlopCounterMode has no formula for the CPU SDPA kernel, so the models run eager attention here: every product
(including ``QK^T`` and ``softmax(.) V``) is then an ``mm``/``bmm`` it counts.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from models_util import IMAGE, tiny_llava
from vtcompress.bench.flops import VLMArch, attention_pairs, decoder_layer_flops, prefill_flops, sequence_prefill_flops

REL = 1e-2  # the brief's tolerance; the counts below are in fact exact


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def close(analytic: int, measured: int) -> bool:
    return abs(analytic - measured) <= REL * measured


def text_tokens(inputs, image_tokens: int) -> list[int]:
    return [int(m.sum()) - image_tokens for m in inputs["attention_mask"]]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(attn="eager")


@pytest.mark.parametrize("logits", ["all", "last"])
def test_full_model_matches_flop_counter(llava, logits):
    model, make_inputs = llava
    inputs = make_inputs(batch=1)
    kw = {} if logits == "all" else {"logits_to_keep": 1}
    measured = counted(lambda: model(**inputs, **kw))
    t = text_tokens(inputs, 16)[0]
    analytic = prefill_flops(model.config, text_tokens=t, logits=logits)
    assert close(analytic.total, measured), (analytic, measured)
    # the parts add up and each one is there
    assert analytic.total == analytic.vision + analytic.projector + analytic.llm + analytic.lm_head
    assert min(analytic.vision, analytic.projector, analytic.llm, analytic.lm_head) > 0


def test_batch_scales_linearly(llava):
    model, make_inputs = llava
    inputs = make_inputs(batch=3, padding="right")
    length = inputs["input_ids"].shape[1]  # padded batch: every row runs at the padded length
    measured = counted(lambda: model(**inputs))
    analytic = prefill_flops(model.config, text_tokens=length - 16, batch=3, logits="all")
    assert close(analytic.total, measured)
    one = prefill_flops(model.config, text_tokens=length - 16, logits="all")
    assert analytic.total == 3 * one.total


def _shortened(inputs, keep_per_image: int):
    """Input ids with each image's placeholder run cut to its first ``keep_per_image`` tokens (batch of one)."""
    ids = inputs["input_ids"][0]
    is_img = ids == IMAGE
    rank = torch.cumsum(is_img.long(), 0) - 1
    keep = ~is_img | (rank < keep_per_image)
    return {"input_ids": ids[keep][None], "attention_mask": inputs["attention_mask"][0][keep][None]}


@pytest.mark.parametrize("kept", [1, 5, 16])
def test_projector_stage_compression_matches(llava, kept):
    """Compress after the projector (the mechanics of projector-stage methods), count the whole pass."""
    model, make_inputs = llava
    inputs = make_inputs(batch=1)

    def run():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output
        short = _shortened(inputs, kept)
        enc = {"image": BaseModelOutputWithPooling(pooler_output=[f[:kept] for f in feats])}
        model(**short, mm_encoder_outputs=enc, logits_to_keep=1)

    measured = counted(run)
    analytic = prefill_flops(model.config, text_tokens=text_tokens(inputs, 16)[0], image_tokens=kept)
    assert close(analytic.total, measured), (analytic, measured)


def _decoder_schedule_hooks(model, keep_masks: dict[int, torch.Tensor]):
    """Drop tokens at decoder layers: ``keep_masks[K]`` is a bool mask over the sequence entering layer ``K``.

    A forward hook on layer ``K-1`` slices its output; pre-hooks on layers ``>= K`` slice the rotary
    embeddings and the eager 4-D mask to the survivors (what decoder-stage methods do, in test form).
    """
    layers = model.model.language_model.layers
    handles, index = [], {}
    cum = None
    for k in sorted(keep_masks):
        idx = torch.nonzero(keep_masks[k]).flatten()
        cum = idx if cum is None else cum[idx]
        for layer in range(k, len(layers)):
            index[layer] = cum
        handles.append(layers[k - 1].register_forward_hook(lambda m, a, out, idx=idx: out[:, idx]))

    def pre(i):
        def hook(module, args, kwargs):
            idx = index[i]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[:, idx], sin[:, idx])
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 4:
                kwargs["attention_mask"] = mask[:, :, idx][:, :, :, idx]
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][:, idx]
            return args, kwargs
        return hook

    for i in index:
        handles.append(layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))
    return handles


def test_decoder_stage_schedule_matches():
    """A two-step schedule on a 4-layer LLM: 16 image tokens -> 9 from layer 1 -> 3 from layer 3."""
    model, make_inputs = tiny_llava(attn="eager")
    text_cfg = model.config.text_config
    text_cfg.num_hidden_layers = 4
    model = LlavaForConditionalGeneration(model.config).eval()
    model.set_attn_implementation("eager")
    inputs = make_inputs(batch=1)
    ids = inputs["input_ids"][0]
    is_img = ids == IMAGE
    rank = torch.cumsum(is_img.long(), 0) - 1
    keep1 = ~is_img | (rank < 9)
    img2 = is_img[keep1]
    keep3 = ~img2 | ((torch.cumsum(img2.long(), 0) - 1) < 3)
    handles = _decoder_schedule_hooks(model, {1: keep1, 3: keep3})
    try:
        out = None

        def run():
            nonlocal out
            out = model(**inputs)

        measured = counted(run)
    finally:
        for h in handles:
            h.remove()
    t = text_tokens(inputs, 16)[0]
    assert out.logits.shape[1] == t + 3  # the hooks really shortened the sequence
    analytic = prefill_flops(model.config, text_tokens=t, schedule=[(1, 9), (3, 3)], logits="all")
    assert close(analytic.total, measured), (analytic, measured)
    assert analytic.total < prefill_flops(model.config, text_tokens=t, logits="all").total


@pytest.mark.parametrize("tower", ["siglip", "clip_full_two_layers"])
def test_other_towers_and_feature_options(tower):
    """SigLIP (no [CLS], attention-pooling head) and CLIP with [CLS] kept and two feature layers concatenated."""
    if tower == "siglip":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=16, patch_size=4)
        # "default" cuts the first token for any tower: SigLIP has no [CLS], so a patch goes (as in stock LLaVA)
        extra = {"vision_feature_layer": -1, "vision_feature_select_strategy": "default"}
        n_img = 15
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=16, patch_size=4, projection_dim=32)
        extra = {"vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "full"}
        n_img = 17
    text = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, pad_token_id=0, attn_implementation="eager")
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=n_img, **extra)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.tensor([[1, 5, 6] + [IMAGE] * n_img + [7, 8, 9, 10]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 16, 16)}
    measured = counted(lambda: model(**inputs, logits_to_keep=1))
    arch = VLMArch.from_config(cfg)
    assert arch.image_tokens == n_img
    analytic = prefill_flops(arch, text_tokens=7)
    assert close(analytic.total, measured), (analytic, measured)


def test_testbed_architecture_matches():
    """The embedded testbed's own config (128-wide CLIP + Llama, 144 image tokens), one real sample."""
    from vtcompress.testbed import build_tokenizer, encode, samples
    from vtcompress.testbed.model import build_model

    tok = build_tokenizer()
    model = build_model(tok).eval()
    model.set_attn_implementation("eager")
    enc = encode(tok, samples("test", 1), model.config)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    measured = counted(lambda: model(**inputs, logits_to_keep=1))
    n_img = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_img == VLMArch.from_config(model.config).image_tokens == 144
    analytic = prefill_flops(model.config, text_tokens=enc["input_ids"].shape[1] - n_img)
    assert close(analytic.total, measured), (analytic, measured)


def test_closed_forms_and_monotonicity(llava):
    model, _ = llava
    arch = VLMArch.from_config(model.config)
    t = arch.text
    # GQA: 4 query heads, 2 kv heads, head_dim 8, hidden 32, mlp 64, gated
    n = 10
    expected = 2 * n * 32 * 32 * 2 + 2 * n * 32 * 16 * 2 + 4 * 4 * n * n * 8 + 3 * 2 * n * 32 * 64
    assert decoder_layer_flops(t, n) == expected
    full = prefill_flops(arch, text_tokens=5).total
    fewer = [prefill_flops(arch, text_tokens=5, image_tokens=k).total for k in (16, 8, 4, 1)]
    assert fewer[0] == full and all(a > b for a, b in zip(fewer, fewer[1:], strict=False))
    # decoder-stage pruning at layer 0 is the same as shortening the LLM input (but keeps the projector's work)
    a = prefill_flops(arch, text_tokens=5, schedule=[(0, 4)])
    b = prefill_flops(arch, text_tokens=5, image_tokens=4)
    assert a.llm == b.llm and a.vision == b.vision
    # encoder-stage merging: fewer tokens per vision layer -> less vision and projector work
    merged = prefill_flops(arch, text_tokens=5, vision_tokens=[16, 12, 8], image_tokens=8)
    # hidden_states[-2] is the input of layer 2 (8 patches); [CLS] added, then cut by the 'default' strategy
    assert merged.vision < a.vision and merged.projector == 2 * 8 * (32 * 32 + 32 * 32)


@pytest.mark.parametrize(("n", "s"), [(1, 1), (1, 9), (7, 7), (10, 10), (3, 11), (64, 100)])
def test_causal_attention_counts_the_unmasked_pairs(llava, n, s):
    """``attention="causal"`` counts exactly the (query, key) pairs a causal mask keeps: ``n`` queries at the last
    positions of ``s`` keys (a prefill: n == s; a cached chunk: s > n); the tower's attention stays whole."""
    kept = int(torch.ones(n, s).tril(diagonal=s - n).sum())
    assert attention_pairs(n, s, "causal") == kept
    assert attention_pairs(n, s, True) == attention_pairs(n, s, "full") == n * s
    assert attention_pairs(n, s, False) == attention_pairs(n, s, "none") == 0
    model, _ = llava
    arch = VLMArch.from_config(model.config)
    t = arch.text
    # only the score / weighted-sum products change: 4 * heads * pairs * head_dim
    none = decoder_layer_flops(t, n, s, attention=False)
    assert decoder_layer_flops(t, n, s, attention="causal") - none == 4 * t.heads * kept * t.head_dim
    assert decoder_layer_flops(t, n, s) - none == 4 * t.heads * n * s * t.head_dim
    full = prefill_flops(arch, text_tokens=n)
    causal = prefill_flops(arch, text_tokens=n, attention="causal")
    assert causal.vision == full.vision and causal.projector == full.projector and causal.lm_head == full.lm_head
    L = n + arch.image_tokens  # one image
    pairs = attention_pairs(L, L, "causal")
    assert full.llm - causal.llm == t.layers * 4 * t.heads * t.head_dim * (L * L - pairs)
    seq = sequence_prefill_flops(arch, n, [arch.image_tokens] * t.layers, attention="causal")
    assert seq.total == causal.total


@pytest.mark.parametrize("fn", [prefill_flops, sequence_prefill_flops])
def test_bad_attention_mode_raises(llava, fn):
    model, _ = llava
    layers = VLMArch.from_config(model.config).text.layers
    args = dict(visual_tokens=[16] * layers) if fn is sequence_prefill_flops else {}
    with pytest.raises(ValueError, match="attention='half'.*'causal'"):
        fn(model.config, 5, attention="half", **args)
    with pytest.raises(ValueError, match="keys=3 < tokens=4"):
        attention_pairs(4, 3, "causal")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_tokens": 17}, "image_tokens=17"),
        ({"schedule": [(2, 4)]}, "schedule layer K=2"),
        ({"schedule": [(1, 8), (1, 4)]}, "strictly increasing"),
        ({"schedule": [(0, 8), (1, 9)]}, "tokens kept at layer 1=9"),
        ({"vision_tokens": [16, 16]}, "3 layers"),
        ({"logits": "first"}, "logits='first'"),
        ({"text_tokens": -1}, "text_tokens=-1"),
    ],
)
def test_bad_input_raises(llava, kwargs, match):
    model, _ = llava
    args = {"text_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        prefill_flops(model.config, **args)


def test_unsupported_config_raises():
    with pytest.raises(ValueError, match="model_type"):
        VLMArch.from_config(LlamaConfig())


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("random", {"budget": 0.25}),  # projector stage
        # projector stage with [CLS] attention; after the projector, as the analytic model assumes (its default,
        # acts_on="vision", also runs the model's projector on the survivors: 2 * kept * in * out more per image)
        ("visionzip", {"budget": 0.25, "acts_on": "projected"}),
        ("tome_encoder", {"budget": 0.5}),  # encoder stage: fewer tokens per vision layer
        ("fastv", {"budget": 0.25, "layer": 1}),  # decoder stage
        ("pyramiddrop", {"budget": 0.5}),  # decoder stage, its own layer schedule
    ],
)
def test_registered_methods_through_apply_match(llava, name, params):
    """Run a registered method with vtcompress.apply; the tokens the probe saw give the analytic count."""
    import vtcompress
    from vtcompress.bench.quality import TokenProbe, flops_of_record

    model, make_inputs = llava
    inputs = make_inputs(batch=1)
    method = vtcompress.get(name, **params)
    with vtcompress.apply(model, method), TokenProbe(model) as probe:
        measured = counted(lambda: model(**inputs, logits_to_keep=1))
    (record,) = probe.records
    analytic = flops_of_record(VLMArch.from_config(model.config), record)[0]
    assert close(analytic, measured), (record, analytic, measured)
    full = prefill_flops(model.config, text_tokens=text_tokens(inputs, 16)[0]).total
    assert analytic < full
    if method.stage == "decoder":
        assert record.llm_lengths[-1] < record.llm_lengths[0] and record.image == [16]
    elif method.stage == "encoder":
        assert record.vision_lengths[0] == 16 and record.vision_lengths[-1] < 16
    else:
        assert record.image == [4] and len(set(record.llm_lengths)) == 1


@pytest.mark.parametrize(("name", "params"), [("fastv", {"budget": 0.25, "layer": 1}), ("random", {"budget": 0.5})])
def test_kv_cache_bytes_match_the_real_cache(llava, name, params):
    """Bytes of the DynamicCache a prefill leaves == kv_cache_bytes of the probed schedule (fp32: 4 bytes)."""
    import vtcompress
    from vtcompress.bench.flops import kv_cache_bytes
    from vtcompress.bench.quality import TokenProbe, kv_of_record

    model, make_inputs = llava
    inputs = make_inputs(batch=1)
    with vtcompress.apply(model, vtcompress.get(name, **params)), TokenProbe(model) as probe, torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    arch = VLMArch.from_config(model.config)
    assert kv_of_record(arch, probe.records[0], bytes_per_value=4) == [real]
    full = kv_cache_bytes(arch, text_tokens(inputs, 16)[0], bytes_per_value=4)
    assert real < full
