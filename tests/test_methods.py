"""Projector-stage methods: one table of invariants over every registered method, closed-form references,
and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vtcompress
from methods_util import (
    GRID,
    MERGE,
    NOT_IDENTITY,
    SELECT,
    assert_same_tokens,
    check_invariants,
    expected_counts,
    make_tokens,
    needs_grid,
    projector_methods,
)
from vtcompress import VisualTokens
from vtcompress.methods.attention import iqr_outliers
from vtcompress.methods.transform import anyres_max_shape, pixel_unshuffle_tokens
from vtcompress.ops import bipartite_soft_matching, maxmin_diversity

METHODS = projector_methods()
TRAINABLE = {r["name"] for r in vtcompress.method_info() if r["trainable"]}


def build(name: str, budget):
    if name in TRAINABLE:  # random (untrained) weights must be asked for explicitly
        extra = {"grid": (6, 6)} if name == "unshuffle_mlp" and isinstance(budget, int) else {}
        return vtcompress.get(name, budget=budget, pretrained=False, **extra)
    return vtcompress.get(name, budget=budget)


def test_the_issue_2_method_set_is_registered():
    expected = {"pixel_unshuffle", "avg_pool", "max_pool", "bilinear", "tome", "divprune", "fastervlm",
                "visionzip", "prumerge", "prumerge_plus", "random", "uniform"}
    assert expected <= set(METHODS)
    info = {row["name"]: row for row in vtcompress.method_info()}
    assert {info[n]["family"] for n in ("avg_pool", "max_pool", "bilinear", "pixel_unshuffle")} == {"transformation"}
    assert {info[n]["family"] for n in ("tome", "divprune")} == {"similarity"}
    assert {info[n]["family"] for n in ("fastervlm", "visionzip", "prumerge", "prumerge_plus")} == {"attention"}
    assert {info[n]["family"] for n in ("random", "uniform")} == {"baseline"}
    # the references compare the vision tower's keys (VisionZip, PruMerge)
    assert info["fastervlm"]["needs"] == "cls_attn"
    assert all(info[n]["needs"] == "cls_attn,keys" for n in ("visionzip", "prumerge", "prumerge_plus"))


# ------------------------------------------------------------------------------------------ the table
def _budgets(name: str):
    if name == "pixel_unshuffle":
        return [0.25, 9]
    return [1, 9, 0.25, 0.5]


CASES = [(name, budget) for name in METHODS for budget in _budgets(name)]


@pytest.mark.parametrize("name,budget", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_table_invariants(name, budget):
    method = build(name, budget)
    grid_only = needs_grid(method)
    # ragged rows for methods that take any tokens; full grids for grid transforms
    tokens = make_tokens(b=3, counts=None if grid_only else [36, 29, 17], seed=1)
    out = method(tokens)
    check_invariants(tokens, out)
    assert torch.equal(out.counts, expected_counts(method, tokens))
    if not grid_only:
        assert out.counts.tolist() <= tokens.counts.tolist()
    # the documented count meets the budget where the method promises it
    if name in SELECT or name in ("tome", "visionzip"):
        assert torch.equal(out.counts, method.keep_counts(tokens))
    if name in ("prumerge", "prumerge_plus"):
        assert bool((out.counts <= method.keep_counts(tokens)).all())
    # padded tokens are never picked: their patches stay unassigned and no anchor points at them
    assert bool((out.assign[~tokens.mask] == -1).all())
    assert bool((out.pos[out.mask] < tokens.counts.repeat_interleave(out.counts)).all())
    if name in SELECT:
        assert bool((out.size[out.mask] == 1).all())
        for r in range(tokens.batch_size):
            c = int(out.counts[r])
            torch.testing.assert_close(out.x[r, :c], tokens.x[r, out.pos[r, :c]], rtol=0, atol=0)
    no_drop = name == "tome" or grid_only or (name == "visionzip" and bool((method.split_counts(tokens)[1] > 0).all()))
    if no_drop:
        # merging without dropping: the sizes account for every valid patch
        torch.testing.assert_close(out.size.sum(1), tokens.counts.float(), rtol=0, atol=1e-4)
    # same input -> same output
    assert_same_tokens(out, method(tokens))


@pytest.mark.parametrize("name", METHODS)
def test_batched_equals_one_at_a_time(name):
    method = build(name, 0.25 if name == "pixel_unshuffle" else 0.3)
    grid_only = needs_grid(method)
    tokens = make_tokens(b=3, counts=None if grid_only else [36, 23, 30], seed=2)
    out = method(tokens)
    for r in range(tokens.batch_size):
        alone = method(tokens.row(r))
        assert_same_tokens(out.row(r), alone, atol=1e-5)


# learned projector replacements are never the identity; neither are the documented exceptions
IDENTITY = sorted(set(METHODS) - NOT_IDENTITY - {r["name"] for r in vtcompress.method_info() if r["trainable"]})


@pytest.mark.parametrize("name", IDENTITY)
def test_full_budget_is_identity(name):
    method = build(name, 1.0)
    grid_only = needs_grid(method)
    tokens = make_tokens(b=2, counts=None if grid_only else [36, 31], seed=3)
    out = method(tokens)
    assert_same_tokens(out, tokens)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_and_fp32_both_run(name):
    budget = 0.25 if name == "pixel_unshuffle" else 0.5
    method = build(name, budget)
    grid_only = needs_grid(method)
    counts = None if grid_only else [36, 20]
    out32 = method(make_tokens(b=2, counts=counts, seed=4))
    out16 = method(make_tokens(b=2, counts=counts, seed=4, dtype=torch.bfloat16))
    assert out16.x.dtype == torch.bfloat16 and out32.x.dtype == torch.float32
    check_invariants(make_tokens(b=2, counts=counts, seed=4, dtype=torch.bfloat16), out16)
    assert torch.equal(out16.counts, out32.counts)


# ------------------------------------------------------------------------------------------ transformation
def _grid(t: torch.Tensor, hw):
    return t.reshape(t.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2)


def _flat(g: torch.Tensor):
    return g.permute(0, 2, 3, 1).reshape(g.shape[0], -1, g.shape[1])


@pytest.mark.parametrize("hw,budget,kernel", [((8, 8), 16, (2, 2)), ((6, 6), 4, (3, 3)), ((4, 6), 6, (2, 2)),
                                              ((6, 6), 0.25, (2, 2))])
def test_pooling_matches_torch_functional(hw, budget, kernel):
    tokens = make_tokens(b=2, grid=hw, seed=5)
    avg = build("avg_pool", budget)(tokens)
    mx = build("max_pool", budget)(tokens)
    g = _grid(tokens.x, hw)
    torch.testing.assert_close(avg.x, _flat(F.avg_pool2d(g, kernel, kernel)), rtol=0, atol=1e-6)
    torch.testing.assert_close(avg.x, _flat(F.adaptive_avg_pool2d(g, avg.layout)), rtol=0, atol=1e-6)
    torch.testing.assert_close(mx.x, _flat(F.max_pool2d(g, kernel, kernel)), rtol=0, atol=0)
    assert avg.layout == (hw[0] // kernel[0], hw[1] // kernel[1])
    # each output token sits at its cell's top-left patch and stands for the cell's kh*kw patches
    rows = torch.arange(0, hw[0], kernel[0])[:, None] * hw[1] + torch.arange(0, hw[1], kernel[1])[None]
    assert torch.equal(avg.pos[0], rows.reshape(-1))
    assert bool((avg.size == kernel[0] * kernel[1]).all())


def test_pooling_on_a_grid_not_divisible_uses_contiguous_blocks():
    hw = (5, 7)
    tokens = make_tokens(b=1, grid=hw, seed=6)
    out = build("avg_pool", 6)(tokens)  # closest grid to 6 cells with 5x7's aspect
    h, w = out.layout
    assert h * w == out.num_tokens
    g = tokens.x[0].reshape(hw[0], hw[1], -1)
    for i in range(h):
        for j in range(w):
            r0, r1 = math.ceil(i * hw[0] / h), math.ceil((i + 1) * hw[0] / h)
            c0, c1 = math.ceil(j * hw[1] / w), math.ceil((j + 1) * hw[1] / w)
            cell = g[r0:r1, c0:c1].reshape(-1, g.shape[-1])
            torch.testing.assert_close(out.x[0, i * w + j], cell.mean(0), rtol=0, atol=1e-6)
            assert out.size[0, i * w + j] == cell.shape[0]
            assert out.pos[0, i * w + j] == r0 * hw[1] + c0


@pytest.mark.parametrize("hw,budget", [((6, 6), 9), ((8, 8), 0.25), ((4, 6), 6), ((27, 27), 196)])
def test_bilinear_matches_interpolate(hw, budget):
    tokens = make_tokens(b=2, grid=hw, d=4, seed=7)
    out = build("bilinear", budget)(tokens)
    ref = F.interpolate(_grid(tokens.x, hw), size=out.layout, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.x, _flat(ref), rtol=0, atol=1e-6)
    if hw == (27, 27):
        assert out.layout == (14, 14)  # LLaVA-OneVision's video pooling 27x27 -> 14x14


def test_anyres_max_rule_matches_llava_onevision_formula():
    # the transformers rule, written out: ratio = sqrt(h*w / (N * base^2)); resize if ratio > 1.1
    for h, w in [(27, 27), (81, 81), (54, 108), (108, 108), (135, 81), (60, 150)]:
        ratio = math.sqrt(h * w / (9 * 27**2))
        expect = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
        assert anyres_max_shape(h, w, 9, 27) == expect
    assert anyres_max_shape(108, 108) == (81, 81)  # 4x4 crops of 27x27 -> capped near 9 crops' worth
    assert anyres_max_shape(81, 81) == (81, 81)  # exactly 9 crops: ratio 1.0, kept
    with pytest.raises(ValueError, match="height"):
        anyres_max_shape(0, 10)


def test_pixel_unshuffle_matches_internvl_and_torch():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    hw, d = (8, 8), 6
    tokens = make_tokens(b=2, grid=hw, d=d, seed=8)
    out = build("pixel_unshuffle", 0.25)(tokens)
    # transformers' InternVL pixel_shuffle (does not use self) on the [B, H, W, C] grid
    ref = InternVLModel.pixel_shuffle(None, tokens.x.reshape(2, 8, 8, d), scale_factor=0.5)
    torch.testing.assert_close(out.x, ref.reshape(2, 16, 4 * d), rtol=0, atol=0)
    # F.pixel_unshuffle orders channels (c, a, b); ours (a, b, c)
    fu = F.pixel_unshuffle(_grid(tokens.x, hw), 2)  # [B, 4C, 4, 4]
    fu = fu.reshape(2, d, 4, 4, 4).transpose(1, 2).reshape(2, 4 * d, 4, 4)
    torch.testing.assert_close(out.x, _flat(fu), rtol=0, atol=0)
    assert out.layout == (4, 4) and bool((out.size == 4).all())
    assert torch.equal(pixel_unshuffle_tokens(tokens.x, hw, 1), tokens.x)
    # factor 1 with the full budget is the identity
    assert_same_tokens(vtcompress.get("pixel_unshuffle", budget=1.0, factor=1)(tokens), tokens)


def test_pixel_unshuffle_budget_must_match_factor():
    with pytest.raises(ValueError, match=r"budget=0\.5 does not match factor=2"):
        vtcompress.get("pixel_unshuffle", budget=0.5)
    tokens = make_tokens(b=1, grid=(8, 8))
    with pytest.raises(ValueError, match="budget=20 tokens does not match factor=2"):
        vtcompress.get("pixel_unshuffle", budget=20)(tokens)
    assert vtcompress.get("pixel_unshuffle", budget=16)(tokens).num_tokens == 16
    with pytest.raises(ValueError, match=r"divisible by 2; got \(5, 5\)"):
        vtcompress.get("pixel_unshuffle")(make_tokens(b=1, grid=(5, 5)))


@pytest.mark.parametrize("name", sorted(GRID))
def test_transforms_need_a_full_grid(name):
    budget = 0.25
    tokens = make_tokens(b=2, grid=(6, 6), counts=[36, 30])
    with pytest.raises(ValueError, match="masked token"):
        build(name, budget)(tokens)
    pruned = build("fastervlm", 16)(make_tokens(b=1, grid=(6, 6)))
    with pytest.raises(ValueError, match="layout=None"):
        build(name, budget)(pruned)


# ------------------------------------------------------------------------------------------ similarity
def _tome_case():
    e = torch.eye(4)
    x = torch.stack([e[0], e[0], e[1], e[2], e[2] + 0.1 * e[0], e[3]])[None]  # A = 0,2,4  B = 1,3,5
    return VisualTokens.from_features(x, (2, 3))


def test_tome_hand_made_case():
    tokens = _tome_case()
    out = vtcompress.get("tome", budget=4)(tokens)
    # best edges: A0->B1 (cos 1.0), A4->B3 (cos 0.995), A2->B1 (cos 0): the top-2 merge
    assert out.assign[0].tolist() == [0, 0, 1, 2, 2, 3]
    assert out.pos[0].tolist() == [1, 2, 3, 5]
    assert out.size[0].tolist() == [2, 1, 2, 1]
    x = tokens.x[0]
    torch.testing.assert_close(out.x[0], torch.stack([(x[0] + x[1]) / 2, x[2], (x[3] + x[4]) / 2, x[5]]))
    # protecting token 0 takes its edge away: A4->B3 then A2->B1
    prot = vtcompress.get("tome", budget=4, protect=1)(tokens)
    assert prot.assign[0].tolist() == [0, 1, 1, 2, 2, 3]
    assert prot.pos[0].tolist() == [0, 1, 3, 5]
    # keys, when carried, are the metric instead of x: identical keys -> ties -> lower index partners
    keyed = tokens.replace(keys=torch.ones(1, 6, 3))
    dest, _ = bipartite_soft_matching(keyed.keys, 1)
    assert dest[0].tolist() == [0, 0, 1, 2, 3, 4]
    assert vtcompress.get("tome", budget=5)(keyed).assign[0].tolist() == [0, 0, 1, 2, 3, 4]


def _tome_reference_groups(metric: torch.Tensor, r: int, class_token: bool) -> list[set[int]]:
    """facebookresearch/ToMe ``bipartite_soft_matching`` for one image, written as loops: the merged groups."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_ids, b_ids = list(range(0, len(m), 2)), list(range(1, len(m), 2))
    best = []
    for ai in a_ids:
        sims = [float(m[ai] @ m[bi]) for bi in b_ids]
        score = -math.inf if (class_token and ai == 0) else max(sims)
        best.append((score, ai, b_ids[sims.index(max(sims))]))
    src = sorted(best, key=lambda e: -e[0])[:r]  # the r best edges merge
    groups = {bi: {bi} for bi in b_ids}
    for _, ai, bi in src:
        groups[bi].add(ai)
    merged_a = {ai for _, ai, _ in src}
    return sorted([g for g in groups.values()] + [{ai} for ai in a_ids if ai not in merged_a], key=min)


