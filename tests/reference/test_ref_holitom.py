"""Reference parity: HoliTom's outer-LLM merging vs :class:`vtcompress.methods.temporal.HoliTom`.

The reference below is re-typed from reading the authors' code: github cokeshao/HoliTom (HEAD e9b2972),
``holitom/llava_arch.py``, class ``LlavaMetaForCausalLM_holitom``: the video branch of
``prepare_inputs_labels_for_multimodal`` and ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``,
``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``cluster_dpc_knn``,
``merge_tokens_by_clustering``. It runs on one clip at a time in the reference's conventions (``image_feat [T, n, D]``
after the model's pooling, ``attn [T, n]``) and on clips with structure (a static background plus small noise, a
few moving tokens, a scene cut), and the tests assert the same segments, the same output positions and the same
features (1e-6, fp32) as ours.

Changes to the reference, each marked ``# CHANGED`` where it is: the random tie-break of the density
(``torch.rand * 1e-6``) is a parameter, off in the parity tests, where an exact density tie goes to the lower
index and ``topk`` of equal scores picks the lower index first (ours: the reference's choice among ties is random
or unspecified, and ties are structural, e.g. a group of one cluster has ``k = 1`` and every density ``exp(0)``);
the contextual path's
``pos.masked_select(mask.unsqueeze(-1))`` (which broadcasts ``[F, L]`` with ``[F, L, 1]`` and raises for any ``D > 0``
with clusters) is ``pos.masked_select(mask)``, what it means; the ``mm_newline_position="grid"`` ordering is kept
(each frame sorted by position, a segment's static tokens in its first frame) without the newline tokens; each
output's clip position (frame * n + pos) is tracked alongside the features, which the reference returns alone.
"""

import math

import pytest
import torch

import vtcompress
from methods_util import check_invariants
from vtcompress import VisualTokens
from vtcompress.methods.temporal import HoliTom

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ re-typed reference
def ref_cluster_dpc_knn(x, cluster_num, k=7, noise=None):
    """``cluster_dpc_knn``: DPC-KNN centres of ``x [b, L, D]``.

    CHANGED: the reference adds ``torch.rand * 1e-6`` to the density "to ensure no tokens have the same density";
    by default (``noise=None``) an exact tie is broken deterministically instead, the lower index counting as denser
    (ours); ``noise=1e-6`` is the published line."""
    batch_size, seq_len, embed_dim = x.shape
    dist_matrix = torch.cdist(x.float(), x.float()) / (embed_dim**0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * noise
        mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    else:
        ar = torch.arange(seq_len)
        tie = (density[:, None, :] == density[:, :, None]) & (ar[None, None, :] < ar[None, :, None])
        mask = ((density[:, None, :] > density[:, :, None]) | tie).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1).values[:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    if noise is not None:
        _, index_center = score.topk(cluster_num, dim=-1)
    else:
        # CHANGED: topk's choice among equal scores is unspecified, and ties are structural here too (with k = 1,
        # tokens 0 and 1 tie when they are the farthest pair): the lower index first (ours)
        index_center = score.sort(dim=-1, descending=True, stable=True).indices[:, :cluster_num]
    return index_center, dist_matrix


def ref_select_static_windows(feature_sim, batch_size, tau, max_window_size):
    """``select_static_windows``: the dynamic programme over frames; returns ``(selected_frames, total_reduced)``."""
    def get_pruned_static_count_vectorized(feature_sim, batch_size, tau):
        similarity_matrix = torch.ones((batch_size, batch_size, feature_sim.shape[1]))
        for start in range(batch_size - 1):
            cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
            similarity_matrix[start, start + 1:start + 1 + len(cum_similarity)] = cum_similarity
        window_lengths = torch.arange(batch_size).unsqueeze(0) - torch.arange(batch_size).unsqueeze(1)
        window_lengths = window_lengths.clamp(min=0)
        return (similarity_matrix.sum(dim=-1) * window_lengths).float()

    pruned_static_count = get_pruned_static_count_vectorized(feature_sim, batch_size, tau)
    dp = torch.zeros(batch_size)
    prev = torch.zeros(batch_size, dtype=torch.long)
    for i in range(batch_size):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, min(i + 1, max_window_size) + 1):
            j = i - window_size
            current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]
            if current_val > max_val:
                max_val = current_val
                best_j = j + 1
        dp[i] = max_val
        prev[i] = best_j
    selected_frames = []
    i = batch_size - 1
    while i >= 0:
        selected_frames.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return selected_frames[::-1], dp[-1].item()


