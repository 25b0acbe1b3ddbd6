"""Decoder-stage methods against re-typed reference code (issue 12): FastV, PyramidDrop, SparseVLM, DART.

Each ``ref_*`` loop below was written from reading the authors' code (cited in its docstring) and keeps its
structure: a plain layer loop over the stock decoder layers of a batch of one (no padding, eager attention), the
prune between two layers exactly where and how the reference does it (which layer's attention or keys, which rows,
``int()`` / ``round``, ``topk``, the reference's position ids). It runs on the tiny stock model's own modules and
embeddings, with the paper's settings scaled to an 8-layer decoder. Ours runs through ``attach_decoder``. Asserted:
the same kept visual tokens at every stage, the same last-token logits (1e-5), the same greedy ids (ours cached,
the reference re-run without a cache on the growing sequence, its decision taken on the prompt), and SDPA == eager
kept sets.

Positions: LLaMA (LLaVA) uses each reference's own scheme (FastV / DART: the kept tokens' original positions;
PyramidDrop / SparseVLM: renumbered ``0 .. n - 1``). Qwen2-VL's M-RoPE has 3-D grid positions that no reference
renumbers; there every method keeps the stock per-token rotary embeddings (``compact`` == ``original`` there, and
SparseVLM's merged tokens sit at their centre's position), and the reference loops do the same.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from models_util import IMAGE, _clip, _llama, _qwen_text
from vtcompress import get
from vtcompress.models.decoder import attach_decoder, language_model_of

LAYERS = 8
N_IMG = 64  # visual tokens of the one image (8 x 8)


# ============================================================================ tiny stock models, 8 layers
def _llava(attn: str, seed: int = 0):
    torch.manual_seed(seed)
    text = _llama(attn=attn)
    text.num_hidden_layers = LAYERS
    cfg = LlavaConfig(vision_config=_clip(image_size=32, patch=4), text_config=text, image_token_id=IMAGE,
                      image_seq_length=N_IMG, vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = [1] + torch.randint(3, 100, (5,), generator=gen).tolist() + [IMAGE] * N_IMG \
        + torch.randint(3, 100, (9,), generator=gen).tolist()
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    return model, inputs


def _qwen(attn: str, seed: int = 0):
    torch.manual_seed(seed)
    vis = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2, temporal_patch_size=2,
               spatial_merge_size=2, in_channels=3)
    text = _qwen_text({})
    text["num_hidden_layers"] = LAYERS
    cfg = Qwen2VLConfig(vision_config=vis, text_config=text, image_token_id=IMAGE, video_token_id=121,
                        vision_start_token_id=122, vision_end_token_id=123)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(seed + 1)
    pre, post = torch.randint(3, 100, (5,), generator=gen).tolist(), torch.randint(3, 100, (9,), generator=gen).tolist()
    ids = [1] + pre + [122] + [IMAGE] * N_IMG + [123] + post
    types = [0] * (len(pre) + 2) + [1] * N_IMG + [0] * (len(post) + 1)
    grid = torch.tensor([[1, 16, 16]])
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "mm_token_type_ids": torch.tensor([types]), "image_grid_thw": grid,
              "pixel_values": torch.randn(256, 3 * 2 * 4, generator=gen)}
    return model, inputs


BUILD = {"llava": _llava, "qwen2_vl": _qwen}


def _extended(inputs: dict, new: list[int]) -> dict:
    """``inputs`` with the generated tokens ``new`` appended (text tokens)."""
    out = dict(inputs)
    if new:
        extra = torch.tensor([new])
        out["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if "mm_token_type_ids" in inputs:
            out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    return out


def _stock_embeds(model, inputs):
    """The stock model's layer-0 input (embeddings with the image features) and rotary embeddings."""
    lm = language_model_of(model)
    seen = {}

    def grab(m, a, kw):
        seen["h"] = a[0] if a else kw["hidden_states"]
        seen["pe"] = kw["position_embeddings"]

    hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen["h"], seen["pe"]