@pytest.mark.parametrize("protect", [0, 1])
def test_tome_round_matches_the_reference_formulation(protect):
    tokens = make_tokens(b=2, grid=(5, 5), d=6, seed=17)
    r = 9
    out = vtcompress.get("tome", budget=25 - r, protect=protect)(tokens)  # one round: r <= 12
    for i in range(2):
        groups = [set((out.assign[i] == t).nonzero().squeeze(1).tolist()) for t in range(out.num_tokens)]
        assert sorted(groups, key=min) == _tome_reference_groups(tokens.keys[i].double(), r, protect == 1)
        for t, g in enumerate(groups):  # merge_wavg: size-weighted mean, sizes 1 here
            torch.testing.assert_close(out.x[i, t], tokens.x[i, sorted(g)].mean(0), rtol=0, atol=1e-6)
            dst = [p for p in g if p % 2 == 1] if len(g) > 1 else list(g)
            assert [int(out.pos[i, t])] == dst  # the B (destination) token is the group's anchor


def test_tome_rounds_are_size_weighted():
    tokens = make_tokens(b=1, grid=(4, 4), seed=9, spikes=0)
    out = vtcompress.get("tome", budget=3, max_r=2)(tokens)
    assert out.num_tokens == 3
    # every output token is the plain mean of the original patches it stands for (weighted by size)
    for t in range(3):
        members = (out.assign[0] == t).nonzero().squeeze(1)
        torch.testing.assert_close(out.x[0, t], tokens.x[0, members].mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.keys[0, t], tokens.keys[0, members].mean(0), rtol=0, atol=1e-5)
    # the protected prefix is never merged
    prot = vtcompress.get("tome", budget=0.25, protect=2)(tokens)
    assert prot.pos[0, :2].tolist() == [0, 1] and prot.size[0, :2].tolist() == [1.0, 1.0]


