"""Reference parity: FastVID (LunarShen/FastVID) vs ``vtcompress`` ``fastvid`` on identical inputs.

The reference below is re-typed from reading the authors' code (LLaVA-OneVision port, HEAD a40a109); it runs on the
same random clips as ours (a static background per scene, a few moving object tokens, small per-frame noise, and
scene changes, so DySeg has transitions to find) and the tests assert the same kept tokens (their clip indices)
and features (1e-6 in float32). The reference's vision signals are fed what our feature-only defaults compute
(frame mean features, dot-with-mean saliency) or a random ``cls_attn`` with ``saliency="cls_attn"``.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vtcompress as vc
from vtcompress import VisualTokens
from vtcompress.compressor import Signal
from vtcompress.methods.temporal import FastVID

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ re-typed reference
def ref_fastvid(video_hidden_states, frame_attn_weights, frame_global_features, retention_ratio=0.10, DySeg_c=8,
                DySeg_tau=0.9, STPrune_d=0.4, DTM_p=4, DTM_beta=0.6, noise=False):
    """LunarShen/FastVID, ``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py``,
    ``Qwen2Model.forward``, the block "FastVID" (DySeg, STPrune: anchor distribution, ATS, parallel density
    scores, DTM for single- and multi-frame segments), on the video part of the sequence only
    (``video_start_idx = 0``, no text after it).

    Args: ``video_hidden_states [T, n, D]``, ``frame_attn_weights [T, n]``, ``frame_global_features [T, Dg]``.
    Returns ``(keep_indexs [K], hidden_states [K, D])`` sorted by clip index, as the reference feeds the LLM.
    ``noise`` keeps the reference's ``rand * 1e-6`` density tie-break (off: deterministic).
    """
    device_type = video_hidden_states.device
    frame_num, frame_token_len, hidden_states_dim = video_hidden_states.shape
    video_token_len = frame_num * frame_token_len
    batchframe_indices = torch.arange(frame_num, device=device_type).unsqueeze(1)
    alltoken_indices = torch.arange(video_token_len, device=device_type).view(frame_num, frame_token_len)
    frame_attn_weights = frame_attn_weights.reshape(frame_num, frame_token_len)

    # DySeg
    frame_global_features = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)
    cut_indices_topk = torch.topk(similarity_matrix, DySeg_c - 1, largest=False).indices
    cut_indices_cos = torch.nonzero(similarity_matrix < DySeg_tau, as_tuple=False).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices_topk, cut_indices_cos])).sort().values
    padded = F.pad(cut_indices, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    segment_sizes = padded.diff().tolist()

    # STPrune
    keep_indexs = ()
    final_tokens = []
    frame_retain_num = int(frame_token_len * retention_ratio)
    frame_salient_num = frame_retain_num - int(frame_retain_num * STPrune_d)
    frm_context_num_list = torch.zeros(frame_num, dtype=torch.int, device=device_type)
    frame_context_num = frame_retain_num - frame_salient_num

    # Compute Anchor Token Distribution
    offset = 0
    for seg_i_len in segment_sizes:
        seg_context_num = frame_context_num * seg_i_len
        temp_num = (seg_i_len + DTM_p - 1) // DTM_p
        cur_frm_context_num = seg_context_num // temp_num
        end = offset + seg_i_len
        seg_indices = torch.arange(seg_i_len - 1, -1, -1, device=device_type)
        mask = seg_indices % DTM_p == 0
        frm_context_num_list[offset:end][mask] = cur_frm_context_num
        offset = end

    # ATS
    salient_indexes = torch.topk(frame_attn_weights, frame_salient_num, dim=1).indices
    batch_indices = batchframe_indices.expand(-1, frame_salient_num)
    salient_tokens = video_hidden_states[batch_indices, salient_indexes]
    salient_global_indexes = alltoken_indices[batch_indices, salient_indexes]
    final_tokens.append(salient_tokens.view(-1, hidden_states_dim))
    keep_indexs += (salient_global_indexes.view(-1),)

    # Parallel Density Score Computation
    all_indices = torch.arange(frame_token_len, device=device_type).unsqueeze(0).expand(frame_num, -1)
    all_indices_mask = torch.ones_like(all_indices, dtype=torch.bool)
    all_indices_mask.scatter_(1, salient_indexes, False)
    filtered_indices = all_indices[all_indices_mask].view(frame_num, frame_token_len - frame_salient_num)
    batch_indices = batchframe_indices.expand(-1, frame_token_len - frame_salient_num)
    token_filtered = video_hidden_states[batch_indices, filtered_indices]
    alltoken_filtered_indices = alltoken_indices[batch_indices, filtered_indices]

    tmp_frm_hidden_states = token_filtered
    dist_matrix = torch.cdist(tmp_frm_hidden_states.float(), tmp_frm_hidden_states.float()) / (hidden_states_dim ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=4, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if noise:
        density = density + torch.rand(density.shape, device=device_type, dtype=density.dtype) * 1e-6
    density_mask = density[:, None, :] > density[:, :, None]
    density_mask = density_mask.type(tmp_frm_hidden_states.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist_0, index_parent = (dist_matrix * density_mask + dist_max * (1 - density_mask)).min(dim=-1)
    density_score = dist_0 * density
    sampled_indexs = torch.topk(density_score, k=frame_context_num, dim=-1).indices

    # DTM for Single-Frame Segment
    batch_indices = batchframe_indices.expand(-1, frame_context_num)
    frm_context_tokens = token_filtered[batch_indices, sampled_indexs]
    frm_context_global_indexes = alltoken_filtered_indices[batch_indices, sampled_indexs]
    to_be_merge_tokens = token_filtered / token_filtered.norm(dim=-1, keepdim=True)
    merge_target_tokens = to_be_merge_tokens[batch_indices, sampled_indexs]
    similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(frame_num, frame_token_len - frame_salient_num, frame_context_num,
                                 dtype=token_filtered.dtype, device=device_type)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=DTM_beta)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), token_filtered) / counts
    frm_context_tokens = avg_weights * frm_context_tokens + (1 - avg_weights) * aggregated_hidden
    context_for_frame_mask = frm_context_num_list == frame_context_num
    final_tokens.append(frm_context_tokens[context_for_frame_mask].view(-1, hidden_states_dim))
    keep_indexs += (frm_context_global_indexes[context_for_frame_mask].view(-1),)

    # DTM for Multi-Frame Segment
    idx_seg_start = 0
    for seg_i_len in segment_sizes:
        if seg_i_len > 1:
            cur_seg_context_num_list = frm_context_num_list[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_context_num = cur_seg_context_num_list[-1]
            cur_seg_target_mask = cur_seg_context_num_list > frame_context_num
            cur_seg_target_num = cur_seg_target_mask.sum()
            cur_seg_density_score = density_score[idx_seg_start:idx_seg_start + seg_i_len][cur_seg_target_mask]
            cur_seg_token_filtered = token_filtered[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_token_target = cur_seg_token_filtered[cur_seg_target_mask]
            cur_seg_token_filtered = cur_seg_token_filtered.view(1, -1, hidden_states_dim).expand(
                cur_seg_target_num, -1, -1)
            cur_seg_alltoken_indices = alltoken_filtered_indices[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_alltoken_indices = cur_seg_alltoken_indices[cur_seg_target_mask]
            sampled_indexs = torch.topk(cur_seg_density_score, k=cur_seg_context_num, dim=-1).indices
            batch_indices = batchframe_indices[:cur_seg_target_num].expand(-1, cur_seg_context_num)
            cur_context_tokens = cur_seg_token_target[batch_indices, sampled_indexs]
            cur_context_global_indexes = cur_seg_alltoken_indices[batch_indices, sampled_indexs]
            to_be_merge_tokens = cur_seg_token_filtered / cur_seg_token_filtered.norm(dim=-1, keepdim=True)
            merge_target_tokens = cur_context_tokens / cur_context_tokens.norm(dim=-1, keepdim=True)
            similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
            assign_one_hot = torch.zeros(cur_seg_target_num, to_be_merge_tokens.shape[1], cur_seg_context_num,
                                         dtype=token_filtered.dtype, device=device_type)
            assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
            avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=DTM_beta)
            counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
            aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), cur_seg_token_filtered) / counts
            cur_context_tokens = avg_weights * cur_context_tokens + (1 - avg_weights) * aggregated_hidden
            final_tokens.append(cur_context_tokens.view(-1, hidden_states_dim))
            keep_indexs += (cur_context_global_indexes.view(-1),)
        idx_seg_start += seg_i_len

    hidden_states = torch.cat(final_tokens, dim=0)
    keep_indexs = torch.cat(keep_indexs, dim=0)
    sorted_indexs = torch.argsort(keep_indexs)
    return keep_indexs[sorted_indexs], hidden_states[sorted_indexs], segment_sizes


# ------------------------------------------------------------------------------------------ inputs
def make_clip(t, grid, d=16, seed=0, cuts=(), movers=2, noise=0.05):
    """``[1, t * h * w, d]``: a static random background per scene (a new scene after each frame in ``cuts``),
    ``movers`` object tokens moving one position per frame, small per-frame noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    n = h * w
    frames, scene = [], None
    objs = torch.randn(movers, d, generator=g) * 2 + 1
    start = torch.randint(0, n, (movers,), generator=g)
    for f in range(t):
        if scene is None or (f - 1) in cuts:
            scene = torch.randn(n, d, generator=g) + torch.randn(1, d, generator=g) * 2
        fr = scene + noise * torch.randn(n, d, generator=g)
        for k in range(movers):
            fr[(int(start[k]) + f) % n] = objs[k] + noise * torch.randn(d, generator=g)
        frames.append(fr)
    return torch.stack(frames).reshape(1, t * n, d)


