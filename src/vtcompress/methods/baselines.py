"""Baselines: random and uniform-stride token selection, the controls every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..compressor import Compressor, ScoreCompressor, register
from ..tokens import VisualTokens


# ==================================================================================================
# random
# ==================================================================================================
@register
@dataclass
class RandomPrune(ScoreCompressor):
    """Keep a random subset of the budget's size (the baseline UniPruneBench / VTC-Bench find strong).

    The score of a token is a uniform draw indexed by its ``pos`` from a generator seeded with ``seed``:
    the same call gives the same tokens, and an image's choice does not depend on the rest of the batch
    (batched == one image at a time). Every image of the same grid therefore keeps the same positions
    for a given seed; vary ``seed`` to draw another subset.
    """

    budget: int | float = 0.5
    seed: int = 0

    name: ClassVar[str] = "random"
    family: ClassVar[str] = "baseline"
    paper: ClassVar[str] = "random pruning (baseline)"
    matches_reference: ClassVar[str] = "n/a (baseline)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0; got {self.seed!r}")

    def score(self, tokens: VisualTokens):
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        draws = torch.rand(tokens.num_patches, generator=gen, dtype=torch.float64).to(tokens.x.device)
        return draws[tokens.pos]


# ==================================================================================================
# uniform
# ==================================================================================================
@register
@dataclass
class UniformPrune(Compressor):
    """Keep the budget's ``k`` tokens evenly spread over the image (uniform grid stride).

    On a complete grid (``tokens.layout = (H, W)`` and every token valid) the picks form a 2-D lattice:
    ``h' = round(sqrt(k H / W))`` rows (clamped to ``[ceil(k / W), min(H, k)]``) at the centres of ``h'``
    equal bands, row ``j`` holding ``k_j = ceil((j+1) k / h') - ceil(j k / h')`` picks at the centres of
    ``k_j`` equal column bands; e.g. ``k = 144`` on 24x24 keeps rows and columns 1, 3, ..., 23 (one patch
    per 2x2 block). Otherwise (pruned or ragged rows) the ``k`` picks are evenly spaced over the row's ``n``
    valid tokens in raster order, pick ``i`` at ``floor((i + 1/2) n / k)``. Exactly ``k`` tokens, kept in
    spatial order; the full budget keeps everything.
    """

    budget: int | float = 0.5

    name: ClassVar[str] = "uniform"
    family: ClassVar[str] = "baseline"
    paper: ClassVar[str] = "uniform grid stride (baseline)"
    matches_reference: ClassVar[str] = "n/a (baseline)"

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        k = self.keep_counts(tokens)  # [B]
        n = tokens.counts
        dev = tokens.x.device
        kmax = int(k.max()) if tokens.batch_size else 0
        i = torch.arange(kmax, device=dev)[None]  # [1, K]
        valid = i < k[:, None]
        kc = k.clamp(min=1)[:, None]
        idx = ((2 * i + 1) * n[:, None]) // (2 * kc)  # 1-D even spacing over the valid tokens
        if tokens.layout is not None:
            hh, ww = tokens.layout
            full = n == hh * ww
            kf = k.clamp(min=1).to(torch.float64)
            hp = torch.round(torch.sqrt(kf * hh / ww)).to(torch.long)
            hp = torch.maximum(hp, (k + ww - 1) // ww)
            hp = torch.minimum(hp, torch.minimum(k, torch.full_like(k, hh))).clamp(min=1)[:, None]
            j = (i * hp) // kc  # band row of pick i
            first = (j * kc + hp - 1) // hp  # first pick of band j: ceil(j k / h')
            k_j = ((j + 1) * kc + hp - 1) // hp - first
            row = ((2 * j + 1) * hh) // (2 * hp)
            col = ((2 * (i - first) + 1) * ww) // (2 * k_j.clamp(min=1))
            idx = torch.where(full[:, None], row * ww + col, idx)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        return tokens.select(idx, valid)

