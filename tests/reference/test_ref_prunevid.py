"""Reference parity: PruneVid (Visual-AI/PruneVid) vs :class:`vtcompress.methods.temporal.PruneVid`.

The reference functions below are re-typed from reading the authors' code, github Visual-AI/PruneVid commit
b12600c6176c606ee4b6b7d9e26f4aa46d0dfd42, ``models/pllava/modeling_pllava.py`` (the same code is in ModelTC/llmc
``llmc/compression/token_reduction/prunevid.py``), in their conventions (a batch of ONE video, ``[B, N, C]``
tensors, Python loops). They run on the same inputs as ours and the tests assert the same merged groups of tokens
(every output token stands for the same set of input tokens), the same counts and the same features (1e-6, fp32).

Instrumentation added to ``ref_merge_frames_dynamic`` (marked ``# instrumentation``): it also returns, for every
output token, the input tokens it stands for, and the static count of each window, so that merges can be compared
(the reference returns features only). Two documented changes: ``k`` is clamped to the group's size
(``min(k, n)``) and the cluster count to at least 1 where the reference's ``topk`` / ``argmin`` would raise
(fewer frames than ``k = 7``; ``int(n * ratio) == 0``), and the reference's
hard-coded 14 and 7 are parameters (``min_tokens``, ``k``) so that small test grids exercise the clustering.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import einsum

from vtcompress import VisualTokens
from vtcompress.methods.temporal import PruneVid, dpc_knn, refine_runs

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ re-typed references
def ref_index_points(points, idx):
    """``index_points``: ``points [B, N, C]`` gathered by ``idx [B, S]`` -> ``[B, S, C]``."""
    b = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(b, dtype=torch.long).view(view_shape).repeat(repeat_shape)
    return points[batch_indices, idx, :]


def ref_cluster_dpc_knn(x, cluster_num, k=5, token_mask=None):
    """``cluster_dpc_knn``: DPC-KNN cluster index of each token of ``x [B, N, C]`` (with the 1e-6 density noise)."""
    with torch.no_grad():
        b, n, c = x.shape
        dist_matrix = torch.cdist(x.float(), x.float()) / (c**0.5)
        if token_mask is not None:
            token_mask = token_mask > 0
            dist_matrix = dist_matrix * token_mask[:, None, :] + (dist_matrix.max() + 1) * (~token_mask[:, None, :])
        dist_nearest, index_nearest = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
        density = (-(dist_nearest**2).mean(dim=-1)).exp()
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
        if token_mask is not None:
            density = density * token_mask
        mask = density[:, None, :] > density[:, :, None]
        mask = mask.type(x.dtype)
        dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
        dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
        score = dist * density
        _, index_down = torch.topk(score, k=cluster_num, dim=-1)
        dist_matrix = ref_index_points(dist_matrix, index_down)
        idx_cluster = dist_matrix.argmin(dim=1)
        idx_batch = torch.arange(b)[:, None].expand(b, cluster_num)
        idx_tmp = torch.arange(cluster_num)[None, :].expand(b, cluster_num)
        idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    return idx_cluster, cluster_num


def ref_segment_lengths(tensor):
    """``segment_lengths``: lengths of the runs of equal values of each row of ``tensor [B, N]``."""
    b, n = tensor.shape
    lists, most = [], 0
    for i in range(b):
        seq = tensor[i]
        change_points = torch.where(seq[1:] != seq[:-1])[0] + 1
        boundaries = torch.cat([torch.tensor([0]), change_points, torch.tensor([n])])
        lengths = boundaries[1:] - boundaries[:-1]
        lists.append(lengths)
        most = max(most, lengths.numel())
    result = torch.zeros((b, most), dtype=torch.long)
    for i in range(b):
        result[i, : lists[i].numel()] = lists[i]
    return result


def ref_refine_clusters(cluster_idx):
    """``refine_clusters``: keep each cluster's longest run(s) of frames, reassign the rest to neighbours."""
    b_, n = cluster_idx.shape
    refined = cluster_idx.clone()
    for b in range(b_):
        segment_info = {}
        for cluster_label in torch.unique(cluster_idx[b]):
            indices = (cluster_idx[b] == cluster_label).nonzero(as_tuple=True)[0]
            if indices.numel() == 0:
                continue
            segments = []
            start = prev = indices[0].item()
            for idx in indices[1:]:
                idx = idx.item()
                if idx == prev + 1:
                    prev = idx
                else:
                    segments.append((start, prev))
                    start = prev = idx
            segments.append((start, prev))
            segment_info[cluster_label.item()] = segments
        for segments in segment_info.values():
            max_length = 0
            for start, end in segments:
                max_length = max(max_length, end - start + 1)
            if max_length == 1:
                for start, end in segments:
                    refined[b, start : end + 1] = -1
                continue
            for start, end in segments:
                if end - start + 1 != max_length:
                    refined[b, start : end + 1] = -1
        idx = 0
        while idx < n:
            if refined[b, idx] == -1:
                start = idx
                while idx < n and refined[b, idx] == -1:
                    idx += 1
                end = idx - 1
                left_cluster_label, left_length = None, 0
                if start > 0:
                    left_label = refined[b, start - 1].item()
                    l_idx = start - 1
                    while l_idx >= 0 and refined[b, l_idx] == left_label:
                        l_idx -= 1
                    left_length = start - l_idx - 1
                    left_cluster_label = left_label
                right_cluster_label, right_length = None, 0
                if end < n - 1:
                    right_label = refined[b, end + 1].item()
                    r_idx = end + 1
                    while r_idx < n and refined[b, r_idx] == right_label:
                        r_idx += 1
                    right_length = r_idx - end - 1
                    right_cluster_label = right_label
                if left_length > right_length:
                    new_label = left_cluster_label
                elif right_length > left_length:
                    new_label = right_cluster_label
                else:
                    new_label = left_cluster_label if left_cluster_label is not None else right_cluster_label
                if new_label is None:
                    new_label = 0
                refined[b, start : end + 1] = new_label
            else:
                idx += 1
    return refined


