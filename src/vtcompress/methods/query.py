"""Query family: methods guided by the prompt, or by learned queries."""


# ==================================================================================================
# Trainable resamplers (issue #6): qformer, perceiver. Owned by the trainable-compressor work;
# machinery (lazy build, checkpoints, cell bookkeeping) in vtcompress.trainable.
# ==================================================================================================
from dataclasses import dataclass as _dataclass  # noqa: E402

import torch as _torch  # noqa: E402
from torch import nn as _nn  # noqa: E402

from ..compressor import register as _register  # noqa: E402
from ..tokens import VisualTokens as _VisualTokens  # noqa: E402
from ..trainable import Attention as _Attention  # noqa: E402
from ..trainable import FeedForward as _FeedForward  # noqa: E402
from ..trainable import TrainableCompressor as _TrainableCompressor  # noqa: E402


@_dataclass(eq=False)
class _Resampler(_TrainableCompressor):
    """Shared fields and query set-up of the learned-query resamplers.

    ``M = h * w`` output tokens (``(h, w)`` from the budget, :func:`~vtcompress.trainable.grid_for_budget`).
    With ``seed_queries`` (default) query ``i`` starts as the mean of cell ``i`` of the grid plus a learned
    embedding (zero at start; TokenPacker-style coarse queries), so an untrained resampler is exactly
    average pooling and training refines it; with ``seed_queries=False`` the queries are learned embeddings
    only, as in BLIP-2 / Flamingo (initialised N(0, 0.02)). Every layer is pre-LayerNorm with residuals whose
    output projections start at zero.

    Bookkeeping: the output tokens are not spatial (``spatial = False``); token ``i`` carries cell ``i``'s
    NOMINAL provenance: ``pos`` = the cell's first patch (evenly spaced anchors, raster order), ``size`` =
    the cell's patch count (``~N0 / M``; sizes sum to ``N0``), ``assign`` = the cell.
    """

    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2
    seed_queries: bool = True

    family = "query"
    stage = "projector"
    spatial = False
    grid_bound = True

    def check_fields(self) -> None:
        for name in ("num_layers", "num_heads", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.hidden_size is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    def _queries(self, cells: _VisualTokens):
        q = self.query[None].expand(cells.x.shape[0], -1, -1)
        return cells.x + q if self.seed_queries else q

    def _make_query(self, d: int) -> None:
        m = self.out_grid[0] * self.out_grid[1]
        init = _torch.zeros(m, d) if self.seed_queries else _torch.randn(m, d) * 0.02
        self.query = _nn.Parameter(init)


@_register
@_dataclass(eq=False)
class QFormer(_Resampler):
    """Q-Former-style resampler, trainable (BLIP-2, arXiv 2301.12597).

    ``M`` learned queries; each of ``num_layers`` blocks runs self-attention among the queries,
    cross-attention from the queries to the visual features ``x [B, N, D]`` (key padding from ``mask``) and
    an MLP, each as a pre-LN residual. Output ``[B, M, D]``, the queries' final states. (BLIP-2's Q-Former is
    a 12-layer BERT with post-LN and 32 queries; this is the small pre-LN form that fits a projector slot.)
    """

    name = "qformer"
    paper = "BLIP-2 Q-Former (arXiv 2301.12597), trainable"

    def build(self, d: int) -> None:
        self._make_query(d)
        self.norm_kv = _nn.LayerNorm(d)
        self.blocks = _nn.ModuleList()
        for _ in range(self.num_layers):
            blk = _nn.Module()
            blk.norm_sa, blk.self_attn = _nn.LayerNorm(d), _Attention(d, self.num_heads)
            blk.norm_ca, blk.cross_attn = _nn.LayerNorm(d), _Attention(d, self.num_heads)
            blk.norm_ff, blk.ff = _nn.LayerNorm(d), _FeedForward(d, mult=self.mlp_ratio)
            self.blocks.append(blk)

    def transform(self, tokens: _VisualTokens, cells: _VisualTokens):
        q = self._queries(cells)
        kv = self.norm_kv(tokens.x)
        for blk in self.blocks:
            h = blk.norm_sa(q)
            q = q + blk.self_attn(h, h)
            q = q + blk.cross_attn(blk.norm_ca(q), kv, tokens.mask)
            q = q + blk.ff(blk.norm_ff(q))
        return q


@_register
@_dataclass(eq=False)
class PerceiverResampler(_Resampler):
    """Perceiver resampler, trainable (Flamingo, arXiv 2204.14198).

    ``M`` learned latents; each of ``num_layers`` blocks lets the latents attend to the concatenation
    ``[LN(x); LN(latents)]`` (keys / values; the visual part masked by ``mask``) and then runs an MLP, both as
    residuals. Output ``[B, M, D]``. (Flamingo ends with a LayerNorm; we leave it out so the output stays in
    the LLM's input scale, which the identity-like start relies on.)
    """

    name = "perceiver"
    paper = "Flamingo Perceiver resampler (arXiv 2204.14198), trainable"

    def build(self, d: int) -> None:
        self._make_query(d)
        self.blocks = _nn.ModuleList()
        for _ in range(self.num_layers):
            blk = _nn.Module()
            blk.norm_x, blk.norm_q, blk.attn = _nn.LayerNorm(d), _nn.LayerNorm(d), _Attention(d, self.num_heads)
            blk.norm_ff, blk.ff = _nn.LayerNorm(d), _FeedForward(d, mult=self.mlp_ratio)
            self.blocks.append(blk)

    def transform(self, tokens: _VisualTokens, cells: _VisualTokens):
        q = self._queries(cells)
        b, m, _ = q.shape
        key_mask = _torch.cat([tokens.mask, _torch.ones(b, m, dtype=_torch.bool, device=q.device)], dim=1)
        for blk in self.blocks:
            h = blk.norm_q(q)
            q = q + blk.attn(h, _torch.cat([blk.norm_x(tokens.x), h], dim=1), key_mask)
            q = q + blk.ff(blk.norm_ff(q))
        return q