def _divprune_reference(feats: torch.Tensor, k: int) -> list[int]:
    """vbdi/divprune's loop, per image: cosine distance, first pick by nearest-neighbour distance."""
    f = feats / feats.norm(dim=1, keepdim=True)
    dist = 1.0 - f @ f.t()
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[picks].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return picks


def test_divprune_matches_a_naive_reference_loop():
    tokens = make_tokens(b=3, grid=(6, 6), d=16, counts=[36, 25, 31], seed=10)
    k = 10
    idx, valid = maxmin_diversity(tokens.x, k, tokens.mask)
    out = vtcompress.get("divprune", budget=k)(tokens)
    for r in range(3):
        n = int(tokens.counts[r])
        ref = _divprune_reference(tokens.x[r, :n].double(), k)
        assert idx[r].tolist() == ref
        assert out.pos[r, :k].tolist() == sorted(ref)
    assert bool(valid.all())


# ------------------------------------------------------------------------------------------ attention
def test_fastervlm_keeps_topk_cls_attention():
    tokens = make_tokens(b=2, counts=[36, 30], seed=11)
    out = vtcompress.get("fastervlm", budget=7)(tokens)
    for r in range(2):
        n = int(tokens.counts[r])
        top = tokens.cls_attn[r, :n].topk(7).indices.sort().values
        assert out.pos[r].tolist() == top.tolist()