def ref_compute_cluster_vectors(image_key_vectors, cluster_key_idx, num_cluster):
    """``PllavaForConditionalGeneration.compute_cluster_vectors``: mean feature of each cluster ``[B, K, D]``."""
    onehot = F.one_hot(cluster_key_idx, num_classes=num_cluster).to(dtype=image_key_vectors.dtype)
    sums = torch.bmm(onehot.permute(0, 2, 1), image_key_vectors)
    counts = onehot.sum(dim=1)
    nonzero = counts.clone()
    nonzero[nonzero == 0] = 1
    feats = sums / nonzero.unsqueeze(-1)
    return feats.masked_fill((counts == 0).unsqueeze(-1), 0)


def ref_spatial_merge_tokens(feature, num_cluster, k, members):
    """``spatial_merge_tokens`` (+ the members of each cluster: instrumentation)."""
    num_cluster = max(1, num_cluster)  # documented clamp: the reference raises for 0 clusters
    cluster_idx, _ = ref_cluster_dpc_knn(feature, cluster_num=num_cluster, k=min(k, feature.shape[1]))
    merged = [sorted(sum((members[j] for j in range(len(members)) if cluster_idx[0, j] == c), []))
              for c in range(num_cluster)]  # instrumentation
    return ref_compute_cluster_vectors(feature, cluster_idx, num_cluster=num_cluster), merged