class _Loop:
    """The decoder's own modules, called one layer at a time for a batch of one (eager causal mask)."""

    def __init__(self, model, inputs, mrope: bool):
        self.lm = language_model_of(model)
        self.head = model.lm_head
        self.h0, self.pe0 = _stock_embeds(model, inputs)
        self.mrope = mrope
        self.weights = None
        self.cache = None

    def pe(self, h, pos):
        """Rotary embeddings of position ids ``pos [n]`` (M-RoPE: the stock ones of those original tokens)."""
        if self.mrope:
            return tuple(t[:, pos] for t in self.pe0)
        return self.lm.rotary_emb(h, pos[None])

    def layer(self, i, h, pe, want_weights=False, want_keys=False):
        layer = self.lm.layers[i]
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        hook = None
        if want_weights:
            hook = layer.self_attn.register_forward_hook(lambda m, a, out: setattr(self, "weights", out[1]))
        self.cache = DynamicCache(config=self.lm.config) if want_keys else None
        out = layer(h, attention_mask=mask, position_embeddings=pe, past_key_values=self.cache,
                    use_cache=want_keys)
        if hook is not None:
            hook.remove()
        return out[0] if isinstance(out, tuple) else out

    def logits(self, h):
        return self.head(self.lm.norm(h))[:, -1]


def _start_len(ids):
    vis = (ids[0] == IMAGE).nonzero().squeeze(1)
    return int(vis[0]), len(vis)


# ============================================================================ re-typed references
def ref_fastv(loop: _Loop, ids, n_prompt, K, keep_num):
    """pkunlp-icler/FastV, ``src/transformers/src/transformers/models/llama/modeling_llama.py``,
    ``LlamaModel.forward`` (FastV inplace branch): at layer ``K`` (``idx == AGG_LAYER``) the head-mean attention
    of layer ``K - 1``'s last (prompt) token over the image, ``topk(ATTENTION_RANK)``, ``keep_indexs`` = text +
    top + text, sorted; ``position_ids = keep_indexs`` (original positions)."""
    start, length = _start_len(ids)
    h = loop.h0
    position_ids = torch.arange(h.shape[1])
    kept = []
    last_layer_attention = None
    for idx in range(LAYERS):
        if idx == K:
            last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
            last_tok = last_layer_attention_avg[n_prompt - 1]
            image = last_tok[start:start + length]
            top = image.topk(keep_num).indices + start
            keep_indexs = torch.cat((torch.arange(start), top, torch.arange(start + length, h.shape[1])))
            keep_indexs = keep_indexs.sort().values
            h = h[:, keep_indexs]
            position_ids = keep_indexs
            kept.append(top.sort().values)
        h = loop.layer(idx, h, loop.pe(h, position_ids), want_weights=True)
        last_layer_attention = loop.weights
    return loop.logits(h), kept


def _repeat_kv(x, n_rep):
    b, kvh, n, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, n, d).reshape(b, kvh * n_rep, n, d)