def ref_merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta, no_beta=False):
    """``merge_tokens_by_clustering`` (``no_beta``: the reference's ``NO_BETA`` environment variable set)."""
    batch_size, seq_len, embed_dim = feat.shape
    all_indices = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
    non_target_indices = torch.zeros((batch_size, seq_len - cluster_num), dtype=torch.long)
    for b in range(batch_size):
        non_target_mask = ~torch.isin(all_indices[b], target_indices[b])
        non_target_indices[b] = all_indices[b][non_target_mask]
    non_target_feat = torch.gather(feat, 1, non_target_indices.unsqueeze(-1).expand(-1, -1, feat.size(-1)))
    dist_matrix = torch.gather(dist_matrix, 1, non_target_indices.unsqueeze(-1).expand(-1, -1, dist_matrix.size(-1)))
    dist_matrix = torch.gather(dist_matrix, 2, target_indices.unsqueeze(1).expand(-1, dist_matrix.size(1), -1))
    idx_cluster = torch.argmin(dist_matrix, dim=-1)
    cluster_tokens = []
    for b in range(batch_size):
        batch_tokens = []
        for i in range(cluster_num):
            mask = idx_cluster[b] == i
            if mask.any():
                cluster_features = non_target_feat[b][mask]
                if not no_beta:
                    cluster_means = cluster_features.mean(dim=0)
                    batch_tokens.append(Beta * feat[b][target_indices[b][i]] + (1 - Beta) * cluster_means)
                else:
                    all_features = torch.cat([feat[b][target_indices[b][i]].unsqueeze(0), cluster_features], dim=0)
                    batch_tokens.append(all_features.mean(dim=0))
            else:
                batch_tokens.append(feat[b][target_indices[b][i]])
        cluster_tokens.append(torch.stack(batch_tokens))
    return torch.stack(cluster_tokens)


def ref_merge_tokens_by_attention_density(feat, attn, pos, retain_ratio, D, Beta, K, no_beta=False, noise=None):
    """``merge_tokens_by_attention_density``: per frame, dominant tokens by attention + DPC-KNN contextual ones."""
    batch_size, seq_len, embed_dim = feat.shape
    dominant_num = round(math.ceil(seq_len * retain_ratio) * (1 - D))
    contextual_num = math.ceil(seq_len * retain_ratio) - dominant_num
    if dominant_num > 0:
        all_indices = attn.topk(dominant_num, dim=1).indices
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = feat.masked_select(~mask.unsqueeze(-1)).view(batch_size, dominant_num, embed_dim)
        dominant_pos = pos.masked_select(~mask).view(batch_size, dominant_num)
    else:
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool)
        dominant_tokens = torch.empty((batch_size, 0, embed_dim))
        dominant_pos = torch.empty((batch_size, 0))
    if contextual_num > 0:
        feat_filtered = feat.masked_select(mask.unsqueeze(-1)).view(batch_size, seq_len - dominant_num, embed_dim)
        # CHANGED: the published pos.masked_select(mask.unsqueeze(-1)) broadcasts [F, L] with [F, L, 1] and raises
        contextual_pos = pos.masked_select(mask).view(batch_size, seq_len - dominant_num)
        target_indices, dist_matrix = ref_cluster_dpc_knn(feat_filtered, contextual_num, k=min(K, contextual_num),
                                                          noise=noise)
        target_indices = torch.sort(target_indices, dim=-1)[0]
        contextual_pos = torch.stack([contextual_pos[b][target_indices[b]] for b in range(batch_size)])
        contextual_tokens = ref_merge_tokens_by_clustering(feat_filtered, target_indices, dist_matrix, contextual_num,
                                                           Beta, no_beta)
    else:
        contextual_tokens = torch.empty((batch_size, 0, embed_dim))
        contextual_pos = torch.empty((batch_size, 0))
    image_feat, image_pos = [], []
    for b in range(batch_size):
        image_feat.append(torch.cat([dominant_tokens[b], contextual_tokens[b]], dim=0))
        image_pos.append(torch.cat([dominant_pos[b], contextual_pos[b]], dim=0))
    return torch.stack(image_feat), torch.stack(image_pos)