def ref_merge_frames_dynamic(frames, num_frames, hw, threshold=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.25,
                             k=7, min_tokens=14):
    """``PllavaForConditionalGeneration.merge_frames_dynamic`` on ``frames [B=1, T * L, C]`` (``config.num_frames``
    = ``num_frames``, ``pooling_shape[1] * pooling_shape[2]`` = ``hw``; the reference's 14 is ``min_tokens``).

    Returns the features ``[1, M, C]`` (the reference's output), and (instrumentation) the input tokens of each
    output token, the static count of each window, and the window sizes."""
    b, l_, c = frames.shape
    assert l_ == num_frames * hw
    frames = frames.view(b, num_frames, hw, c)
    idx_clusters, _ = ref_cluster_dpc_knn(frames.mean(dim=2), cluster_num=int(num_frames * temporal_segment_ratio),
                                          k=min(k, num_frames))
    idx_clusters = ref_refine_clusters(idx_clusters)
    window_list = ref_segment_lengths(idx_clusters)
    l_ = hw
    static_features, dynamic_features, members, static_counts = [], [], [], []
    start_idx = 0
    for window_size in window_list[0]:
        window_size = int(window_size)
        current_frames = frames[:, start_idx : start_idx + window_size, :, :]
        frames_normed = F.normalize(current_frames, p=2, dim=-1)
        frames_sim = einsum("b w l c, b t l c -> b w t l", frames_normed, frames_normed)
        frames_sim = (frames_sim.sum(dim=-2) - 1).sum(dim=-2) / (window_size * (window_size - 1))
        mask = frames_sim > threshold
        mask_expand = mask.view(b, 1, l_, 1).expand(-1, window_size, -1, c)
        static_feat = torch.masked_select(current_frames, mask_expand).view(b, window_size, -1, c).mean(dim=1)
        static_loc = mask[0].nonzero()[:, 0].tolist()  # instrumentation
        static_members = [[(start_idx + w) * hw + p for w in range(window_size)] for p in static_loc]
        static_counts.append(len(static_loc))
        if static_feat.shape[1] > min_tokens:
            static_feat, static_members = ref_spatial_merge_tokens(
                static_feat, num_cluster=int(static_feat.shape[1] * cluster_ratio), k=k, members=static_members)
        static_features.append(static_feat)
        dynamic_feat = torch.masked_select(current_frames, ~mask_expand).view(b, window_size, -1, c)
        dyn_loc = (~mask[0]).nonzero()[:, 0].tolist()  # instrumentation
        dynamic_window_list, dynamic_members = [], []
        for i in range(window_size):
            dynamic_feat_window = dynamic_feat[:, i, :, :]
            frame_members = [[(start_idx + i) * hw + p] for p in dyn_loc]
            if dynamic_feat_window.shape[1] > min_tokens:
                dynamic_feat_window, frame_members = ref_spatial_merge_tokens(
                    dynamic_feat_window, num_cluster=int(dynamic_feat_window.shape[1] * cluster_ratio), k=k,
                    members=frame_members)
            dynamic_window_list.append(dynamic_feat_window)
            dynamic_members += frame_members
        dynamic_features.append(torch.cat(dynamic_window_list, dim=1))
        members += static_members + dynamic_members
        start_idx += window_size
    final = []
    for static_feature, dynamic_feature in zip(static_features, dynamic_features, strict=True):
        final += [static_feature, dynamic_feature]
    return torch.cat(final, dim=1), members, static_counts, window_list[0].tolist()


# ------------------------------------------------------------------------------------------ helpers
def make_clip(b=1, t=8, grid=(4, 4), d=16, seed=0, scenes=2, moving=3, noise=0.05):
    """``b`` clips of ``t`` frames: ``scenes`` scenes (each its own background), every frame its scene's background
    plus small noise, and per clip ``moving`` grid positions whose content changes every frame (dynamic)."""
    g = torch.Generator().manual_seed(seed)
    hw = grid[0] * grid[1]
    scene = torch.arange(t) * scenes // t
    bg = torch.randn(b, scenes, hw, d, generator=g)
    x = bg[:, scene] + noise * torch.randn(b, t, hw, d, generator=g)
    for row in range(b):
        where = torch.randperm(hw, generator=g)[:moving]
        x[row, :, where] = torch.randn(t, moving, d, generator=g)
    return VisualTokens.from_features(x.reshape(b, t * hw, d), grid, frames=t)


def groups_of(out, row=0):
    """The input tokens of each output token of ``row``, as sorted lists, in output order."""
    a = out.assign[row]
    return [sorted((a == o).nonzero()[:, 0].tolist()) for o in range(int(out.counts[row]))]


def run_ref(clip, method, ratio=None, seed=0):
    torch.manual_seed(seed)
    t, hw = clip.frames, clip.frame_patches
    return ref_merge_frames_dynamic(clip.x.float(), t, hw, method.tau, method.ratio(t * hw) if ratio is None
                                    else ratio, method.temporal_segment_ratio, method.k, method.cluster_min)