def clip_tokens(x, grid, t, cls_attn=None):
    return VisualTokens.from_features(x, grid=grid, frames=t, cls_attn=cls_attn)


def reference_on(x, grid, t, method: FastVID, cls_attn=None):
    """The reference on clip ``x [1, t * n, D]`` with our default signals (or ``cls_attn``), ``method``'s knobs."""
    n = grid[0] * grid[1]
    v = x[0].reshape(t, n, -1)
    g = v.float().mean(1)
    attn = cls_attn.reshape(t, n) if cls_attn is not None else (v.float() * v.float().mean(1, keepdim=True)).sum(-1)
    assert isinstance(method.budget, float)
    return ref_fastvid(v, attn, g, method.budget, method.min_segments, method.tau, method.context_ratio,
                       method.anchor_interval, method.beta)


def assert_consistent(out: VisualTokens):
    out.validate()
    for b in range(out.batch_size):
        k = int(out.counts[b])
        pos = out.pos[b, :k]
        assert torch.equal(out.assign[b, pos], torch.arange(k))  # a kept token holds its anchor patch
        assert float(out.size[b, :k].sum()) == float((out.assign[b] >= 0).sum())  # merges conserve patches
        hits = torch.bincount(out.assign[b][out.assign[b] >= 0], minlength=k)
        assert torch.equal(hits.float(), out.size[b, :k])  # size = patches assigned to the token


