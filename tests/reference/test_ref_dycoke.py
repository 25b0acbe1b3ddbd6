"""Reference parity: DyCoke's temporal token merging (TTM) stage vs :class:`vtcompress.methods.temporal.DyCoke`.

The reference below is re-typed from reading the authors' code: github KD-TAO/DyCoke, ``llava/model/llava_arch.py``,
``dycole_ttm`` (HEAD dd74634; the function as last changed by 35cc532 "Update ttm code", which made an odd frame use
its own pair's similarity, ``similarities[i // 2]``, instead of ``similarities[(i - 2) // 2]``; ModelTC/llmc
``llmc/compression/token_reduction/dycoke.py`` has the same fixed version). It runs on the same clips as ours
(a static background plus small noise, with a few moving tokens per frame) and the tests assert the same kept
tokens and features.

Documented deviations: the reference lists a pruned frame's kept tokens in ascending-similarity (``topk``) order,
ours keep raster order (the set and the features are identical: compared after sorting the reference's source
indices); for ``T <= 4`` the reference raises (``torch.stack`` of an empty list) where ours keeps frame 2 whole,
which is the reference with that empty stack skipped (``empty_ok``).
"""

import pytest
import torch
import torch.nn.functional as F

import vtcompress
from methods_util import check_invariants
from vtcompress import VisualTokens
from vtcompress.methods.temporal import DyCoke

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ re-typed reference
def ref_dycole_ttm(image_feature, num_tokens_per_frame=196, merging_ratio=0.7, empty_ok=False):
    """KD-TAO/DyCoke, llava/model/llava_arch.py, ``dycole_ttm`` on one clip ``image_feature [T * P, D]``.

    Returns the reference's output ``[K, D]`` and, for the comparison, the source index (in the clip) of each
    output row (tracked alongside; the reference returns features only). ``empty_ok`` skips the ``torch.stack`` of
    an empty list (``T <= 4``), where the reference raises."""
    p = num_tokens_per_frame
    num_frames = image_feature.shape[0] // p
    merging_ratio = 1 - merging_ratio

    def frame(i):
        return image_feature[i * p: (i + 1) * p]

    def src(i):
        return torch.arange(i * p, (i + 1) * p)

    similarities = []
    for i in range(0, num_frames - 1, 2):
        f1 = F.normalize(frame(i), p=2, dim=1)
        f2 = F.normalize(frame(i + 1), p=2, dim=1)
        similarities.append(F.cosine_similarity(f1, f2, dim=1))
    similarities = torch.stack([s.clone() for s in similarities])

    out, source = [], []
    for i in range(0, num_frames - 1, 2):
        avg_similarity = similarities[i // 2]
        num_keep = int(merging_ratio * p)
        keep = avg_similarity.topk(num_keep, largest=False).indices
        out.append(frame(i))
        source.append(src(i))
        out.append(frame(i + 1)[keep])
        source.append(src(i + 1)[keep])

    odd_similarities = []
    for i in range(0, num_frames - 4, 4):
        odd_similarities.append(F.cosine_similarity(frame(i), frame(i + 2), dim=1))
    if odd_similarities or not empty_ok:
        odd_similarities = torch.stack([s.clone() for s in odd_similarities])

    for i in range(0, num_frames - 4, 4):
        avg_similarity = odd_similarities[i // 4]
        num_keep = int(merging_ratio * p)
        keep = avg_similarity.topk(num_keep, largest=False).indices
        out[i], source[i] = frame(i), src(i)
        out[i + 2], source[i + 2] = frame(i + 2)[keep], src(i + 2)[keep]

    return torch.cat(out, dim=0), torch.cat(source)


# ------------------------------------------------------------------------------------------ clips
def moving_clip(b=2, t=8, grid=(4, 4), d=16, seed=0, moving=3, dtype=torch.float32, persistent_bg=True):
    """``[B, T * H * W, D]`` clips: each row a static background (the same for every frame, small noise per frame),
    ``moving`` positions of every frame ``>= 1`` replaced by fresh content. Returns the tokens and the moving
    positions ``[B, T, moving]`` (frame 0 has none: -1)."""
    g = torch.Generator().manual_seed(seed)
    hw = grid[0] * grid[1]
    bg = torch.randn(b, 1, hw, d, generator=g)
    x = (bg.expand(b, t, hw, d) + 0.01 * torch.randn(b, t, hw, d, generator=g)).clone()
    where = torch.full((b, t, moving), -1, dtype=torch.long)
    for f in range(1, t):
        idx = torch.rand(b, hw, generator=g).argsort(dim=1)[:, :moving]  # distinct positions
        where[:, f] = idx
        x[torch.arange(b)[:, None], f, idx] = torch.randn(b, moving, d, generator=g)
    return VisualTokens.from_features(x.reshape(b, t * hw, d).to(dtype), grid, frames=t), where


def assert_matches_reference(out, clip, p, k, empty_ok=False):
    for r in range(clip.batch_size):
        ref_x, ref_src = ref_dycole_ttm(clip.x[r], p, k, empty_ok=empty_ok)
        order = ref_src.argsort()
        c = int(out.counts[r])
        assert c == ref_src.numel()
        assert torch.equal(out.pos[r, :c], ref_src[order])
        torch.testing.assert_close(out.x[r, :c], ref_x[order], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("t", [5, 6, 8, 9, 12])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("k", [0.7, 0.5, 0.3])
def test_same_tokens_as_the_reference(seed, t, grid, k):
    clip, _ = moving_clip(b=2, t=t, grid=grid, seed=seed, moving=4)
    out = DyCoke(merging_ratio=k)(clip)
    check_invariants(clip, out)
    assert_matches_reference(out, clip, grid[0] * grid[1], k)


@pytest.mark.parametrize("t", [2, 3, 4])
def test_short_clips_where_the_reference_raises(t):
    clip, _ = moving_clip(b=2, t=t, grid=(3, 5), seed=t, moving=4)
    if t in (3, 4):  # range(0, T - 4, 4) is empty: torch.stack([]) raises in the reference
        with pytest.raises(RuntimeError):
            ref_dycole_ttm(clip.x[0], 15, 0.7)
    out = DyCoke(merging_ratio=0.7)(clip)
    check_invariants(clip, out)
    assert_matches_reference(out, clip, 15, 0.7, empty_ok=True)
    if t == 4:
        per = torch.bincount(out.frame_of()[0], minlength=4).tolist()
        assert per == [15, int(0.3 * 15), 15, int(0.3 * 15)]  # frame 2 kept whole


@pytest.mark.parametrize("t", [4, 8])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("budget", [0.25, 0.4, 0.5, 0.8, 30])
def test_budget_maps_onto_the_reference_ratio(t, grid, budget):
    """A budget sets ``q`` kept per pruned frame; the reference at a ratio giving that ``q`` keeps the same."""
    p = grid[0] * grid[1]
    clip, _ = moving_clip(b=2, t=t, grid=grid, seed=7, moving=5)
    method = DyCoke(budget=budget)
    q = method.per_frame(t, p)
    k = 1 - (q + 0.5) / p
    assert int((1 - k) * p) == q
    out = method(clip)
    check_invariants(clip, out)
    assert_matches_reference(out, clip, p, k, empty_ok=True)


def test_pruned_frames_keep_what_moved():
    """Behaviour: a pruned frame keeps the positions that differ from the frame it is compared with."""
    t, grid, m = 8, (4, 4), 2
    clip, where = moving_clip(b=3, t=t, grid=grid, seed=3, moving=m)
    out = DyCoke(merging_ratio=1 - 2 * m / 16 - 1e-3)(clip)  # q = 2m: room for both frames' moving tokens
    assert DyCoke(merging_ratio=1 - 2 * m / 16 - 1e-3).per_frame(t, 16) == 2 * m
    fr = out.frame_of()
    for r in range(3):
        for f, against in ((1, 0), (2, 0), (3, 2), (5, 4), (7, 6)):
            kept = set((out.pos[r][out.mask[r] & (fr[r] == f)] - f * 16).tolist())
            moved = set(where[r, f].tolist()) | (set(where[r, against].tolist()) - {-1})
            assert moved <= kept, (r, f)
        assert int((fr[r] == 6).sum()) == 16 and int((fr[r] == 0).sum()) == 16  # reference: last window's frame 2


# ------------------------------------------------------------------------------------------ the option
def paper_rule(x, t, p, q):
    """The paper's description, frame by frame: windows of 4, frames 1 and 3 of a window against the frame before,
    frame 2 against the window's first, every window (an odd clip's last frame too). ``x [T * P, D]`` -> kept
    clip indices, ascending."""
    keep = []
    for f in range(t):
        j = f % 4
        if j == 0:
            keep.append(torch.arange(f * p, (f + 1) * p))
            continue
        other = f - 1 if j in (1, 3) else f - 2
        a, b = x[other * p: (other + 1) * p], x[f * p: (f + 1) * p]
        sim = F.cosine_similarity(F.normalize(a, dim=1), F.normalize(b, dim=1), dim=1) if j != 2 else \
            F.cosine_similarity(a, b, dim=1)
        keep.append(f * p + sim.topk(q, largest=False).indices.sort().values)
    return torch.cat(keep)


@pytest.mark.parametrize("t", [4, 5, 6, 7, 8])
def test_full_windows_follow_the_paper(t):
    clip, _ = moving_clip(b=2, t=t, grid=(3, 5), seed=11, moving=4)
    full = DyCoke(merging_ratio=0.6, windows="full")(clip)
    check_invariants(clip, full)
    q = int((1 - 0.6) * 15)
    for r in range(2):
        assert torch.equal(full.pos[r, : int(full.counts[r])], paper_rule(clip.x[r], t, 15, q))
    ref = DyCoke(merging_ratio=0.6)(clip)
    same = t == 6  # T % 4 == 2: the reference's loops prune every window and drop nothing
    assert (full.pos.shape == ref.pos.shape and torch.equal(full.pos, ref.pos)) == same


# ------------------------------------------------------------------------------------------ batch, counts, dtypes
def test_batch_equals_one_by_one():
    clip, _ = moving_clip(b=4, t=8, grid=(3, 5), seed=5, moving=3)
    rows = [clip.row(0), clip.row(1).replace(x=clip.row(1).x * 3.0 + 1.0), clip.row(2), clip.row(3)]
    batch = VisualTokens.cat_rows(rows)
    for method in (DyCoke(budget=0.4), DyCoke(merging_ratio=0.7), DyCoke(budget=0.6, windows="full")):
        out = method(batch)
        for r in range(4):
            alone = method(rows[r])
            assert torch.equal(out.row(r).pos, alone.pos) and torch.equal(out.row(r).x, alone.x)
            assert torch.equal(out.assign[r], alone.assign[0])


@pytest.mark.parametrize("windows", ["reference", "full"])
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 0.75, 1.0, 7, 40])
def test_kept_counts_as_documented(windows, t, budget):
    grid = (3, 5)
    p = 15
    clip, _ = moving_clip(b=2, t=t, grid=grid, seed=t, moving=3)
    method = DyCoke(budget=budget, windows=windows)
    out = method(clip)
    check_invariants(clip, out)
    whole, odd, third, dropped = method.roles(t)
    assert sorted(whole + odd + third + dropped) == list(range(t))
    n = t * p
    target = min(budget, n) if isinstance(budget, int) else round(budget * n)
    if target >= n or t == 1:
        assert torch.equal(out.x, clip.x) and torch.equal(out.assign, clip.assign)
        return
    q = method.per_frame(t, p)
    assert out.counts.tolist() == [len(whole) * p + (len(odd) + len(third)) * q] * 2 == [method.kept(t, p)] * 2
    if len(whole) * p <= target:  # the largest count the pattern allows within the target
        assert method.kept(t, p) <= target < method.kept(t, p) + len(odd) + len(third) or q == p
    else:
        assert q == 0 and method.kept(t, p) == len(whole) * p
    per = torch.bincount(out.frame_of()[0], minlength=t)
    for f in range(t):
        assert int(per[f]) == (p if f in whole else 0 if f in dropped else q)
    # pruning: the kept tokens stand for themselves; the dropped patches are gone
    assert torch.equal(out.size[out.mask], torch.ones(int(out.counts.sum())))
    assert torch.equal((out.assign >= 0).sum(1), out.counts)


def test_merging_ratio_zero_and_budget_one():
    even, _ = moving_clip(b=2, t=8, grid=(4, 4), seed=1)
    for method in (DyCoke(budget=1.0), DyCoke(merging_ratio=0.0), DyCoke(budget=128)):
        out = method(even)
        assert out is even or (torch.equal(out.x, even.x) and torch.equal(out.assign, even.assign))
    odd, _ = moving_clip(b=2, t=5, grid=(4, 4), seed=1)
    assert DyCoke(budget=1.0)(odd) is odd  # the full budget never drops a frame
    out = DyCoke(merging_ratio=0.0)(odd)  # ratio 0: every token, but the reference drops an odd clip's last frame
    assert out.counts.tolist() == [64, 64] and bool((out.frame_of()[out.mask] < 4).all())
    assert_matches_reference(out, odd, 16, 0.0)
    assert DyCoke(merging_ratio=0.0, windows="full")(odd) is odd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    clip, _ = moving_clip(b=2, t=8, grid=(4, 4), seed=4, dtype=dtype)
    out = DyCoke(budget=0.4)(clip)
    check_invariants(clip, out)
    assert out.x.dtype == dtype and out.counts.tolist() == [DyCoke(budget=0.4).kept(8, 16)] * 2
    rows = torch.arange(2)[:, None].expand_as(out.pos)
    assert torch.equal(out.x[out.mask], clip.x[rows[out.mask], out.pos[out.mask]])  # a subset, features untouched
    if dtype == torch.float32:
        assert_matches_reference(out, clip, 16, 1 - (DyCoke(budget=0.4).per_frame(8, 16) + 0.5) / 16)


def test_bad_hyper_parameters():
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="merging_ratio="):
            DyCoke(merging_ratio=bad)
    with pytest.raises(ValueError, match="windows='paper'"):
        DyCoke(windows="paper")
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="budget"):
            DyCoke(budget=bad)
    method = DyCoke()
    with pytest.raises(ValueError, match="merging_ratio"):
        method.merging_ratio = 2.0
    assert method.merging_ratio is None


def test_registered_and_needs_full_frames():
    method = vtcompress.get("dycoke", budget=0.3)
    assert isinstance(method, DyCoke) and "dycoke" in vtcompress.list_methods(family="temporal")
    assert method.matches_reference.startswith("deviation:") and "KV-cache" in method.matches_reference
    assert "2411.15024" in method.paper
    clip, _ = moving_clip(b=2, t=4, grid=(4, 4))
    with pytest.raises(ValueError, match="full grid"):
        method(vtcompress.get("random", budget=0.5)(clip))
    image, _ = moving_clip(b=2, t=1, grid=(4, 4))
    assert method(image) is image