def assert_parity(clip, method):
    """Our output == the reference's: same groups of input tokens, same features (1e-6), same count."""
    feats, members, _, _ = run_ref(clip, method)
    again = run_ref(clip, method, seed=1)[1]
    assert sorted(members) == sorted(again), "test data too close to a tie: the reference's noise decides"
    out = method(clip)
    out.validate()
    ours = groups_of(out)
    assert sorted(ours) == sorted(members)
    where = {tuple(m): i for i, m in enumerate(ours)}
    order = torch.tensor([where[tuple(m)] for m in members])
    torch.testing.assert_close(out.x[0, order], feats[0].to(out.x.dtype), rtol=0, atol=1e-6)
    return out, members


def check_conserved(clip, out):
    out.validate()
    for b in range(out.batch_size):
        n = int(out.counts[b])
        a = out.assign[b]
        assert bool((a >= 0).all())  # PruneVid merges, drops nothing
        assert torch.equal(torch.bincount(a, minlength=n)[:n].to(out.size.dtype), out.size[b, :n])
        assert float(out.size[b, :n].sum()) == clip.num_patches
        assert torch.equal(a[out.pos[b, :n]], torch.arange(n))  # each token's anchor patch is its own


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("t,grid,seed", [(8, (4, 4), 0), (8, (3, 5), 1), (4, (4, 4), 2), (4, (3, 5), 3),
                                         (8, (6, 6), 4)])
@pytest.mark.parametrize("cluster_min", [14, 4, 1])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_merges_and_features_match_the_reference(t, grid, seed, cluster_min, budget):
    clip = make_clip(t=t, grid=grid, seed=seed, moving=3 + seed % 3, scenes=2 if t == 8 else 1)
    method = PruneVid(budget=budget, cluster_min=cluster_min)
    out, members = assert_parity(clip, method)
    if cluster_min < 3:  # something merged in space as well as over time
        assert max(map(len, members)) > t and sum(len(m) == 1 for m in members) < len(members)
    check_conserved(clip, out)


@pytest.mark.parametrize("seg_ratio,tau", [(0.5, 0.8), (0.75, 0.9), (1.0, 0.5), (0.25, 0.99)])
def test_parity_over_scene_and_static_knobs(seg_ratio, tau):
    for seed in range(3):
        clip = make_clip(t=8, grid=(4, 4), seed=10 + seed, scenes=3, moving=2 + seed)
        assert_parity(clip, PruneVid(budget=0.5, tau=tau, temporal_segment_ratio=seg_ratio, cluster_min=3))


def test_parity_with_the_reference_defaults_on_a_larger_grid():
    """The reference's own knobs (tau 0.8, segment ratio 0.25, cluster ratio 0.5, k 7, 14) on 16 frames of 6 x 6:
    both static and dynamic groups are large enough to cluster."""
    clip = make_clip(t=16, grid=(6, 6), seed=7, scenes=3, moving=16, d=24)
    out, members = assert_parity(clip, PruneVid())
    _, _, static_counts, windows = run_ref(clip, PruneVid())
    assert any(s > 14 for s in static_counts) and any(36 - s > 14 for s in static_counts) and len(windows) >= 2