# ------------------------------------------------------------------------------------------ parity
# (T, grid, budget, knobs, scene cuts): reference-feasible settings (c <= T, m >= 4, cur <= m, C >= 1)
CASES = [
    (4, (4, 4), 0.375, dict(min_segments=2, tau=0.5), (1,)),
    (4, (4, 4), 0.25, dict(min_segments=3, tau=0.9), ()),
    (4, (3, 5), 0.4, dict(min_segments=1, tau=0.0), ()),  # one segment of 4: one anchor frame
    (8, (4, 4), 0.375, dict(min_segments=2, tau=0.0), (2,)),  # segments 3 + 5: two anchor frames in the second
    (8, (4, 4), 0.25, dict(min_segments=1, tau=0.0, anchor_interval=2), ()),  # L=8, p=2: four anchor frames
    (8, (3, 5), 0.4, dict(min_segments=3, tau=0.8, beta=0.2), (3, 5)),
    (8, (4, 4), 0.25, dict(min_segments=2, tau=0.0, anchor_interval=2), (2,)),  # L=3, C=1, p=2: cur == C quirk
    (8, (4, 4), 0.375, dict(min_segments=8, tau=0.9), ()),  # every frame its own segment
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_reference(case, seed):
    t, grid, budget, knobs, cuts = CASES[case]
    x = make_clip(t, grid, seed=seed, cuts=cuts)
    method = FastVID(budget=budget, **knobs)
    keep, hid, sizes = reference_on(x, grid, t, method)
    out = method(clip_tokens(x, grid, t))
    k = int(out.counts[0])
    assert torch.equal(out.pos[0, :k], keep)
    torch.testing.assert_close(out.x[0, :k], hid, atol=1e-6, rtol=1e-6)
    # the segments too
    seg = method.segments(clip_tokens(x, grid, t))[0]
    assert torch.bincount(seg).tolist() == sizes
    assert_consistent(out)


def test_parity_exercises_the_structures():
    """The cases above do reach multi-frame DTM with several anchor frames, and the cur == C quirk."""
    t, grid, budget, knobs, cuts = CASES[3]
    m = FastVID(budget=budget, **knobs)
    _, _, sizes = reference_on(make_clip(t, grid, seed=0, cuts=cuts), grid, t, m)
    assert sizes == [3, 5]  # 5 frames, p = 4: anchor frames at its 1st and 5th frame
    t, grid, budget, knobs, cuts = CASES[6]
    m = FastVID(budget=budget, **knobs)
    _, _, sizes = reference_on(make_clip(t, grid, seed=0, cuts=cuts), grid, t, m)
    assert sizes == [3, 5] and m.split(t, 16) == (3, 1)  # L=3, p=2: cur = 3 // 2 = 1 == C
    # the quirk drops the middle frame's context tokens: the first segment keeps 3 * 3 salient + 2 anchors
    out = m(clip_tokens(make_clip(t, grid, seed=0, cuts=cuts), grid, t))
    frames = out.frame_of()[0, : int(out.counts[0])]
    assert int((frames == 1).sum()) == 3 and int((frames == 0).sum()) == 4


@pytest.mark.parametrize("seed", [0, 3])
def test_parity_cls_attn(seed):
    t, grid = 8, (4, 4)
    x = make_clip(t, grid, seed=seed, cuts=(4,))
    attn = torch.rand(1, t * 16, generator=torch.Generator().manual_seed(seed + 10))
    method = FastVID(budget=0.375, min_segments=3, tau=0.5, saliency="cls_attn")
    assert method.needs == (Signal.CLS_ATTN,) and FastVID().needs == ()
    keep, hid, _ = reference_on(x, grid, t, method, cls_attn=attn)
    out = method(clip_tokens(x, grid, t, cls_attn=attn))
    k = int(out.counts[0])
    assert torch.equal(out.pos[0, :k], keep)
    torch.testing.assert_close(out.x[0, :k], hid, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cls_attn"):
        method(clip_tokens(x, grid, t))


def test_reference_noise_is_negligible():
    """The reference's random 1e-6 density noise does not change the picks on these clips."""
    t, grid, budget, knobs, cuts = CASES[3]
    x = make_clip(t, grid, seed=5, cuts=cuts)
    m = FastVID(budget=budget, **knobs)
    n = 16
    v = x[0].reshape(t, n, -1)
    attn = (v * v.mean(1, keepdim=True)).sum(-1)
    torch.manual_seed(0)
    keep_noisy, _, _ = ref_fastvid(v, attn, v.mean(1), budget, m.min_segments, m.tau, m.context_ratio,
                                   m.anchor_interval, m.beta, noise=True)
    out = m(clip_tokens(x, grid, t))
    assert torch.equal(out.pos[0, : int(out.counts[0])], keep_noisy)


def test_anchor_cap_where_reference_raises():
    """cur > m: the reference's topk raises; we cap every anchor frame at its m non-salient tokens."""
    t, grid = 4, (4, 4)
    x = make_clip(t, grid, seed=0)
    m = FastVID(budget=0.5, min_segments=1, tau=0.0)  # R = 8, C = 3, S = 5, m = 11; L = 4: cur = 12 > 11
    with pytest.raises(RuntimeError):
        reference_on(x, grid, t, m)
    out = m(clip_tokens(x, grid, t))
    assert int(out.counts[0]) == t * 5 + 11
    assert_consistent(out)


# ------------------------------------------------------------------------------------------ behaviour
def test_counts_single_frame_segments_and_int_budget():
    t, grid = 8, (4, 4)
    x = torch.cat([make_clip(t, grid, seed=s) for s in range(2)])
    for budget, r in [(0.375, 6), (0.25, 4), (50, 6), (8, 1)]:
        m = FastVID(budget=budget, min_segments=t)  # every frame its own segment: exactly T * R
        assert m.frame_retain(t, 16) == r
        out = m(clip_tokens(x, grid, t))
        assert out.counts.tolist() == [t * r] * 2
        assert_consistent(out)
    with pytest.raises(ValueError, match="budget=7"):
        FastVID(budget=7)(clip_tokens(x, grid, t))


def test_counts_multi_frame_segments():
    """K = T * S + sum of anchor counts, from the segments (documented formula), and <= T * R."""
    t, grid = 8, (4, 4)
    for seed, cuts in [(0, (2,)), (1, ()), (2, (1, 4))]:
        x = make_clip(t, grid, seed=seed, cuts=cuts)
        m = FastVID(budget=0.375, min_segments=2, tau=0.5, anchor_interval=3)
        tok = clip_tokens(x, grid, t)
        s, c = m.split(t, 16)
        expect = t * s
        for length in torch.bincount(m.segments(tok)[0]).tolist():
            windows = -(-length // 3)
            cur = c * length // windows
            expect += windows * min(cur, 16 - s) if cur > c else windows * c
        out = m(tok)
        assert int(out.counts[0]) == expect <= t * m.frame_retain(t, 16)
        assert_consistent(out)


def test_batch_equals_rows():
    t, grid = 8, (4, 4)
    x = torch.cat([make_clip(t, grid, seed=0, cuts=(2,)), make_clip(t, grid, seed=1),
                   make_clip(t, grid, seed=2, cuts=(1, 5)), make_clip(t, grid, seed=0, cuts=(2,))])
    tok = clip_tokens(x, grid, t)
    for m in [FastVID(budget=0.375, min_segments=2, tau=0.5),
              FastVID(budget=0.25, min_segments=3, anchor_interval=2, tau=0.0),
              FastVID(budget=0.375, min_segments=2, tau=0.5, anchor_interval=3, dtm_scope="window")]:
        out = m(tok)
        assert_consistent(out)
        assert len({tuple(r) for r in m.segments(tok).tolist()}) > 1  # rows really differ
        for b in range(x.shape[0]):
            one = m(clip_tokens(x[b : b + 1], grid, t))
            row = out.row(b)
            assert torch.equal(row.pos, one.pos) and torch.equal(row.size, one.size)
            assert torch.equal(out.assign[b], one.assign[0])
            torch.testing.assert_close(row.x, one.x, atol=1e-6, rtol=1e-6)


def test_window_scope():
    t, grid = 8, (4, 4)
    x = make_clip(t, grid, seed=0, cuts=(2,))
    tok = clip_tokens(x, grid, t)
    # segments no longer than p: one anchor frame each, same result
    a = FastVID(budget=0.375, min_segments=4, tau=0.5, anchor_interval=4)
    assert int(torch.bincount(a.segments(tok)[0]).max()) <= 4
    b = dataclasses.replace(a, dtm_scope="window")
    oa, ob = a(tok), b(tok)
    assert torch.equal(oa.pos, ob.pos) and torch.equal(oa.assign, ob.assign)
    torch.testing.assert_close(oa.x, ob.x, atol=0, rtol=0)
    # a segment of 5 frames, p = 4: in window mode features follow provenance exactly
    w = FastVID(budget=0.375, min_segments=2, tau=0.0, dtm_scope="window", beta=0.3)
    out = w(tok)
    assert_consistent(out)
    k = int(out.counts[0])
    xs = x[0]
    for j in range(k):
        members = (out.assign[0] == j).nonzero()[:, 0]
        own = xs[out.pos[0, j]]
        if len(members) == 1:
            torch.testing.assert_close(out.x[0, j], own, atol=1e-6, rtol=1e-6)
        else:
            wt = max(1 / (len(members) + 1), 0.3)
            torch.testing.assert_close(out.x[0, j], wt * own + (1 - wt) * xs[members].mean(0), atol=1e-5, rtol=1e-5)
    # the default differs there: anchors gather tokens of the other window too
    assert not torch.allclose(FastVID(budget=0.375, min_segments=2, tau=0.0, beta=0.3)(tok).x, out.x)


def test_budget_one_and_full_int_budget_return_input():
    t, grid = 4, (4, 4)
    tok = clip_tokens(make_clip(t, grid), grid, t)
    assert FastVID(budget=1.0)(tok) is tok
    assert FastVID(budget=64)(tok) is tok and FastVID(budget=1000)(tok) is tok


def test_context_ratio_zero_keeps_salient_only():
    t, grid = 4, (4, 4)
    x = make_clip(t, grid)
    m = FastVID(budget=0.25, context_ratio=0.0)
    out = m(clip_tokens(x, grid, t))
    assert int(out.counts[0]) == t * 4 and float(out.size.sum()) == t * 4
    v = x[0].reshape(t, 16, -1)
    top = (v * v.mean(1, keepdim=True)).sum(-1).topk(4, dim=1).indices + torch.arange(t)[:, None] * 16
    assert torch.equal(out.pos[0], top.reshape(-1).sort().values)
    torch.testing.assert_close(out.x[0], x[0, out.pos[0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    t, grid = 8, (4, 4)
    x = make_clip(t, grid, seed=1, cuts=(3,))
    m = FastVID(budget=0.375, min_segments=3, tau=0.5)
    ref = m(clip_tokens(x, grid, t))
    out = m(clip_tokens(x.to(dtype), grid, t))
    assert out.x.dtype == dtype
    assert_consistent(out)
    if dtype == torch.float32:
        assert torch.equal(out.pos, ref.pos)
    else:
        assert abs(int(out.counts[0]) - int(ref.counts[0])) <= 4


def test_registry_and_defaults():
    m = vc.get("fastvid")
    assert isinstance(m, FastVID) and m.budget == 0.1 and m.min_segments == 8 and m.tau == 0.9
    assert (m.context_ratio, m.anchor_interval, m.beta) == (0.4, 4, 0.6)
    assert FastVID.family == "temporal" and FastVID.temporal and FastVID.positions == "original"
    # LLaVA-OneVision sizes: 32 frames of 14 x 14, ratio 0.1: R = 19, S = 12, C = 7 (the reference's counts)
    assert m.frame_retain(32, 196) == 19 and m.split(32, 196) == (12, 7)


def test_default_on_larger_clip():
    t, grid = 16, (6, 6)
    x = torch.cat([make_clip(t, grid, d=32, seed=s, cuts=(5, 11)) for s in range(2)])
    out = FastVID(budget=0.3)(clip_tokens(x, grid, t))
    assert_consistent(out)
    assert (out.counts <= t * 10).all()


def test_needs_full_grid():
    t, grid = 4, (4, 4)
    tok = clip_tokens(make_clip(t, grid), grid, t)
    pruned = tok.select(torch.arange(0, 64, 2)[None])
    with pytest.raises(ValueError, match="full grid"):
        FastVID()(pruned)


@pytest.mark.parametrize("field,value", [
    ("min_segments", 0), ("min_segments", 2.0), ("anchor_interval", 0), ("anchor_interval", True),
    ("tau", 1.5), ("tau", float("nan")), ("context_ratio", -0.1), ("context_ratio", 1.1), ("beta", 2.0),
    ("beta", "x"), ("saliency", "attn"), ("dtm_scope", "clip"), ("budget", 0), ("budget", 1.5),
])
def test_bad_hyper_parameters(field, value):
    with pytest.raises(ValueError, match=repr(value) if not isinstance(value, float) or value == value else "nan"):
        FastVID(**{field: value})