def ref_pyramiddrop(loop: _Loop, ids, n_prompt, layer_list, ratio_list):
    """Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``, ``LlamaModel.pdrop_forward`` and
    ``pdrop_rank_drop`` (inference, right padding, batch of one): after layer ``layer_idx``, if ``rank_layer =
    layer_idx + 1`` is in ``layer_list``, THAT layer's ``input_layernorm`` / ``q_proj`` / ``k_proj`` on the features,
    rotated at the current ``position_ids``; the last instruction token's row (``prompt_len + image_tokens - 1``)
    ``q k^T / sqrt(head_dim)`` + causal mask, softmax (fp32), head mean, image columns; ``topk(keep_length)`` with
    ``image_tokens = int(N * ratio[stage])``, ``keep_length = int(N * ratio[stage + 1])``; then
    ``position_ids = arange(cur_len)``. (Its LLaMA-7B has no GQA; ``repeat_kv`` shares the KV heads here.)"""
    start, n0 = _start_len(ids)
    ratio_list = [1.0, *ratio_list]
    prompt_len = n_prompt - n0
    h = loop.h0
    orig = torch.arange(h.shape[1])
    position_ids = orig.clone()
    kept = []
    for layer_idx in range(LAYERS):
        h = loop.layer(layer_idx, h, loop.pe(h, orig if loop.mrope else position_ids))
        rank_layer = layer_idx + 1
        if rank_layer in layer_list:
            stage = layer_list.index(rank_layer)
            image_tokens = int(n0 * ratio_list[stage])
            keep_length = int(n0 * ratio_list[stage + 1])
            self_attn = loop.lm.layers[rank_layer].self_attn
            hs = loop.lm.layers[rank_layer].input_layernorm(h)
            q_len = hs.shape[1]
            hd = self_attn.head_dim
            q = self_attn.q_proj(hs).view(1, q_len, -1, hd).transpose(1, 2)
            k = self_attn.k_proj(hs).view(1, q_len, -1, hd).transpose(1, 2)
            cos, sin = loop.pe(h, orig if loop.mrope else position_ids)
            rope = __import__(type(self_attn).__module__, fromlist=["apply_rotary_pos_emb"]).apply_rotary_pos_emb
            q, k = rope(q, k, cos, sin)
            k = _repeat_kv(k, q.shape[1] // k.shape[1])
            mask = torch.full((q_len, q_len), torch.finfo(h.dtype).min).triu(1)
            row = prompt_len + image_tokens - 1
            attn = torch.matmul(q[0][:, row][:, None], k[0].transpose(1, 2)) / hd**0.5 + mask[row][None, None]
            attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
            avg = attn.mean(0)[:, start:start + image_tokens].mean(0)
            top = avg.topk(keep_length).indices + start
            top = top.sort().values
            keep = torch.cat([torch.arange(start), top, torch.arange(start + image_tokens, q_len)])
            h = h[:, keep]
            orig = orig[keep]
            position_ids = torch.arange(h.shape[1])
            kept.append(orig[start:start + keep_length])
    return loop.logits(h), kept


def ref_cluster_and_merge(x, cluster_num, noise):
    """Gumpest/SparseVLMs, ``llava/model/language_model/utils.py``, ``cluster_and_merge`` (DPC-kNN). Its density
    gets ``torch.rand * 1e-6`` "to ensure no tokens have the same density" (mutual nearest neighbours tie exactly
    when ``k = 2``); ``noise [M]`` is one realization of it, passed in (below: decreasing with the token's index,
    which is the deterministic rule ours implements; added in float64 so that it does break the ties)."""
    b, n, c = x.shape
    dist_matrix = torch.cdist(x.float(), x.float()) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density.double() + noise[None].double()  # in float64: 1 + 1e-7 would round back to 1 in float32
    mask = (density[:, None, :] > density[:, :, None]).double()
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None].double()
    dist, _ = (dist_matrix.double() * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dm = dist_matrix[0][index_down[0]][None]  # index_points
    idx_cluster = dm.argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster[0], torch.ones(n, 1)) + 1e-6
    norm_weight = 1.0 / all_weight[idx_cluster[0]]
    x_merged = torch.zeros(cluster_num, c).index_add_(0, idx_cluster[0], x[0] * norm_weight)
    return x_merged[None], index_down[0]