def test_an_int_budget_is_the_fraction_of_the_clip():
    clip = make_clip(t=8, grid=(4, 4), seed=5, moving=1)
    n = clip.num_patches
    by_int = PruneVid(budget=n // 4, cluster_min=4)
    assert by_int.ratio(n) == 0.25
    out, _ = assert_parity(clip, by_int)
    frac = PruneVid(budget=0.25, cluster_min=4)(clip)
    for f in ("x", "pos", "size", "assign", "mask"):
        assert torch.equal(getattr(out, f), getattr(frac, f)), f
    with pytest.raises(ValueError, match=f"budget={n + 1}"):
        PruneVid(budget=n + 1)(clip)


def test_segments_match_the_reference_segmentation():
    for seed in range(6):
        clip = make_clip(t=8, grid=(3, 5), seed=20 + seed, scenes=1 + seed % 4)
        for ratio in (0.25, 0.5, 1.0):
            m = PruneVid(temporal_segment_ratio=ratio)
            torch.manual_seed(0)
            means = clip.x.view(1, 8, 15, -1).mean(2)
            ref = ref_segment_lengths(ref_refine_clusters(ref_cluster_dpc_knn(means, int(8 * ratio), k=7)[0]))[0]
            seg = m.segments(clip)[0]
            assert torch.equal(torch.bincount(seg), ref)


def test_refine_runs_matches_refine_clusters():
    """Random label sequences (incl. all-singleton clusters, several maximal runs of one label, T = 1)."""
    g = torch.Generator().manual_seed(0)
    for t in (1, 2, 3, 5, 8, 12):
        for labels_n in (1, 2, 3, 5):
            labels = torch.randint(0, labels_n, (64, t), generator=g)
            assert torch.equal(refine_runs(labels), ref_refine_clusters(labels)), (t, labels_n)
    tricky = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 1, 0, 0, 1], [0, 1, 1, 2, 0, 0], [2, 0, 2, 1, 1, 0]])
    assert torch.equal(refine_runs(tricky), ref_refine_clusters(tricky))


