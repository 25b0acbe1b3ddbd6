"""Shared tensor kernels. Pure torch, batch-first, no transformers; every method builds on these.

Selection kernels return indices (and a validity mask) so that one decision is applied to every field
of :class:`~vtcompress.tokens.VisualTokens` by its shared ``select`` / ``merge``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["topk_sorted", "flag_indices", "bipartite_soft_matching", "maxmin_diversity"]


def topk_sorted(scores: Tensor, k: Tensor | int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Indices of the ``k[b]`` highest ``scores [B, N]`` of each row, in ascending index order.

    Args:
        scores: ``[B, N]`` float, higher is kept.
        k: ``[B]`` long (or an int) number to keep per row.
        mask: ``[B, N]`` bool valid tokens; invalid ones are never picked.

    Returns:
        ``idx [B, K]`` long with ``K = max(k)``, ascending among the valid picks of each row, and
        ``valid [B, K]`` bool (rows with fewer picks are right-padded). Ties go to the lower index.
    """
    b, n = scores.shape
    k = torch.as_tensor(k, device=scores.device, dtype=torch.long).expand(b)
    if mask is not None:
        k = torch.minimum(k, mask.sum(1))
    kmax = int(k.max()) if b else 0
    s = scores.to(torch.float32)
    s = torch.nan_to_num(s, nan=float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # a stable descending sort breaks ties towards the lower index, deterministically on CPU and CUDA
    top = s.sort(dim=1, descending=True, stable=True).indices[:, :kmax]
    valid = torch.arange(kmax, device=scores.device)[None] < k[:, None]
    key = torch.where(valid, top, top + n)
    order = key.argsort(dim=1)
    return top.gather(1, order), valid.gather(1, order)


def flag_indices(flag: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the True entries of ``flag [B, N]`` bool, ascending and left-aligned.

    Returns:
        ``idx [B, K]`` long with ``K`` the largest count of a row (entries past a row's count are 0) and
        ``valid [B, K]`` bool (rows with fewer True entries are right-padded).
    """
    b, n = flag.shape
    counts = flag.sum(1)
    k = int(counts.max()) if b else 0
    ar = torch.arange(n, device=flag.device)
    idx = torch.where(flag, ar, ar + n).argsort(dim=1)[:, :k]
    valid = torch.arange(k, device=flag.device)[None] < counts[:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


# ---------------------------------------------------------------------------------- ToMe matching with protected prefix
def bipartite_soft_matching(
    metric: Tensor, r: Tensor | int, mask: Tensor | None = None, protect: int = 0
) -> tuple[Tensor, Tensor]:
    """One round of ToMe bipartite soft matching (Bolya et al., arXiv 2210.09461), as a merge plan.

    As facebookresearch/ToMe ``bipartite_soft_matching``: tokens alternate into set A (even index) and set B
    (odd index); each A token's best edge is its most cosine-similar B token; the ``r[b]`` A tokens with the
    most similar best edge merge into their B partner; every other token is kept. B tokens never merge away,
    so no chains form within a round. The first ``protect`` tokens (ToMe's class / distillation tokens) take
    part on neither side. Unlike ToMe (which reorders to ``[unmerged A, B]``) the kept tokens stay in index
    order, so spatial order survives.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe: head-mean attention keys).
        r: ``[B]`` long (or an int) tokens to merge away per row, capped at ``(count - protect) // 2``.
        mask: ``[B, N]`` bool valid tokens, valid first (right padding); default all valid.
        protect: number of leading tokens that neither merge away nor receive.

    Returns:
        ``dest [B, N]`` long (output slot of each token, ``-1`` for padding) and ``anchor [B, M]`` long (the
        token whose ``pos`` each slot keeps, ``-1`` for padding slots; ascending), ``M`` = most tokens kept by
        any row: the arguments of :meth:`VisualTokens.merge`. Ties go to the lower index (stable sorts).
    """
    b, n, c = metric.shape
    dev = metric.device
    ar = torch.arange(n, device=dev)
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=dev)
    eligible = mask & (ar >= protect)[None]
    r = torch.as_tensor(r, device=dev, dtype=torch.long).expand(b)
    # valid tokens are a prefix, so [protect, count) holds >= (count - protect) // 2 tokens of each parity
    r = torch.minimum(r.clamp(min=0), eligible.sum(1) // 2)
    na, nb = (n + 1) // 2, n // 2
    merged = torch.zeros(b, n, dtype=torch.bool, device=dev)
    partner = torch.zeros(b, na, dtype=torch.long, device=dev)
    if nb:
        m = metric if metric.dtype == torch.float32 else metric.to(torch.float32)
        norm = m.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [B, N, 1]
        # cosine = (a . b) / (|a| |b|) on strided views of the A / B sets (no copies). For a narrow metric
        # (C <= Nb, e.g. ToMe's head-dim keys) normalise it first, as ToMe does; for a wide one (C > Nb, e.g.
        # 1024-wide features) divide the [Na, Nb] products by |b| per column (the argmax over B) and the best
        # edges by |a| (their ranking): the same similarities with less element-wise work
        wide = c > nb
        if not wide:
            m = m / norm
        scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
        if wide:
            scores.div_(norm[:, 1::2].transpose(1, 2))
        elig_b = eligible[:, 1::2]
        if not bool(elig_b.all()):
            scores.masked_fill_(~elig_b[:, None, :], float("-inf"))
        # each A token's best edge (first index on ties, as ToMe's max). On CPU a max with indices costs ~10x an
        # amax, so when few A tokens merge (r < Na / 2) the values come from an amax over all rows and the
        # indices only from the rows that merge
        rmax = int(r.max()) if b else 0
        few = 2 * rmax < na
        best, match = (scores.amax(dim=-1), None) if few else scores.max(dim=-1)
        if wide:
            best = best / norm[:, 0::2, 0]
        best = best.masked_fill_(~eligible[:, 0::2], float("-inf"))
        order = best.sort(dim=1, descending=True, stable=True).indices  # ties: lower index first
        rows = order[:, :rmax]  # [B, R] the A tokens that merge (the first r[b] of each row)
        if few:
            flat = (rows + torch.arange(b, device=dev)[:, None] * na).reshape(-1)
            match = scores.reshape(b * na, nb).index_select(0, flat).max(dim=-1).indices.view(b, rmax)
        else:
            match = match.gather(1, rows)
        top = torch.arange(rmax, device=dev)[None] < r[:, None]
        merged[:, 0::2] = torch.zeros(b, na, dtype=torch.bool, device=dev).scatter_(1, rows, top) \
            & torch.isfinite(best)
        partner = partner.scatter_(1, rows, 2 * match + 1)  # index of the B partner of each merging A token
    keep = mask & ~merged
    slot = keep.long().cumsum(1) - 1  # kept tokens take consecutive slots in index order
    dest = torch.where(keep, slot, torch.full_like(slot, -1))
    dest[:, 0::2] = torch.where(merged[:, 0::2], slot.gather(1, partner), dest[:, 0::2])
    kept = keep.sum(1)
    m_out = int(kept.max()) if b else 0
    # anchor[b, slot] = the kept token in that slot (one scatter; padding slots stay -1, dropped to a dump column)
    anchor = torch.full((b, m_out + 1), -1, dtype=torch.long, device=dev)
    anchor.scatter_(1, torch.where(keep, slot, torch.full_like(slot, m_out)), ar.expand(b, n))
    return dest, anchor[:, :m_out]


# ---------------------------------------------------------------------------------- DivPrune max-min diversity
def maxmin_diversity(metric: Tensor, k: Tensor | int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Greedy max-min diversity selection on cosine distance (DivPrune, Alvar et al., CVPR 2025).

    As the reference (vbdi/divprune): with ``d(i, j) = 1 - cos(metric_i, metric_j)``, the first pick is the
    token whose nearest other token is farthest (``argmax_j min_{i != j} d(i, j)``); each next pick is the
    token farthest from the picked set (``argmax_j min_{s in S} d(s, j)``). Picked tokens are never picked
    again (the reference relies on ``d(s, s) ~ 0`` for that; we exclude them explicitly). Ties go to the
    lower index. One Python step per pick, vectorised over the batch and the tokens.

    Args:
        metric: ``[B, N, C]`` features compared by cosine.
        k: ``[B]`` long (or an int) picks per row, capped at the row's valid count.
        mask: ``[B, N]`` bool valid tokens (never-picked padding); default all valid.

    Returns:
        ``idx [B, K]`` long in PICK order (``K = max(k)``) and ``valid [B, K]`` bool (rows with fewer picks
        are right-padded).
    """
    b, n, _ = metric.shape
    dev = metric.device
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=dev)
    k = torch.minimum(torch.as_tensor(k, device=dev, dtype=torch.long).expand(b), mask.sum(1))
    kmax = int(k.max()) if b else 0
    m = metric.to(torch.float32)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - m @ m.transpose(1, 2)  # [B, N, N]
    inf = float("inf")
    eye = torch.eye(n, dtype=torch.bool, device=dev)[None]
    nearest = dist.masked_fill(eye | ~mask[:, None, :], inf).amin(dim=-1)  # [B, N] distance to nearest other
    ninf = torch.full_like(nearest, -inf)
    idx = torch.zeros(b, kmax, dtype=torch.long, device=dev)
    picked = ~mask  # padding counts as "unavailable" from the start
    score = nearest
    rows = torch.arange(b, device=dev)
    for step in range(kmax):
        pick = torch.where(picked, ninf, score).argmax(dim=1)  # first index among ties
        idx[:, step] = pick
        picked = picked.clone()
        picked[rows, pick] = True
        d_new = dist[rows, pick]  # [B, N] distance of every token to the new pick
        score = d_new if step == 0 else torch.minimum(score, d_new)
    valid = torch.arange(kmax, device=dev)[None] < k[:, None]
    return idx, valid
