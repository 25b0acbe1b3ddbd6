"""Reference parity: ToMe (facebookresearch/ToMe) and DivPrune (vbdi/divprune) vs our kernels on identical inputs.

The reference functions below are re-typed from reading the authors' code (cited per function); they run on the
same random inputs as ours and the tests assert the same merges / kept indices and outputs (1e-5).

Documented deviation (ToMe): the reference returns ``[unmerged A tokens (in edge order, sorted when there is a
class token), B tokens]``; we keep every token in index (spatial) order. Within one round the merges, the merged
values and the sizes are identical; over several rounds ours alternates A/B on the index-ordered tokens, which
equals the reference applied to its own output re-sorted into index order (tested).
"""

import math

import pytest
import torch

import vtcompress as vc
from vtcompress import VisualTokens
from vtcompress.ops import bipartite_soft_matching


# ------------------------------------------------------------------------------------------ re-typed references
def ref_bipartite_soft_matching(metric, r, class_token=False):
    """facebookresearch/ToMe, tome/merge.py, ``bipartite_soft_matching`` (without the distillation token).

    Returns the reference's ``merge`` closure and, for the comparison, the source index (in the input) of each of
    its output tokens."""
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    nb = b.shape[1]
    source = torch.cat([2 * unm_idx[..., 0], (2 * torch.arange(nb) + 1).expand(metric.shape[0], nb)], dim=1)
    return merge, source


def ref_merge_wavg(merge, x, size=None):
    """facebookresearch/ToMe, tome/merge.py, ``merge_wavg``: size-weighted merge, returns (x, size)."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def ref_divprune(features, ratio):
    """vbdi/divprune, LLaVA/llava/model/llava_arch.py, ``pairwise_cosine_similarity`` + ``DivPrune``: the kept
    indices of one image's visual tokens ``[N, D]`` (pick order), ``int(round(ratio * N))`` of them."""
    n = features.shape[0]
    k = int(round(ratio * n))
    norm = features / features.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(norm, norm.t())
    s = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(dist, 0, s[:i]), dim=0).values
        s[i] = torch.argmax(scores)
    return s


def _sorted_by_source(x, size, source):
    order = source.argsort(dim=1)
    gather = order[..., None]
    return (x.gather(1, gather.expand(-1, -1, x.shape[-1])), size.gather(1, gather), source.gather(1, order))


# ------------------------------------------------------------------------------------------ ToMe
@pytest.mark.parametrize("n,r,protect,dim", [(577, 288, 1, 24), (577, 100, 1, 24), (576, 200, 0, 24),
                                             (145, 72, 1, 24), (144, 1, 0, 24),
                                             (577, 288, 1, 1024), (145, 40, 1, 128)])  # C > N / 2: the "wide" path
@pytest.mark.parametrize("use_keys", [False, True])
def test_tome_round_matches_reference(n, r, protect, dim, use_keys):
    gen = torch.Generator().manual_seed(n + r)
    x = torch.randn(3, n, dim, generator=gen)
    keys = torch.randn(3, n, 8, generator=gen) if use_keys else None
    metric = keys if use_keys else x
    merge, source = ref_bipartite_soft_matching(metric, r, class_token=bool(protect))
    rx, rsize = ref_merge_wavg(merge, x)
    rx, rsize, source = _sorted_by_source(rx, rsize, source)

    tokens = VisualTokens.from_features(x, grid=(1, n), keys=keys)
    out = vc.get("tome", budget=n - r, protect=protect)(tokens)
    assert out.counts.tolist() == [n - r] * 3
    assert torch.equal(out.pos, source)  # the same merges: every output token sits at the reference's source
    torch.testing.assert_close(out.x, rx, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.size, rsize[..., 0], rtol=0, atol=1e-6)
    # the kernel's plan: every A token the reference merged goes to its reference destination
    dest, anchor = bipartite_soft_matching(metric, r, protect=protect)
    assert torch.equal(anchor, source)


def test_tome_two_rounds_equal_the_reference_on_index_ordered_tokens():
    """Several rounds: ours == the reference applied again to its own output re-sorted into index order (the one
    documented deviation), with the metric merged by the same sizes."""
    gen = torch.Generator().manual_seed(7)
    n = 145
    x = torch.randn(2, n, 16, generator=gen, dtype=torch.float64)
    keys = torch.randn(2, n, 6, generator=gen, dtype=torch.float64)
    out = vc.get("tome", budget=40, protect=1)(VisualTokens.from_features(x, grid=(1, n), keys=keys))
    cur_x, cur_k, size, src = x, keys, torch.ones(2, n, 1, dtype=torch.float64), torch.arange(n).expand(2, n)
    for r in (72, 33):  # 145 -> 73 (at most (145 - 1) // 2) -> 40
        merge, source = ref_bipartite_soft_matching(cur_k, r, class_token=True)
        nx, nsize = ref_merge_wavg(merge, cur_x, size)
        nk, _ = ref_merge_wavg(merge, cur_k, size)
        order = source.argsort(dim=1)
        g = order[..., None]
        cur_x, cur_k = nx.gather(1, g.expand(-1, -1, 16)), nk.gather(1, g.expand(-1, -1, 6))
        size, src = nsize.gather(1, g), src.gather(1, source.gather(1, order))
    assert torch.equal(out.pos, src)
    torch.testing.assert_close(out.x, cur_x, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.size.double(), size[..., 0], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ DivPrune
@pytest.mark.parametrize("n,ratio", [(576, 0.098), (576, 0.25), (144, 0.11), (144, 0.5)])
def test_divprune_matches_reference(n, ratio):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 32, generator=gen)
    out = vc.get("divprune", budget=ratio)(VisualTokens.from_features(x, grid=(1, n)))
    for b in range(2):
        kept = ref_divprune(x[b], ratio).sort().values
        assert out.pos[b, : out.counts[b]].tolist() == kept.tolist()
        torch.testing.assert_close(out.x[b, : out.counts[b]], x[b, kept], rtol=0, atol=0)


def test_divprune_ragged_rows_match_reference_per_image():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 144, 16, generator=gen)
    mask = torch.arange(144)[None] < torch.tensor([[144], [100]])
    out = vc.get("divprune", budget=0.25)(VisualTokens.from_features(x, grid=(12, 12), mask=mask))
    for b, c in enumerate((144, 100)):
        kept = ref_divprune(x[b, :c], 0.25).sort().values
        assert out.pos[b, : out.counts[b]].tolist() == kept.tolist()
