"""Shared tensor kernels. Pure torch, batch-first, no transformers; every method builds on these.

Selection kernels return indices (and a validity mask) so that one decision is applied to every field
of :class:`~vtcompress.tokens.VisualTokens` by its shared ``select`` / ``merge``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["topk_sorted"]


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