def test_dpc_knn_matches_the_reference_on_masked_groups():
    """Each group's valid tokens clustered at once == the reference on those tokens alone (labels and centres)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 20, 8, generator=g)
    valid = torch.rand(6, 20, generator=g) > 0.3
    valid[:, :8] = True
    count = valid.sum(1)
    num = (count * 0.4).long().clamp(min=1)
    label, centers, ok = dpc_knn(x, valid, num, 7)
    for i in range(6):
        sub = x[i][valid[i]][None]
        torch.manual_seed(0)
        ref = ref_cluster_dpc_knn(sub, int(num[i]), k=7)[0][0]
        assert torch.equal(label[i][valid[i]], ref)
        idx = valid[i].nonzero()[:, 0]
        assert torch.equal(label[i, centers[i, ok[i]]], torch.arange(int(num[i])))
        assert bool(valid[i, centers[i, ok[i]]].all()) and set(centers[i, ok[i]].tolist()) <= set(idx.tolist())


def test_density_ties_are_broken_by_index():
    """Exact duplicates tie in density: the reference's noise picks one at random, ours the lower index, so two
    copies of one point never become two centres while a distinct point is left without one."""
    base = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    x = base[:, [0, 0, 1, 1, 2, 2]]  # three points, each twice
    label, centers, _ = dpc_knn(x, torch.ones(1, 6, dtype=torch.bool), torch.tensor([3]), 2)
    assert sorted((label[0, ::2] == label[0, 1::2]).tolist()) == [True] * 3
    assert len(set(label[0].tolist())) == 3
    again = dpc_knn(x, torch.ones(1, 6, dtype=torch.bool), torch.tensor([3]), 2)
    assert torch.equal(again[0], label) and torch.equal(again[1], centers)


# ------------------------------------------------------------------------------------------ behaviour
def expected_count(method, clip, row=0):
    """The docstring's count, from the reference's windows and static counts."""
    _, _, static_counts, windows = run_ref(clip.row(row), method)
    hw = clip.frame_patches
    r = method.ratio(clip.num_patches)

    def f(n):
        return n if n <= method.cluster_min else max(1, int(n * r))
    return sum(f(s) + w * f(hw - s) for s, w in zip(static_counts, windows, strict=True))


@pytest.mark.parametrize("cluster_min", [14, 3])
def test_counts_as_documented(cluster_min):
    clip = make_clip(b=3, t=8, grid=(4, 4), seed=9, moving=4)
    for budget in (0.5, 0.3, 0.1, 40):
        m = PruneVid(budget=budget, cluster_min=cluster_min)
        out = m(clip)
        check_conserved(clip, out)
        assert out.counts.tolist() == [expected_count(m, clip, b) for b in range(3)]
        assert bool((out.counts < clip.counts).all())  # static tokens merge over time


def test_anchors_are_the_centre_in_the_first_frame_of_the_merge():
    clip = make_clip(b=2, t=8, grid=(4, 4), seed=11, moving=5)
    out = PruneVid(budget=0.5, cluster_min=2)(clip)
    for b in range(2):
        for o, members in enumerate(groups_of(out, b)):
            p = int(out.pos[b, o])
            assert p in members and p // 16 == min(members) // 16


def test_batch_equals_one_by_one():
    parts = [make_clip(t=8, grid=(4, 4), seed=s, moving=m, scenes=sc) for s, m, sc in ((0, 3, 2), (1, 0, 1),
                                                                                        (2, 16, 3), (3, 6, 2))]
    clip = VisualTokens.cat_rows(parts)
    for kw in (dict(budget=0.5), dict(budget=0.25, cluster_min=3), dict(budget=0.4, temporal_segment_ratio=0.5)):
        out = PruneVid(**kw)(clip)
        out.validate()
        for b, part in enumerate(parts):
            alone = PruneVid(**kw)(part)
            got = out.row(b)
            assert torch.equal(got.pos, alone.pos) and torch.equal(got.size, alone.size), (kw, b)
            assert torch.equal(out.assign[b], alone.assign[0]), (kw, b)
            torch.testing.assert_close(got.x, alone.x, rtol=0, atol=1e-6)


def test_budget_one_returns_the_input():
    clip = make_clip(b=2, t=4, grid=(3, 5))
    assert PruneVid(budget=1.0)(clip) is clip
    assert PruneVid(budget=clip.num_patches)(clip) is clip
    assert bool((PruneVid(budget=0.999)(clip).counts < clip.counts).all())  # static tokens still merge


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_takes_the_float32_decisions(dtype):
    """Decisions are computed in float32: a bf16 / fp16 clip merges as its float32 copy, features to rounding."""
    clip = make_clip(b=2, t=8, grid=(4, 4), seed=4).to(dtype)
    m = PruneVid(budget=0.5, cluster_min=4)
    out, ref = m(clip), m(clip.to(torch.float32))
    check_conserved(clip, out)
    assert out.x.dtype == dtype
    assert torch.equal(out.assign, ref.assign) and torch.equal(out.pos, ref.pos)
    torch.testing.assert_close(out.x.float(), ref.x, rtol=0, atol=2e-2)


def test_the_shared_temporal_clip_is_compressed_in_each_dtype():
    """The family test's clip (tests/test_temporal.py ``_clip``: 4 frames of 4 x 4, 2 moving tokens)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 8, generator=g).expand(2, 4, 16, 8) + 0.01 * torch.randn(2, 4, 16, 8, generator=g)
    clip = VisualTokens.from_features(x.reshape(2, 64, 8).clone(), (4, 4), frames=4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = PruneVid(budget=0.25)(clip.to(dtype))
        out.validate()
        assert out.x.dtype == dtype and bool((out.counts < clip.counts).all())


def test_one_frame_is_clustered_in_space():
    clip = make_clip(b=1, t=1, grid=(4, 4), seed=0)
    out = PruneVid(budget=0.5)(clip)  # one segment of one frame: nothing static, 16 dynamic tokens > 14
    check_conserved(clip, out)
    assert int(out.counts[0]) == 8


def test_needs_the_full_grid():
    clip = make_clip(t=4)
    pruned = clip.select(torch.arange(0, clip.num_tokens, 2)[None])
    with pytest.raises(ValueError, match="full grid"):
        PruneVid(budget=0.5)(pruned)


@pytest.mark.parametrize("kw,bad", [
    (dict(tau=1.5), "tau=1.5"), (dict(tau=math.nan), "tau=nan"), (dict(tau="0.8"), "tau='0.8'"),
    (dict(temporal_segment_ratio=0.0), "temporal_segment_ratio=0.0"),
    (dict(temporal_segment_ratio=1.5), "temporal_segment_ratio=1.5"),
    (dict(k=0), "k=0"), (dict(k=2.0), "k=2.0"), (dict(k=True), "k=True"),
    (dict(cluster_min=-1), "cluster_min=-1"), (dict(cluster_min=3.5), "cluster_min=3.5"),
    (dict(budget=0), "budget=0"), (dict(budget=1.5), "budget=1.5"),
])
def test_bad_hyper_parameters_raise(kw, bad):
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(".", r"\.")):
        PruneVid(**kw)