def ref_sparsevlm(loop: _Loop, ids, n_prompt, pruning_loc, token_list):
    """Gumpest/SparseVLMs, ``llava/model/language_model/modelling_sparse_llama.py``,
    ``LlamaDynamicvitModel.forward`` (inference, v1.0) with ``score.py`` ``attn_postprocess_topk``: raters once
    from the input embeddings (``(v @ t^T).softmax(2).mean(1) > mean``); at a layer in ``pruning_loc`` the layer
    runs, its own attention (head mean, rater rows, visual columns, rater mean) selects ``min(list[stage],
    v_num - 1)``; of the pruned, ``int(p * 0.3) + 1`` best are clustered into ``int(m / 10) + 1``, appended after
    the kept visual tokens; ``position_ids[:, :new_len]`` (renumbered)."""
    v_token_start, v_token_num = _start_len(ids)
    h = loop.h0
    text_token_start = v_token_start + v_token_num
    v_t = h[:, v_token_start:text_token_start]
    t_t = h[:, text_token_start:n_prompt]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())[1]
    orig = torch.arange(h.shape[1])
    kept, merged_pos = [], []
    for layer_idx in range(LAYERS):
        pe = loop.pe(h, orig if loop.mrope else torch.arange(h.shape[1]))
        if layer_idx in pruning_loc:
            out = loop.layer(layer_idx, h, pe, want_weights=True)
            attn = loop.weights.mean(1)
            rel = attn[:, t_token_idx + text_token_start, v_token_start:v_token_start + v_token_num].mean(1)
            k = min(token_list[pruning_loc.index(layer_idx)], v_token_num - 1)
            _, indices = torch.topk(rel, k, dim=1)
            pred = torch.zeros_like(rel, dtype=torch.bool)
            pred[0][indices] = True
            sel_local = pred[0].nonzero().squeeze(1)
            pruned_local = (~pred[0]).nonzero().squeeze(1)
            vis = out[:, v_token_start:v_token_start + v_token_num]
            n_merge = int(pruned_local.shape[0] * 0.3) + 1
            stage2 = rel[0][pruned_local].topk(n_merge)[1]
            cand = vis[:, pruned_local[stage2]]
            cluster_num = int(cand.shape[1] / 10) + 1
            by_index = pruned_local[stage2].argsort().argsort()  # each candidate's rank in token order
            noise = 1e-7 * (1.0 - by_index.float() / len(stage2))
            merged, centres = ref_cluster_and_merge(cand, cluster_num, noise)
            centre_orig = orig[v_token_start:text_token_start][pruned_local[stage2][centres]]
            kept_orig = orig[v_token_start:text_token_start][sel_local]
            kept.append(kept_orig.sort().values)
            merged_pos.append(centre_orig.sort().values)
            if loop.mrope:  # M-RoPE (ours): the merged tokens sit at their centre's position, in positional order
                vis_new = torch.cat([vis[:, sel_local], merged], 1)
                vis_orig = torch.cat([kept_orig, centre_orig])
                order = vis_orig.argsort()
                vis_new, vis_orig = vis_new[:, order], vis_orig[order]
            else:
                vis_new, vis_orig = torch.cat([vis[:, sel_local], merged], 1), torch.cat([kept_orig, centre_orig])
            h = torch.cat([out[:, :v_token_start], vis_new, out[:, text_token_start:]], 1)
            orig = torch.cat([orig[:v_token_start], vis_orig, orig[text_token_start:]])
            v_token_num = vis_new.shape[1]
            text_token_start = v_token_start + v_token_num
        else:
            h = loop.layer(layer_idx, h, pe)
    return loop.logits(h), kept, merged_pos


