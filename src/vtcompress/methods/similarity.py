"""Similarity family: methods that merge or select tokens by how alike they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..compressor import Compressor, register
from ..ops import bipartite_soft_matching, maxmin_diversity
from ..tokens import VisualTokens


def _metric(tokens: VisualTokens) -> Tensor:
    """``[B, N, C]``: the vision encoder's keys when carried (what ToMe / DivPrune compare), else the features."""
    return tokens.keys if tokens.keys is not None else tokens.x


def _check_nonneg_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value!r}")


# ==================================================================================================
# ToMe (projector stage)
# ==================================================================================================
@register
@dataclass
class ToMe(Compressor):
    """Token Merging by bipartite soft matching (Bolya et al., ICLR 2023, arXiv 2210.09461; facebookresearch/ToMe).

    Applied once to the encoder's output ``x [B, N, D]``, in rounds: each round runs
    :func:`~vtcompress.ops.bipartite_soft_matching` (alternating A/B split, cosine similarity of ``keys``
    when the tokens carry them, else of ``x``; each A token's best B edge; the top ``r`` edges merge with a
    size-weighted mean, sizes tracked) and merges ``r = min(count - target, (count - protect) // 2, max_r)``
    tokens (``max_r = 0``: no extra cap), until every image has its budget. Keys are merged with the same
    weights, so later rounds compare merged tokens, as ToMe's next layer does.

    Count produced per image: the budget's ``k`` (:meth:`Compressor.keep_counts`), but never fewer than
    ``protect + 1`` tokens (with fewer than two unprotected tokens nothing can merge); an int budget below
    ``protect + 1`` raises. Each merged token keeps the ``pos`` of its B (destination) token.

    Fields:
        protect: leading tokens (e.g. a [CLS] or register tokens kept in the sequence) never merged.
        max_r: most tokens merged per round (``0``: as many as the bipartite split allows).
    """

    budget: int | float = 0.5
    protect: int = 0
    max_r: int = 0

    name: ClassVar[str] = "tome"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "arXiv:2210.09461"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_nonneg_int("protect", self.protect)
        _check_nonneg_int("max_r", self.max_r)
        if isinstance(self.budget, int) and self.budget < self.protect + 1:
            raise ValueError(f"budget={self.budget} tokens is below protect + 1 = {self.protect + 1}: the protected "
                             "tokens plus at least one merged token always remain")

    def target_counts(self, tokens: VisualTokens) -> Tensor:
        """``[B]`` tokens each image ends with (the documented count)."""
        counts = tokens.counts
        floor = torch.clamp(counts, max=self.protect + 1)
        return torch.maximum(self.keep_counts(tokens), floor)

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        target = self.target_counts(tokens)
        while True:
            counts = tokens.counts
            r = torch.minimum(counts - target, (counts - self.protect).clamp(min=0) // 2)
            if self.max_r:
                r = r.clamp(max=self.max_r)
            if not bool((r > 0).any()):
                return tokens
            dest, anchor = bipartite_soft_matching(_metric(tokens), r, tokens.mask, self.protect)
            tokens = tokens.merge(dest, anchor)


# ==================================================================================================
# DivPrune
# ==================================================================================================
@register
@dataclass
class DivPrune(Compressor):
    """DivPrune: diversity-based visual token pruning (Alvar et al., CVPR 2025, arXiv 2503.02175; vbdi/divprune).

    Keeps the budget's ``k`` tokens chosen by greedy max-min cosine distance
    (:func:`~vtcompress.ops.maxmin_diversity`) over the features ``x [B, N, D]`` (the reference uses the
    projected visual features; ``use_keys=True`` compares the encoder keys instead). Kept tokens in spatial
    order.
    """

    budget: int | float = 0.5
    use_keys: bool = False

    name: ClassVar[str] = "divprune"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "arXiv:2503.02175"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_keys, bool):
            raise ValueError(f"use_keys must be a bool; got {self.use_keys!r}")

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        if self.use_keys and tokens.keys is None:
            raise ValueError("divprune(use_keys=True) needs the 'keys' signal, which these tokens do not carry")
        metric = tokens.keys if self.use_keys else tokens.x
        idx, valid = maxmin_diversity(metric, self.keep_counts(tokens), tokens.mask)
        n = tokens.num_tokens
        order = torch.where(valid, idx, idx + n).argsort(dim=1)  # picks back to spatial order
        return tokens.select(idx.gather(1, order), valid.gather(1, order))