def _visionzip_reference(x, attn, keys, d, c):
    """VisionZip's contextual-token block for one image without [CLS] (dvlab-research/VisionZip,
    visionzip/clip_encoder.py): dominant by attention, contextual = target + mean of its assigned tokens."""
    n = x.shape[0]
    dom = attn.topk(d).indices.sort().values.tolist()
    rest = [i for i in range(n) if i not in dom]
    step = max(1, len(rest) // c)
    targets = [rest[i] for i in range(0, len(rest), step)][:c]
    others = [i for i in rest if i not in targets]
    kn = keys / keys.norm(dim=-1, keepdim=True)
    groups = {t: [t] for t in targets}
    for o in others:
        groups[targets[int((kn[o] @ kn[targets].t()).argmax())]].append(o)
    feats = {i: x[i] for i in dom}
    # the reference's contextual token: target + mean of the tokens assigned to it (not the group mean)
    feats.update({t: x[t] + (x[g[1:]].mean(0) if len(g) > 1 else 0.0) for t, g in groups.items()})
    return sorted(feats), feats


def test_visionzip_matches_the_reference_algorithm():
    tokens = make_tokens(b=2, counts=[36, 27], seed=12)
    method = vtcompress.get("visionzip", budget=12, dominant_ratio=0.75)
    out = method(tokens)
    for r in range(2):
        n = int(tokens.counts[r])
        kept, feats = _visionzip_reference(tokens.x[r, :n], tokens.cls_attn[r, :n], tokens.keys[r, :n], 9, 3)
        assert out.pos[r, :12].tolist() == kept
        torch.testing.assert_close(out.x[r, :12], torch.stack([feats[i] for i in kept]), rtol=0, atol=1e-6)
        # dominant tokens are the top-9 by [CLS] attention
        dom = set(tokens.cls_attn[r, :n].topk(9).indices.tolist())
        assert dom <= set(kept) and all(out.size[r, kept.index(i)] >= 1 for i in dom)
    # paper default: 54 dominant + 10 contextual of 64
    assert [int(v) for v in vtcompress.get("visionzip", budget=64).split_counts(make_tokens(b=1, grid=(24, 24)))] \
        == [54, 10]


def test_prumerge_keeps_the_iqr_outliers_and_merges_their_neighbours():
    tokens = make_tokens(b=2, grid=(8, 8), counts=[64, 50], seed=13, spikes=5)
    out = vtcompress.get("prumerge", k_neighbors=6)(tokens)
    for r in range(2):
        n = int(tokens.counts[r])
        a = tokens.cls_attn[r, :n].double()
        q1, q3 = torch.quantile(a, 0.25), torch.quantile(a, 0.75)
        outliers = (a > q3 + 1.5 * (q3 - q1)).nonzero().squeeze(1)
        assert torch.equal(iqr_outliers(tokens.cls_attn, tokens.mask)[r, :n].nonzero().squeeze(1), outliers)
        pruned = sorted(set(range(n)) - set(outliers.tolist()))
        # the outliers, plus the reference's summary token anchored at the first pruned patch
        c = int(out.counts[r])
        assert out.pos[r, :c].tolist() == sorted(outliers.tolist() + [pruned[0]])
        kn = tokens.keys[r, :n] / tokens.keys[r, :n].norm(dim=-1, keepdim=True)
        x, w = tokens.x[r, :n], tokens.cls_attn[r, :n]
        for t, p in enumerate(out.pos[r, :c].tolist()):
            if p == pruned[0]:  # summary: the attention-weighted SUM of every pruned token; owns their patches
                torch.testing.assert_close(out.x[r, t], (w[pruned, None] * x[pruned]).sum(0), rtol=0, atol=1e-5)
                assert (out.assign[r, :n] == t).nonzero().squeeze(1).tolist() == pruned
                continue
            # kept: itself + attention-weighted SUM of its 6 nearest keys (kept or pruned)
            sims = kn[p] @ kn.t()
            sims[p] = -2
            near = sims.topk(6).indices
            torch.testing.assert_close(out.x[r, t], x[p] + (w[near, None] * x[near]).sum(0), rtol=0, atol=1e-5)
            assert (out.assign[r] == t).nonzero().squeeze(1).tolist() == [p]
    # the budget caps the tokens returned (summary included): the top one by attention + the summary token
    capped = vtcompress.get("prumerge", budget=2)(tokens)
    for r in range(2):
        n = int(tokens.counts[r])
        top = int(tokens.cls_attn[r, :n].argmax())
        assert int(capped.counts[r]) == 2 and top in capped.pos[r, :2].tolist()
    # without the summary token the pruned tokens are dropped
    plain = vtcompress.get("prumerge", summary_token=False)(tokens)
    for r in range(2):
        n = int(tokens.counts[r])
        assert int(plain.counts[r]) == int(iqr_outliers(tokens.cls_attn, tokens.mask)[r].sum())


def test_prumerge_plus_adds_uniform_samples():
    tokens = make_tokens(b=1, grid=(8, 8), seed=14, spikes=4)
    plain = vtcompress.get("prumerge", summary_token=False)(tokens)
    plus = vtcompress.get("prumerge_plus", summary_token=False)(tokens)
    o = int(plain.counts[0])
    stride = max(1, int(1 / (o / 64)) // 3)
    samples = set(range(0, 63, stride))  # the reference's arange(0, N - 1, stride): index N - 1 never sampled
    kept = set(plus.pos[0, : plus.counts[0]].tolist())
    assert kept == set(plain.pos[0, :o].tolist()) | samples
    assert int(plus.counts[0]) > o


# ------------------------------------------------------------------------------------------ baselines
def test_uniform_is_a_2d_lattice_on_a_full_grid():
    tokens = make_tokens(b=1, grid=(24, 24), d=2, seed=15)
    out = vtcompress.get("uniform", budget=144)(tokens)
    rows, cols = out.pos[0] // 24, out.pos[0] % 24
    assert set(rows.tolist()) == set(range(1, 24, 2)) and set(cols.tolist()) == set(range(1, 24, 2))
    # ragged rows: evenly spaced in raster order, pick i at floor((i + 1/2) n / k)
    ragged = make_tokens(b=2, grid=(6, 6), counts=[36, 20], seed=15)
    out = vtcompress.get("uniform", budget=8)(ragged)
    assert out.pos[1].tolist() == [(2 * i + 1) * 20 // 16 for i in range(8)]


def test_random_is_seeded():
    tokens = make_tokens(b=2, seed=16)
    a = vtcompress.get("random", budget=10, seed=3)(tokens)
    b = vtcompress.get("random", budget=10, seed=3)(tokens)
    c = vtcompress.get("random", budget=10, seed=4)(tokens)
    assert torch.equal(a.pos, b.pos) and not torch.equal(a.pos, c.pos)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", sorted(SELECT | MERGE | GRID - {"pixel_unshuffle"}))
@pytest.mark.parametrize("budget", [0, -3, 1.5, float("nan"), True, "half"])
def test_bad_budgets_raise(name, budget):
    with pytest.raises(ValueError, match=r"budget") as err:
        vtcompress.get(name, budget=budget)
    assert repr(budget) in str(err.value) or str(budget) in str(err.value)


@pytest.mark.parametrize("name", sorted(SELECT | MERGE | GRID - {"pixel_unshuffle"}))
def test_budget_above_the_token_count_raises(name):
    tokens = make_tokens(b=1, grid=(6, 6))
    with pytest.raises(ValueError, match="budget=37"):
        vtcompress.get(name, budget=37)(tokens)


def test_bad_tokens_raise():
    x = torch.randn(1, 36, 4)
    with pytest.raises(ValueError, match=r"grid \(5, 5\) has 25 patches but the features have N=36"):
        VisualTokens.from_features(x, (5, 5))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        VisualTokens.from_features(torch.ones(1, 36, 4, dtype=torch.long))
    tokens = VisualTokens.from_features(x)
    tokens.x[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vtcompress.get("tome")(tokens)
    ragged = torch.arange(16)[None] < torch.tensor([[16], [9]])
    with pytest.raises(ValueError, match="keys contain NaN/inf"):  # validate() reads the keys (ToMe's metric)
        VisualTokens.from_features(torch.randn(2, 16, 4), mask=ragged, keys=torch.full((2, 16, 3), float("nan")))
    with pytest.raises(ValueError, match="'cls_attn' signal"):
        vtcompress.get("visionzip")(VisualTokens.from_features(torch.randn(1, 36, 4)))


def test_unknown_method_and_bad_fields_raise():
    with pytest.raises(ValueError, match=r"unknown method 'tomee'; valid names: .*tome"):
        vtcompress.get("tomee")
    for name, field, value in [("tome", "protect", -1), ("tome", "max_r", 1.5), ("visionzip", "dominant_ratio", 1.5),
                               ("prumerge", "k_neighbors", -2), ("random", "seed", -1),
                               ("pixel_unshuffle", "factor", 0), ("divprune", "use_keys", "yes")]:
        with pytest.raises(ValueError, match=field):
            vtcompress.get(name, **{field: value})
    with pytest.raises(ValueError, match=r"budget=2 tokens is below protect \+ 1 = 3"):
        vtcompress.get("tome", budget=2, protect=2)