def ref_dart(loop: _Loop, ids, n_prompt, K, token_topk, pivot_image, pivot_text):
    """The authors' DART (ZichenWen1/DART, LLaVA ``modeling_llama`` ``DART_K_norm.forward`` +
    ``get_retained_image_token``; ModelTC/LightCompress ``token_reduction/dart.py`` agrees): before layer ``K``,
    ``last_layer_state = norm(output of K - 1)``, ``K_states`` = layer ``K - 1``'s cached (post-RoPE) keys; pivots by
    key L1 norm (image tokens, and the tokens after the image); visited in ``list(set)`` order, each keeps the
    ``TOKEN_TOPK`` valid image tokens least cosine-similar to it; ``position_ids = keep_indexs``."""
    start, length = _start_len(ids)
    h = loop.h0
    position_ids = torch.arange(h.shape[1])
    kept = []
    for idx in range(LAYERS):
        if idx == K:
            last_layer_state = loop.lm.norm(h)
            keys = loop.cache.layers[K - 1].keys  # [1, kvh, L, hd], after RoPE
            keys = keys.permute(0, 2, 1, 3).reshape(1, keys.shape[2], -1)
            # the rule itself is ref_get_retained_image_token below (the prompt's keys end at n_prompt)
            retained = ref_get_retained_image_token(last_layer_state, keys[:, :n_prompt], start, length,
                                                    token_topk * (pivot_image + pivot_text), pivot_image, pivot_text)
            keep_indexs = torch.cat((torch.arange(start), retained, torch.arange(start + length, h.shape[1])))
            keep_indexs = keep_indexs.sort().values
            h = h[:, keep_indexs]
            position_ids = keep_indexs
            kept.append(retained.sort().values)
        h = loop.layer(idx, h, loop.pe(h, position_ids), want_keys=idx == K - 1)
    return loop.logits(h), kept