def ref_merge_tokens_by_density(feat, pos, retain_ratio, Beta, K, no_beta=False, noise=None):
    """``merge_tokens_by_density``: DPC-KNN of a segment's static tokens into ``round(n_s * ratio)`` tokens."""
    batch_size, seq_len, embed_dim = feat.shape
    cluster_num = round(seq_len * retain_ratio)
    if cluster_num > 0:
        target_indices, dist_matrix = ref_cluster_dpc_knn(feat, cluster_num, k=min(K, cluster_num), noise=noise)
        target_indices = torch.sort(target_indices, dim=-1)[0]
        image_pos = torch.stack([pos[b][target_indices[b]] for b in range(batch_size)])
        image_feat = ref_merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta, no_beta)
    else:
        image_feat = torch.empty((batch_size, 0, embed_dim))
        image_pos = torch.empty((batch_size, 0))
    return image_feat, image_pos


def ref_get_static_dynamic_features(image_feat, attn_weights, selected_frames, feature_sim, tau):
    """``get_static_dynamic_features``: per segment, its static tokens' temporal means and its dynamic tokens."""
    batch_size, seq_len, embed_dim = image_feat.shape
    static_feat_list, dynamic_feat_list, dynamic_attn_list, static_pos_list, dynamic_pos_list = [], [], [], [], []
    for start, end in selected_frames:
        all_indices = torch.arange(seq_len).unsqueeze(0)
        if start == end:
            static_feat_list.append(torch.empty((0, embed_dim)))
            dynamic_feat_list.append(image_feat[start:end + 1])
            dynamic_attn_list.append(attn_weights[start:end + 1])
            static_pos_list.append(torch.empty((0, seq_len)))
            dynamic_pos_list.append(all_indices)
        else:
            windows_size = end - start + 1
            mask = torch.all(feature_sim[start:end, :] > tau, dim=0)
            static_feat_list.append(image_feat[start:end + 1, mask].mean(dim=0))
            dynamic_feat_list.append(image_feat[start:end + 1, ~mask])
            dynamic_attn_list.append(attn_weights[start:end + 1, ~mask])
            static_pos_list.append(all_indices[:, mask].expand(1, -1))
            dynamic_pos_list.append(all_indices[:, ~mask].expand(windows_size, -1))
    return static_feat_list, dynamic_feat_list, dynamic_attn_list, static_pos_list, dynamic_pos_list


def ref_holitom(static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos, window_size, retain_ratio, D, Beta,
                K, start, no_beta=False, noise=None):
    """``holitom`` on one segment, ``mm_newline_position="grid"`` without the newline tokens (CHANGED); returns the
    features and (added) the clip position ``frame * n + pos`` of each."""
    seq = dynamic_feat.shape[1] + static_feat.shape[0]
    if window_size == 1:
        dynamic_feat, dynamic_pos = ref_merge_tokens_by_attention_density(dynamic_feat, dynamic_attn, dynamic_pos,
                                                                          retain_ratio, D, Beta, K, no_beta, noise)
        dynamic_pos, sorted_indices = torch.sort(dynamic_pos, dim=1)
        dynamic_feat = torch.gather(dynamic_feat, 1,
                                    sorted_indices.unsqueeze(-1).expand(-1, -1, dynamic_feat.shape[-1]))
        return dynamic_feat.flatten(0, 1), (dynamic_pos.long() + start * seq).flatten()
    dynamic_feat, dynamic_pos = ref_merge_tokens_by_attention_density(dynamic_feat, dynamic_attn, dynamic_pos,
                                                                      retain_ratio, D, Beta, K, no_beta, noise)
    static_feat, static_pos = ref_merge_tokens_by_density(static_feat.unsqueeze(0), static_pos, retain_ratio, Beta, K,
                                                          no_beta, noise)
    first_feat = torch.cat([static_feat, dynamic_feat[0:1, :]], dim=1)
    first_pos = torch.cat([static_pos.to(dynamic_pos.dtype), dynamic_pos[0:1, :]], dim=1)
    first_pos, first_sorted = torch.sort(first_pos, dim=1)
    first_feat = torch.gather(first_feat, 1, first_sorted.unsqueeze(-1).expand(-1, -1, first_feat.shape[-1]))
    other_feat, other_pos = dynamic_feat[1:, :], dynamic_pos[1:, :]
    other_pos, other_sorted = torch.sort(other_pos, dim=1)
    other_feat = torch.gather(other_feat, 1, other_sorted.unsqueeze(-1).expand(-1, -1, other_feat.shape[-1]))
    frames = torch.arange(start + 1, start + window_size)[:, None]
    feat = torch.cat([first_feat.flatten(0, 1), other_feat.flatten(0, 1)])
    pos = torch.cat([first_pos.long().flatten() + start * seq, (other_pos.long() + frames * seq).flatten()])
    return feat, pos


