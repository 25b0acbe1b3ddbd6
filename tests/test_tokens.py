"""VisualTokens: construction, the two shared operations (select, merge), provenance, validation."""

from __future__ import annotations

import pytest
import torch

import vtcompress
from methods_util import check_invariants, make_tokens
from vtcompress import VisualTokens
from vtcompress.compressor import check_budget, keep_counts
from vtcompress.ops import topk_sorted


def test_from_features_starts_as_the_identity():
    x = torch.randn(2, 12, 3)
    mask = torch.tensor([[True] * 12, [True] * 7 + [False] * 5])
    t = VisualTokens.from_features(x, (3, 4), mask=mask)
    assert t.grid == (3, 4) and t.layout == (3, 4) and t.num_patches == 12
    assert torch.equal(t.pos, torch.arange(12).expand(2, 12))
    assert t.counts.tolist() == [12, 7]
    assert t.assign[1].tolist() == list(range(7)) + [-1] * 5
    assert t.size.tolist() == mask.float().tolist()
    assert VisualTokens.from_features(torch.randn(1, 16, 2)).grid == (4, 4)
    with pytest.raises(ValueError, match="15 tokens do not form a square grid"):
        VisualTokens.from_features(torch.randn(1, 15, 2))
    with pytest.raises(ValueError, match=r"shape \[B, N, D\]; got \(4, 2\)"):
        VisualTokens.from_features(torch.randn(4, 2))


def test_select_gathers_every_field_and_remaps_provenance():
    t = make_tokens(b=2, grid=(3, 4), d=4, seed=1)
    idx = torch.tensor([[1, 5, 9], [0, 2, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = t.select(idx, valid)
    assert out.layout is None
    assert out.mask.tolist() == valid.tolist()
    for b in range(2):
        for k in range(int(valid[b].sum())):
            i = int(idx[b, k])
            assert torch.equal(out.x[b, k], t.x[b, i])
            assert torch.equal(out.keys[b, k], t.keys[b, i])
            assert out.cls_attn[b, k] == t.cls_attn[b, i]
            assert out.pos[b, k] == i and out.assign[b, i] == k
    assert out.size[1].tolist() == [1.0, 1.0, 0.0]  # a padded pick carries no patches
    assert (out.assign[0] >= 0).sum() == 3 and (out.assign[1] >= 0).sum() == 2
    check_invariants(t, out)
    # selecting everything in order keeps the grid layout
    assert t.select(torch.arange(12).expand(2, 12)).layout == (3, 4)


def test_merge_is_a_size_weighted_mean_with_summed_mass():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    t = VisualTokens.from_features(x, (2, 3), cls_attn=torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.2, 0.1]]))
    t = t.replace(size=torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0, 3.0]]))
    dest = torch.tensor([[0, 0, 1, -1, 1, 2]])
    anchor = torch.tensor([[1, 2, 5]])
    out = t.merge(dest, anchor)
    torch.testing.assert_close(out.x[0, 0], (1 * x[0, 0] + 2 * x[0, 1]) / 3)
    torch.testing.assert_close(out.x[0, 1], (x[0, 2] + x[0, 4]) / 2)
    torch.testing.assert_close(out.x[0, 2], x[0, 5])
    assert out.size[0].tolist() == [3.0, 2.0, 3.0]
    torch.testing.assert_close(out.cls_attn[0], torch.tensor([0.3, 0.5, 0.1]))
    assert out.pos[0].tolist() == [1, 2, 5]
    assert out.assign[0].tolist() == [0, 0, 1, -1, 1, 2]
    # an extra weight multiplies the size
    w = torch.tensor([[1.0, 0.5, 1.0, 1.0, 3.0, 1.0]])
    out_w = t.merge(dest, anchor, weight=w)
    torch.testing.assert_close(out_w.x[0, 1], (x[0, 2] + 3 * x[0, 4]) / 4)
    torch.testing.assert_close(out_w.x[0, 0], (x[0, 0] + x[0, 1]) / 2)