# ============================================================================ settings and the comparison
# (method params for a 32-layer LLM scaled to 8 layers, reference call) per method
def _settings(name):
    if name == "fastv":  # K = 2, R = 50 %
        return {"budget": 0.5, "layer": 2}, lambda lp, ids, n: ref_fastv(lp, ids, n, 2, round(0.5 * N_IMG))
    if name == "pyramiddrop":  # layer_list 8/16/24 of 32, ratio list 0.5/0.25/0.125
        return ({"budget": 0.5}, lambda lp, ids, n: ref_pyramiddrop(lp, ids, n, [2, 4, 6], [0.5, 0.25, 0.125]))
    if name == "sparsevlm":  # pruning_loc 2/6/15 of 32, the 192-token list 300/200/110 of 576, scaled to 64
        return ({"stage_tokens": (33, 22, 12)},
                lambda lp, ids, n: ref_sparsevlm(lp, ids, n, [0, 2, 4], [33, 22, 12]))
    if name == "dart":  # K = 2, 4 + 4 pivots, max_num_trunction 128 of 576 ~ 16 of 64 -> TOKEN_TOPK 2
        return ({"budget": 16, "layer": 2},
                lambda lp, ids, n: ref_dart(lp, ids, n, 2, 16 // 8, 4, 4))
    if name == "dart-float":  # LightCompress: reduction_ratio 0.7778 -> TOKEN_TOPK int(N * 0.2222 / 8)
        return ({"budget": 0.2222, "layer": 2},
                lambda lp, ids, n: ref_dart(lp, ids, n, 2, int(N_IMG * 0.2222 / 8), 4, 4))
    raise KeyError(name)


def _ours(model, inputs, name, params, n_new):
    method = get(name.split("-")[0], **params)
    with attach_decoder(model, method) as handle, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        stages = len(handle.stages)
        kept = [handle.kept_visual(s)[0] for s in range(stages)]
        merged = []
        for s in range(stages):
            d = handle.run.decisions[s]
            merged.append(d.keep.gather(1, d.slots)[d.slot_ok].sort().values if d.slots is not None
                          else torch.zeros(0, dtype=torch.long))
        ids = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return logits, kept, merged, ids[0, inputs["input_ids"].shape[1]:].tolist()


def _reference(model, inputs, name, n_new, mrope):
    _, call = _settings(name)
    ids = inputs["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        first = call(_Loop(model, inputs, mrope), ids, n)
        new = []
        for _ in range(n_new):  # no cache: re-run on the growing sequence; the decision is taken on the prompt
            out = call(_Loop(model, _extended(inputs, new), mrope), ids, n)
            new.append(int(out[0].argmax(-1)))
    return first, new


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["fastv", "pyramiddrop", "sparsevlm", "dart", "dart-float"])
def test_decoder_method_matches_reference_loop(family, name):
    model, inputs = BUILD[family]("eager")
    params, _ = _settings(name)
    logits, kept, merged, new_ids = _ours(model, inputs, name, params, n_new=3)
    ref, ref_new = _reference(model, inputs, name, 3, mrope=family == "qwen2_vl")
    ref_logits, ref_kept = ref[0], ref[1]
    assert len(kept) == len(ref_kept)
    for s, (a, b) in enumerate(zip(kept, ref_kept, strict=True)):
        if name == "sparsevlm":  # ours reports a merged token at its centre's position
            a = torch.tensor(sorted(set(a.tolist()) - set(merged[s].tolist())))
            assert torch.equal(merged[s], ref[2][s]), (s, merged[s], ref[2][s])
        assert torch.equal(a, b), (s, a, b)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert new_ids == ref_new


def test_dart_reference_keeps_pivots_on_top_of_the_budget():
    """The reference's LLaVA-1.5 setting keeps 132 of 576 at max_num_trunction=128: 4 visual pivots + 8 x 16."""
    model, inputs = _llava("eager")
    _, kept, _, _ = _ours(model, inputs, "dart", {"budget": 16, "layer": 2}, n_new=1)
    assert len(kept[0]) == 4 + 8 * (16 // 8)
    _, kept, _, _ = _ours(model, inputs, "dart", {"budget": 16, "layer": 2, "exact_budget": True}, n_new=1)
    assert len(kept[0]) == 16  # the documented cleaner option


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["fastv", "pyramiddrop", "sparsevlm", "dart"])
def test_sdpa_and_eager_keep_the_same_tokens(family, name):
    params, _ = _settings(name)
    kept = []
    for attn in ("eager", "sdpa"):
        model, inputs = BUILD[family](attn)
        kept.append(_ours(model, inputs, name, params, n_new=1)[1])
    for a, b in zip(*kept, strict=True):
        assert torch.equal(a, b)


# ============================================================================ the rules alone, at N = 576 and 144
def ref_get_retained_image_token(last_layer_state, k_states, start, length, max_num_trunction, pivot_image_token,
                                 pivot_text_token):
    """The authors' DART ``get_retained_image_token`` (see :func:`ref_dart`) as a function of its inputs:
    ``last_layer_state [1, L, D]`` (already normed), ``k_states [1, L, Dk]`` (already flattened over heads)."""
    token_topk = int(max_num_trunction // (pivot_image_token + pivot_text_token))
    k_img = k_states[0][start:start + length, :]
    k_query = k_states[0][start + length:, :]
    image_indices = (torch.norm(k_img, p=1, dim=-1).topk(pivot_image_token).indices + start).tolist()
    query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text_token).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    tmp_set = indices_set.copy()
    valid_indices = set(range(start, start + length))
    valid_indices.difference_update(image_indices)
    for item in list(tmp_set):
        valid_indices_list = list(valid_indices)
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -F.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices.tolist()]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(sorted(indices_set))


def test_dart_rule_matches_reference_function():
    """Random low-dimensional states (so the pivots' least-similar sets overlap and the visiting order matters),
    N = 576 and 144, several budgets: the same kept set as the reference, given the same token indices (LLaVA-1.5:
    the image at 35); visiting the pivots in key-norm order instead would differ."""
    from vtcompress import VisualTokens
    from vtcompress.methods.attention import StageContext

    order_mattered = 0
    for n in (576, 144):
        for budget in (128, 64, 0.2222):
            for seed in range(3):
                g = torch.Generator().manual_seed(seed)
                start, t, d = 35, 40, 3
                length = start + n + t
                states = torch.randn(1, length, d, generator=g)
                keys = torch.randn(1, length, 32, generator=g)
                trunc = budget if isinstance(budget, int) else budget * n
                ref = ref_get_retained_image_token(states, keys, start, n, trunc, 4, 4)
                tokens = VisualTokens.from_features(states[:, start:start + n], grid=(1, n),
                                                    keys=keys[:, start:start + n], text=states[:, start + n:],
                                                    text_mask=torch.ones(1, t, dtype=torch.bool))
                ctx = StageContext(text_keys=keys[:, start + n:], vis_seq=torch.arange(start, start + n)[None],
                                   text_seq=torch.arange(start + n, length)[None])
                method = get("dart", budget=budget)
                out = method.compress_stage(tokens, 0, 1, context=ctx)
                assert torch.equal(out.pos[0][out.mask[0]] + start, ref), (n, budget, seed)
                assert int(out.counts[0]) == 4 + 8 * int(trunc // 8)
                plain = method.compress_stage(tokens, 0, 1, context=StageContext(text_keys=ctx.text_keys))
                order_mattered += not torch.equal(plain.pos[0][plain.mask[0]] + start, ref)
    assert order_mattered > 0


def ref_sparsevlm_stage(relation_vis, vis_out, keep_num):
    """One SparseVLM stage as the reference does it (``score.py`` ``attn_postprocess_topk`` + the recycling block of
    ``modelling_sparse_llama.py``): ``relation_vis [1, N]`` rater-mean attention, ``vis_out [1, N, D]`` the layer's
    output; returns (selected indices, merged tokens in cluster order, their centres)."""
    n = relation_vis.shape[1]
    _, indices = torch.topk(relation_vis, min(keep_num, n - 1), dim=1)
    pred = torch.zeros_like(relation_vis, dtype=torch.bool)
    pred[0][indices] = True
    pruned = torch.where(~pred[0])[0]
    n_merge = int(pruned.shape[0] * 0.3) + 1
    stage2 = relation_vis[0][pruned].topk(n_merge)[1]
    cand = vis_out[:, pruned[stage2]]
    cluster_num = int(cand.shape[1] / 10) + 1
    noise = 1e-7 * (1.0 - pruned[stage2].argsort().argsort().float() / len(stage2))
    merged, centres = ref_cluster_and_merge(cand, cluster_num, noise)
    return torch.where(pred[0])[0], merged[0], pruned[stage2][centres]


@pytest.mark.parametrize("n,keep", [(576, 300), (576, 66), (144, 75), (144, 17)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsevlm_stage_matches_reference_function(n, keep, seed):
    from vtcompress import VisualTokens
    from vtcompress.methods.attention import StageContext

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 32, generator=g)
    attn = torch.rand(1, n, 5, generator=g)
    rel = attn.mean(-1)
    sel, merged, centres = ref_sparsevlm_stage(rel, x, keep)
    tokens = VisualTokens.from_features(x, grid=(1, n), text=torch.randn(1, 5, 32, generator=g),
                                        text_mask=torch.ones(1, 5, dtype=torch.bool)).replace(attn=attn)
    ctx = StageContext(rated=True)
    out = get("sparsevlm", budget=0.5, stage_tokens=(keep, 1, 1)).compress_stage(tokens, 0, 3, context=ctx)
    is_merged = out.mask[0] & (out.size[0] > 1) | (ctx.merge_rank[0] >= 0)
    assert torch.equal(out.pos[0][out.mask[0] & ~is_merged], sel)
    order = ctx.merge_rank[0][is_merged].argsort()
    assert torch.equal(out.pos[0][is_merged][order], centres)  # merged tokens in the reference's cluster order
    torch.testing.assert_close(out.x[0][is_merged][order], merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [576, 144])
@pytest.mark.parametrize("budget", [0.5, 0.33])
def test_pyramiddrop_counts_match_reference(n, budget):
    """``image_token_ratio_list = [1, b, b^2, b^3]`` (lambda = the budget): ``int(N * ratio[s + 1])`` per stage."""
    from vtcompress.methods.attention import PyramidDrop

    ratio_list = [1.0, budget, budget**2, budget**3]
    m = PyramidDrop(budget=budget)
    for s in range(3):
        assert int(m.stage_counts(torch.tensor([n]), s)) == int(n * ratio_list[s + 1])
