"""Shared tensor kernels. Pure torch, batch-first, no transformers; every method builds on these.

Selection kernels return indices (and a validity mask) so that one decision is applied to every field
of :class:`~vtcompress.tokens.VisualTokens` by its shared ``select`` / ``merge``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["topk_sorted", "bipartite_merge_plan"]


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


# ---------------------------------------------------------------------------------- bipartite merge plan (encoder ToMe)
def bipartite_merge_plan(
    metric: Tensor, r: Tensor | int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One round of ToMe bipartite soft matching (Bolya et al., arXiv 2210.09461), as a merge plan.

    Tokens alternate into set A (even indices) and set B (odd indices); each A token finds its most
    cosine-similar B token; the ``r[b]`` A tokens with the most similar match merge into it, every other
    token is kept. Only valid B tokens can receive; B tokens are never merged away, so no chains form.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe: the layer's head-mean attention keys).
        r: ``[B]`` long (or an int) tokens to merge away per row; capped at ``count // 2`` valid tokens.
        mask: ``[B, N]`` bool valid tokens, valid first (right padding); default all valid.

    Returns:
        ``dest [B, N]`` long, output slot of each token (``-1`` for padding) and ``anchor [B, M]`` long, the
        kept token each slot keeps (``-1`` for padding slots), slots in ascending token index, ``M`` = most
        tokens kept by any row — exactly the arguments of :meth:`VisualTokens.merge`. Ties go to the lower
        index (stable sort), so the plan is deterministic.
    """
    b, n, _ = metric.shape
    dev = metric.device
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=dev)
    r = torch.as_tensor(r, device=dev, dtype=torch.long).expand(b)
    r = torch.minimum(r.clamp(min=0), mask.sum(1) // 2)
    m = metric.to(torch.float32)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_idx = torch.arange(0, n, 2, device=dev)
    b_idx = torch.arange(1, n, 2, device=dev)
    scores = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # [B, Na, Nb] cosine similarity
    scores = scores.masked_fill(~mask[:, None, b_idx], float("-inf"))
    if b_idx.numel() == 0:  # a single token: nothing can merge
        best = torch.full((b, a_idx.numel()), float("-inf"), device=dev)
        match = torch.zeros((b, a_idx.numel()), dtype=torch.long, device=dev)
    else:
        best, match = scores.max(dim=-1)  # [B, Na]: each A token's best B partner
    best = best.masked_fill(~mask[:, a_idx], float("-inf"))
    order = best.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(a_idx.numel(), device=dev).expand_as(order))
    merged_a = (rank < r[:, None]) & torch.isfinite(best)
    merged = torch.zeros(b, n, dtype=torch.bool, device=dev)
    merged[:, a_idx] = merged_a
    keep = mask & ~merged
    # kept tokens take consecutive slots in index order, so the output stays in spatial order
    slot = keep.long().cumsum(1) - 1
    dest = torch.where(keep, slot, torch.full_like(slot, -1))
    partner = b_idx[match] if b_idx.numel() else match  # [B, Na] token index of the matched B token
    dest_a = torch.where(merged_a, slot.gather(1, partner), dest[:, a_idx])
    dest[:, a_idx] = dest_a
    kept = keep.sum(1)
    m_out = int(kept.max()) if b else 0
    ar = torch.arange(n, device=dev)
    order_kept = torch.where(keep, ar, ar + n).argsort(dim=1)[:, :m_out]
    anchor = torch.where(torch.arange(m_out, device=dev)[None] < kept[:, None], order_kept,
                         torch.full_like(order_kept, -1))
    return dest, anchor
