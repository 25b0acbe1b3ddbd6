"""Property tests (hypothesis) over random shapes, ragged masks and budgets: the invariants of every method."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtcompress
from methods_util import GRID, MERGE, SELECT, assert_same_tokens, check_invariants, expected_counts, make_tokens
from vtcompress.ops import bipartite_soft_matching, maxmin_diversity

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
ANY_TOKENS = tuple(sorted(SELECT | MERGE))  # methods that take ragged / pruned tokens


@st.composite
def ragged_case(draw, methods=ANY_TOKENS):
    name = draw(st.sampled_from(methods))
    hh, ww = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    n = hh * ww
    b = draw(st.integers(1, 3))
    counts = [draw(st.integers(1, n)) for _ in range(b)]
    if draw(st.booleans()):
        budget = draw(st.integers(1, n))
    else:
        budget = draw(st.floats(0.01, 1.0))
    if name == "tome":
        protect = draw(st.integers(0, 2))
        budget = max(budget, protect + 1) if isinstance(budget, int) else budget
        method = vtcompress.get(name, budget=budget, protect=protect, max_r=draw(st.integers(0, 3)))
    else:
        method = vtcompress.get(name, budget=budget)
    tokens = make_tokens(b=b, grid=(hh, ww), d=draw(st.integers(1, 5)), counts=counts, seed=draw(st.integers(0, 99)),
                         spikes=min(n, draw(st.integers(0, 3))))
    return method, tokens


@SETTINGS
@given(ragged_case())
def test_methods_keep_invariants_on_ragged_batches(case):
    method, tokens = case
    out = method(tokens)
    check_invariants(tokens, out)
    assert torch.equal(out.counts, expected_counts(method, tokens))
    assert bool((out.assign[~tokens.mask] == -1).all())
    if method.name in ("tome", "visionzip") and bool((out.counts > 0).all()):
        split_ok = method.name == "tome" or bool((method.split_counts(tokens)[1] > 0).all())
        if split_ok:
            torch.testing.assert_close(out.size.sum(1), tokens.counts.float(), rtol=0, atol=1e-4)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(ragged_case())
def test_batched_equals_one_at_a_time(case):
    method, tokens = case
    shortest = int(tokens.counts.min())
    if isinstance(method.budget, int) and method.budget > shortest:
        # an int budget above a lone image's token count raises (keep_counts); in a batch that row keeps all
        fits = shortest >= getattr(method, "protect", 0) + 1
        method = dataclasses.replace(method, budget=shortest if fits else 1.0)
    out = method(tokens)
    for r in range(tokens.batch_size):
        assert_same_tokens(out.row(r), method(tokens.row(r)), atol=1e-5)


@SETTINGS
@given(st.sampled_from(sorted(GRID - {"pixel_unshuffle"})), st.integers(1, 7), st.integers(1, 7), st.data())
def test_grid_transforms_partition_the_grid(name, hh, ww, data):
    n = hh * ww
    budget = data.draw(st.one_of(st.integers(1, n), st.floats(0.01, 1.0)))
    tokens = make_tokens(b=data.draw(st.integers(1, 2)), grid=(hh, ww), d=3, seed=data.draw(st.integers(0, 99)))
    method = vtcompress.get(name, budget=budget)
    out = method(tokens)
    check_invariants(tokens, out)
    h, w = out.layout
    assert out.num_tokens == h * w == int(expected_counts(method, tokens)[0])
    assert bool((out.size.sum(1) == n).all())
    # cells are contiguous blocks: patch (r, c) goes to cell (r * h // H, c * w // W)
    rows, cols = torch.arange(n) // ww, torch.arange(n) % ww
    assert torch.equal(out.assign[0], (rows * h // hh) * w + cols * w // ww)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 8), st.integers(0, 3), st.data())
def test_bipartite_matching_plan(b, n, r, protect, data):
    counts = torch.tensor([data.draw(st.integers(1, n)) for _ in range(b)])
    mask = torch.arange(n)[None] < counts[:, None]
    metric = torch.randn(b, n, 4, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    dest, anchor = bipartite_soft_matching(metric, r, mask, protect)
    merged = torch.minimum(torch.tensor(r), (counts - protect).clamp(min=0) // 2)
    kept = counts - merged
    assert anchor.shape[1] == int(kept.max())
    for i in range(b):
        c, k = int(counts[i]), int(kept[i])
        assert bool((dest[i, c:] == -1).all())
        assert sorted(set(dest[i, :c].tolist())) == list(range(k))
        anchors = anchor[i, :k]
        assert bool((anchors[1:] > anchors[:-1]).all()) and bool((anchor[i, k:] == -1).all())
        assert torch.equal(dest[i, anchors], torch.arange(k))  # every slot keeps its own anchor
        assert dest[i, : min(protect, c)].tolist() == list(range(min(protect, c)))  # protected: alone, first
        moved = [t for t in range(c) if t not in anchors.tolist()]
        assert all(t % 2 == 0 and t >= protect for t in moved)  # only unprotected A tokens merge away
        assert all(int(anchors[dest[i, t]]) % 2 == 1 for t in moved)  # ... into B tokens


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 15), st.integers(1, 15), st.data())
def test_maxmin_diversity_picks_distinct_valid_tokens(b, n, k, data):
    counts = torch.tensor([data.draw(st.integers(1, n)) for _ in range(b)])
    mask = torch.arange(n)[None] < counts[:, None]
    metric = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    idx, valid = maxmin_diversity(metric, k, mask)
    for i in range(b):
        picks = idx[i, valid[i]].tolist()
        assert len(picks) == min(k, int(counts[i])) == len(set(picks))
        assert all(p < int(counts[i]) for p in picks)