def test_unmerge_and_composition_follow_every_patch():
    t = make_tokens(b=2, grid=(4, 4), counts=[16, 11], seed=2)
    pruned = vtcompress.get("fastervlm", budget=10)(t)
    merged = vtcompress.get("tome", budget=4)(pruned)
    check_invariants(t, merged)
    # each patch's token, read back through unmerge, is the one assign names
    ids = torch.arange(merged.num_tokens, dtype=torch.float32)[None, :, None].expand(2, -1, 1)
    back = merged.unmerge(ids)[..., 0]
    assert torch.equal(back[merged.assign >= 0], merged.assign[merged.assign >= 0].float())
    assert bool((back[merged.assign < 0] == 0).all())
    # patches dropped by the first method stay dropped; sizes count the 10 kept patches per row
    assert merged.size.sum(1).tolist() == [10.0, 10.0]


def test_sort_by_pos_and_row():
    t = make_tokens(b=2, grid=(3, 3), counts=[9, 6], seed=3)
    perm = torch.tensor([[4, 0, 8, 1, 2, 3, 5, 6, 7], [5, 1, 0, 6, 7, 8, 2, 3, 4]])
    shuffled = t.select(perm, t.mask.gather(1, perm))
    back = shuffled.sort_by_pos()
    assert torch.equal(back.pos[back.mask], t.pos[t.mask])
    assert torch.equal(back.x[back.mask], t.x[t.mask])
    check_invariants(t, back)
    one = t.row(1)
    assert one.batch_size == 1 and one.num_tokens == 6 and bool(one.mask.all())
    assert torch.equal(one.x[0], t.x[1, :6]) and one.assign[0].tolist() == list(range(6)) + [-1] * 3


def test_to_changes_floating_fields_only():
    t = make_tokens(b=1, seed=4).to(torch.bfloat16)
    assert t.x.dtype == t.keys.dtype == t.cls_attn.dtype == torch.bfloat16
    assert t.pos.dtype == t.assign.dtype == torch.long and t.mask.dtype == torch.bool


def test_validate_names_the_bad_value():
    t = make_tokens(b=2, grid=(3, 3), seed=5)
    cases = [
        (dict(mask=torch.ones(2, 8, dtype=torch.bool)), r"mask must have shape \[B, N\] = \(2, 9\); got \(2, 8\)"),
        (dict(pos=t.pos.int()), "pos must have dtype torch.int64; got torch.int32"),
        (dict(assign=t.assign[:, :5]), r"assign must have shape \[B, N0\] = \(2, 9\)"),
        (dict(layout=(2, 2)), r"layout \(2, 2\) does not match N=9"),
        (dict(cls_attn=torch.ones(2, 3)), r"cls_attn must have shape \[B, N\] = \(2, 9\); got \(2, 3\)"),
        (dict(keys=torch.ones(1, 9, 2)), r"keys must have shape \[B, N, Dk\]"),
        (dict(x=t.x.masked_fill(torch.eye(9, 8, dtype=torch.bool)[None], float("inf"))), "NaN/inf"),
        (dict(x=t.x.long()), "floating point"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            t.replace(**change).validate()


def test_budget_language():
    counts = torch.tensor([36, 10, 1])
    assert keep_counts(12, counts, 36).tolist() == [12, 10, 1]
    assert keep_counts(0.25, counts, 36).tolist() == [9, 2, 1]  # round(), at least one
    assert keep_counts(1.0, counts, 36).tolist() == [36, 10, 1]
    for bad in (0, -1, 0.0, 1.01, float("inf"), None, "1"):
        with pytest.raises(ValueError, match="budget"):
            check_budget(bad)
    with pytest.raises(ValueError, match="budget=37 tokens is out of range: the images have N=36"):
        keep_counts(37, counts, 36)


def test_topk_sorted_matches_a_naive_reference():
    g = torch.Generator().manual_seed(6)
    scores = torch.randint(0, 5, (4, 20), generator=g).float()  # many ties
    mask = torch.arange(20)[None] < torch.tensor([20, 13, 5, 1])[:, None]
    k = torch.tensor([7, 13, 9, 3])
    idx, valid = topk_sorted(scores, k, mask)
    for b in range(4):
        n = int(mask[b].sum())
        kk = min(int(k[b]), n)
        ref = sorted(sorted(range(n), key=lambda i: (-scores[b, i].item(), i))[:kk])
        assert idx[b, valid[b]].tolist() == ref