def ref_holitom_video(image_feat, attn_weights, retain_ratio=0.1, tau=0.8, Beta=0.6, D=0.0, K=7,
                      max_window_size=1024, no_beta=False, noise=None):
    """The video branch of ``prepare_inputs_labels_for_multimodal`` on one clip's pooled features ``[T, n, D]``:
    returns ``(feat [K, D], clip pos [K], selected_frames, total_reduced)``."""
    batch_size, seq_len, embed_dim = image_feat.shape
    normed = torch.nn.functional.normalize(image_feat, p=2, dim=-1)
    feature_sim = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    selected_frames, total_reduced = ref_select_static_windows(feature_sim, batch_size, tau, max_window_size)
    total_tokens = batch_size * seq_len
    retain_ratio = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
    static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos = ref_get_static_dynamic_features(
        image_feat, attn_weights, selected_frames, feature_sim, tau)
    feats, poss = [], []
    for idx, (start, end) in enumerate(selected_frames):
        f, p = ref_holitom(static_feat[idx], dynamic_feat[idx], dynamic_attn[idx], static_pos[idx], dynamic_pos[idx],
                           end - start + 1, retain_ratio, D, Beta, K, start, no_beta, noise)
        feats.append(f)
        poss.append(p)
    return torch.cat(feats), torch.cat(poss), selected_frames, total_reduced


# ------------------------------------------------------------------------------------------ clips with structure
def moving_clip(b=2, t=8, grid=(4, 4), d=16, seed=0, moving=2, cut=True, dtype=torch.float32):
    """``b`` clips ``[B, T * n, D]``: a static background plus small noise, ``moving`` tokens that step one position
    per frame, and (``cut``) a new background from the middle frame on, so that the segmentation has work to do.
    Carries a ``cls_attn`` (a softmax per frame) for the attention-ranked path."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    rows = []
    for _ in range(b):
        bg = torch.randn(n, d, generator=g)
        x = bg[None].repeat(t, 1, 1) + 0.05 * torch.randn(t, n, d, generator=g)
        if cut:
            c = int(torch.randint(1, t, (1,), generator=g))
            x[c:] = torch.randn(n, d, generator=g)[None] + 0.05 * torch.randn(t - c, n, d, generator=g)
        for _m in range(moving):
            obj = torch.randn(d, generator=g) * 2
            p0 = int(torch.randint(0, n, (1,), generator=g))
            for f in range(t):
                x[f, (p0 + f) % n] = obj + 0.05 * torch.randn(d, generator=g)
        rows.append(x)
    x = torch.stack(rows)  # [B, T, n, D]
    attn = torch.randn(b, t, n, generator=g).softmax(-1)
    return VisualTokens.from_features(x.reshape(b, t * n, d).to(dtype), grid, frames=t,
                                      cls_attn=attn.reshape(b, t * n).to(dtype))


def assert_matches_reference(method, clip):
    out = method(clip)
    check_invariants(clip, out)
    t_, n = clip.frames, clip.frame_patches
    start, end, reduced, _ = method.segments(clip)
    for r in range(clip.batch_size):
        x = clip.x[r].view(t_, n, -1)
        attn = clip.cls_attn[r].view(t_, n)
        feat, pos, frames, red = ref_holitom_video(
            x, attn, method.ratio(t_ * n), method.tau, 0.6 if method.beta is None else method.beta,
            method.contextual, method.k, method.max_window, no_beta=method.beta is None)
        ours = sorted({(int(s), int(e)) for s, e in zip(start[r], end[r], strict=True)})
        assert ours == frames
        assert float(reduced[r]) == red
        c = int(out.counts[r])
        assert c == len(pos) == int(method.kept(clip)[r])
        assert torch.equal(out.pos[r, :c], pos)
        torch.testing.assert_close(out.x[r, :c], feat.to(out.x.dtype), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("t,grid", [(4, (4, 4)), (8, (4, 4)), (8, (3, 5)), (4, (3, 5))])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_same_tokens_as_the_reference(seed, t, grid, budget):
    clip = moving_clip(b=2, t=t, grid=grid, seed=seed)
    assert_matches_reference(HoliTom(budget=budget), clip)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("params", [
    dict(contextual=0.0),  # the reference's default D=0: dynamic tokens ranked by vision attention
    dict(contextual=0.5),  # both paths (the reference raises here: its pos bug, fixed in the re-typed copy)
    dict(beta=None),  # NO_BETA: plain means of centre and members
    dict(max_window=2),  # segments of at most two frames
    dict(max_window=3, tau=0.5, k=3),
    dict(tau=0.999),  # nothing static: every frame its own segment
    dict(budget=37),  # an int budget: r = 37 / N
    dict(budget=0.02),  # segments whose static tokens round to 0 clusters: those patches are dropped
    dict(budget=3, contextual=0.0),
])
def test_options_match_the_reference(seed, params):
    clip = moving_clip(b=2, t=8, grid=(4, 4), seed=seed)
    assert_matches_reference(HoliTom(**{"budget": 0.25, **params}), clip)


def test_reference_noise_only_breaks_ties():
    """Where a group has no exact density ties (here: every group of at least 3 clusters, k >= 3) the published
    random tie-break changes nothing: same tokens as ours. With ties it picks at random among them."""
    clip = moving_clip(b=1, t=4, grid=(4, 4), seed=5, cut=False, moving=0)
    x, attn = clip.x[0].view(4, 16, -1), clip.cls_attn[0].view(4, 16)
    m = HoliTom(budget=0.5, tau=1.0)  # nothing static: every frame its own segment, ceil(16 * 0.5) = 8 clusters
    out = m(clip)
    torch.manual_seed(0)
    feat, pos, _, _ = ref_holitom_video(x, attn, 0.5, tau=1.0, D=1.0, noise=1e-6)
    assert torch.equal(out.pos[0], pos)
    torch.testing.assert_close(out.x[0], feat, rtol=1e-6, atol=1e-6)
    # a group of one cluster: k = 1, every density exp(0) = 1, so the reference's choice is random; ours is the
    # first token (densest by the tie-break, hence the largest distance score)
    f = torch.randn(1, 6, 8)
    assert ref_cluster_dpc_knn(f, 1, k=1)[0].tolist() == [[0]]


def test_reference_contextual_path_raises_as_published():
    """Why the re-typed copy changes one line: the published ``pos.masked_select(mask.unsqueeze(-1))`` raises."""
    feat, pos = torch.randn(1, 16, 8), torch.arange(16)[None]
    mask = torch.ones(1, 16, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        pos.masked_select(mask.unsqueeze(-1)).view(1, 16)
    out, p = ref_merge_tokens_by_attention_density(feat, torch.rand(1, 16), pos, 0.25, 1.0, 0.6, 7)
    assert out.shape == (1, 4, 8) and p.shape == (1, 4)


# ------------------------------------------------------------------------------------------ behaviour
def test_static_background_becomes_one_token_per_segment():
    """A clip without motion or cut is one segment; its static tokens are merged over all frames."""
    clip = moving_clip(b=1, t=8, grid=(4, 4), seed=7, moving=0, cut=False)
    m = HoliTom(budget=0.25)
    start, end, reduced, static = m.segments(clip)
    assert start.tolist() == [[0] * 8] and end.tolist() == [[7] * 8]
    assert bool(static.all()) and float(reduced[0]) == 7 * 16
    out = m(clip)
    # r' = min(0.25 * 128 / 16, 1) = 1: every static position one token in frame 0, spanning 8 patches
    assert int(out.counts[0]) == 16 and bool((out.pos[0] < 16).all())
    assert torch.equal(out.size[0], torch.full((16,), 8.0))
    torch.testing.assert_close(out.x[0], clip.x[0].view(8, 16, -1).mean(0), rtol=1e-6, atol=1e-6)


def test_batch_equals_one_by_one():
    clip = moving_clip(b=3, t=8, grid=(3, 5), seed=11)  # rows of different content (different cuts, motion)
    m = HoliTom(budget=0.3)
    out = m(clip)
    start = m.segments(clip)[0]
    assert len({tuple(row.tolist()) for row in start}) > 1  # the rows are segmented differently
    for r in range(3):
        one = m(clip.take_rows([r]))
        c = int(one.counts[0])
        assert int(out.counts[r]) == c
        assert torch.equal(out.pos[r, :c], one.pos[0, :c])
        assert torch.equal(out.assign[r], one.assign[0])
        torch.testing.assert_close(out.size[r, :c], one.size[0, :c], rtol=0, atol=0)
        torch.testing.assert_close(out.x[r, :c], one.x[0, :c], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5, 0.9, 20, 100])
@pytest.mark.parametrize("contextual", [1.0, 0.0])
def test_kept_counts_and_conservation(budget, contextual):
    clip = moving_clip(b=2, t=8, grid=(4, 4), seed=2)
    m = HoliTom(budget=budget, contextual=contextual)
    out = m(clip)
    check_invariants(clip, out)
    assert torch.equal(out.counts, m.kept(clip))
    t_, n = 8, 16
    start, end, reduced, static = m.segments(clip)
    for r in range(2):
        # the documented formula, recomputed from the segments in plain Python
        rr = min(m.ratio(t_ * n) / ((t_ * n - float(reduced[r])) / (t_ * n)), 1)
        want = 0
        for f in range(t_):
            want += math.ceil((n - int(static[r, f].sum())) * rr)
            if int(start[r, f]) == f and int(end[r, f]) > f:
                want += round(int(static[r, f].sum()) * rr)
        assert int(out.counts[r]) == want
        # merged, not dropped: sizes sum to the patches that kept an owner
        assert float(out.size[r][out.mask[r]].sum()) == float((out.assign[r] >= 0).sum())
    if contextual == 1.0:
        # clustering keeps every dynamic patch (ceil >= 1 cluster per frame; only a segment's static tokens
        # rounding to 0 clusters are dropped)
        dyn = ~static.reshape(2, -1)
        assert bool((out.assign[dyn] >= 0).all())


def test_attention_path_keeps_top_attention_unmerged():
    clip = moving_clip(b=1, t=4, grid=(4, 4), seed=4, cut=False, moving=3)
    m = HoliTom(budget=0.25, contextual=0.0)
    out = m(clip)
    _, _, _, static = m.segments(clip)
    dyn = ~static.reshape(-1)
    kept = out.pos[0][out.mask[0]]
    kept_dyn = kept[dyn[kept]]
    assert torch.equal(clip.x[0, kept_dyn], out.x[0][out.mask[0]][dyn[kept]])  # dominant tokens: features untouched
    # contextual=0 drops the unpicked dynamic patches
    assert int((out.assign[0][dyn] < 0).sum()) == int(dyn.sum()) - kept_dyn.numel()


def test_budget_one_is_identity():
    clip = moving_clip(b=2, t=4, grid=(4, 4), seed=1)
    assert HoliTom(budget=1.0)(clip) is clip
    assert HoliTom(budget=64)(clip) is clip
    # just below: the temporal merge of static tokens (the reference's count at r' = 1, N - R)
    m = HoliTom(budget=0.999)
    _, _, reduced, _ = m.segments(clip)
    assert torch.equal(m(clip).counts, (64 - reduced).long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    clip = moving_clip(b=2, t=8, grid=(3, 5), seed=3, dtype=dtype)
    out = HoliTom(budget=0.25)(clip)
    check_invariants(clip, out)
    assert out.x.dtype == dtype
    assert bool(torch.isfinite(out.x[out.mask].float()).all())


def test_bad_hyper_parameters():
    for kw, word in [(dict(tau=1.5), "tau=1.5"), (dict(beta=1.2), "beta=1.2"), (dict(beta=True), "beta=True"),
                     (dict(k=0), "k=0"), (dict(k=2.0), "k=2.0"), (dict(max_window=0), "max_window=0"),
                     (dict(contextual=-0.1), "contextual=-0.1"), (dict(budget=0), "budget=0"),
                     (dict(budget=1.5), "budget=1.5")]:
        with pytest.raises(ValueError, match=word.replace("(", r"\(")):
            HoliTom(**kw)
    clip = moving_clip(b=1, t=4, grid=(4, 4))
    with pytest.raises(ValueError, match="budget=65"):
        HoliTom(budget=65)(clip)
    no_attn = clip.replace(cls_attn=None)
    with pytest.raises(ValueError, match="cls_attn"):
        HoliTom(budget=0.25, contextual=0.0)(no_attn)
    HoliTom(budget=0.25)(no_attn).validate()  # the default needs features only


def test_registered_and_needs_full_frames():
    m = vtcompress.get("holitom", budget=0.25)
    assert isinstance(m, HoliTom) and m.temporal and m.matches_reference.startswith("deviation")
    clip = moving_clip(b=1, t=4, grid=(4, 4))
    pruned = clip.select(torch.arange(0, 64, 2)[None])
    with pytest.raises(ValueError, match="holitom"):
        m(pruned)
