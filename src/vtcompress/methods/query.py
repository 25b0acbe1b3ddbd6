"""Query family: methods guided by the prompt, or by learned queries."""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..compressor import DecoderCompressor, QueryKind, Signal, Stage, StageContext, keep_counts, register
from ..ops import topk_sorted
from ..tokens import VisualTokens
from ..trainable import Attention, FeedForward, TrainableCompressor

# ==================================================================================================
# Trainable resamplers: qformer, perceiver.
# Machinery (lazy build, checkpoints, cell bookkeeping) in vtcompress.trainable.
# ==================================================================================================


@dataclass(eq=False)
class _Resampler(TrainableCompressor):
    """Shared fields and query set-up of the learned-query resamplers.

    ``M = h * w`` output tokens (``(h, w)`` from the budget, :func:`~vtcompress.grid.grid_for_budget`).
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
    stage = Stage.PROJECTOR
    spatial = False
    grid_bound = True

    def check_fields(self) -> None:
        for name in ("num_layers", "num_heads", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.hidden_size is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    def _queries(self, cells: VisualTokens):
        q = self.query[None].expand(cells.x.shape[0], -1, -1)
        return cells.x + q if self.seed_queries else q

    def _make_query(self, d: int) -> None:
        m = self.out_grid[0] * self.out_grid[1]
        init = torch.zeros(m, d) if self.seed_queries else torch.randn(m, d) * 0.02
        self.query = nn.Parameter(init)


@register
@dataclass(eq=False)
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
        self.norm_kv = nn.LayerNorm(d)
        self.blocks = nn.ModuleList()
        for _ in range(self.num_layers):
            blk = nn.Module()
            blk.norm_sa, blk.self_attn = nn.LayerNorm(d), Attention(d, self.num_heads)
            blk.norm_ca, blk.cross_attn = nn.LayerNorm(d), Attention(d, self.num_heads)
            blk.norm_ff, blk.ff = nn.LayerNorm(d), FeedForward(d, mult=self.mlp_ratio)
            self.blocks.append(blk)

    def transform(self, tokens: VisualTokens, cells: VisualTokens):
        q = self._queries(cells)
        kv = self.norm_kv(tokens.x)
        for blk in self.blocks:
            h = blk.norm_sa(q)
            q = q + blk.self_attn(h, h)
            q = q + blk.cross_attn(blk.norm_ca(q), kv, tokens.mask)
            q = q + blk.ff(blk.norm_ff(q))
        return q


@register
@dataclass(eq=False)
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
        self.blocks = nn.ModuleList()
        for _ in range(self.num_layers):
            blk = nn.Module()
            blk.norm_x, blk.norm_q, blk.attn = nn.LayerNorm(d), nn.LayerNorm(d), Attention(d, self.num_heads)
            blk.norm_ff, blk.ff = nn.LayerNorm(d), FeedForward(d, mult=self.mlp_ratio)
            self.blocks.append(blk)

    def transform(self, tokens: VisualTokens, cells: VisualTokens):
        q = self._queries(cells)
        b, m, _ = q.shape
        key_mask = torch.cat([tokens.mask, torch.ones(b, m, dtype=torch.bool, device=q.device)], dim=1)
        for blk in self.blocks:
            h = blk.norm_q(q)
            q = q + blk.attn(h, torch.cat([blk.norm_x(tokens.x), h], dim=1), key_mask)
            q = q + blk.ff(blk.norm_ff(q))
        return q


# ==================================================================================================
# Decoder stage: SparseVLM — text raters, layer schedule, token recycling. Mechanics in
# vtcompress.models.decoder; shared base in methods/attention.py.
# ==================================================================================================


def text_raters(x: torch.Tensor, mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters: ``[B, T]`` bool prompt tokens whose relevance to the visual tokens is above the mean.

    Relevance of prompt token ``t`` = mean over the valid visual tokens ``n`` of ``softmax_t(x_n . text_t)``
    (``x [B, N, D]``, ``mask [B, N]``, ``text [B, T, D]``, ``text_mask [B, T]``), as the reference computes it once
    from the LLM's input embeddings (Gumpest/SparseVLMs ``modelling_sparse_llama.py``, "Select Text Raters"); a row
    where no token is above the mean (all equal) rates with all its tokens (the reference would select none).
    """
    logits = torch.einsum("bnd,btd->bnt", x.float(), text.float())
    logits = logits.masked_fill(~text_mask[:, None], float("-inf"))
    rel = logits.softmax(-1).nan_to_num(0.0) * mask[..., None]
    rel = rel.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    mean = (rel * text_mask).sum(1, keepdim=True) / text_mask.sum(1, keepdim=True).clamp(min=1)
    raters = (rel > mean) & text_mask
    return torch.where(raters.any(1, keepdim=True), raters, text_mask)


def dpc_knn(x: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor, return_score: bool = False):
    """Density-peaks clustering with k-NN density (DPC-kNN), as SparseVLM's recycling step (``utils.py``,
    ``cluster_and_merge``).

    Args:
        x: ``[B, M, D]`` candidate tokens; valid: ``[B, M]`` bool; clusters: ``[B]`` long clusters per row
            (``<=`` valid count).

    Returns:
        ``center [B, M]`` bool cluster centres and ``owner [B, M]`` long, the centre index each candidate joins
        (centres own themselves); with ``return_score`` also ``score [B, M]`` (the centre score, ``-inf`` for
        invalid). Density of a token = ``exp(-mean squared distance to its k nearest)`` with ``k`` = the row's
        cluster count (self included, as the reference); centres = the tokens with the largest ``density *
        distance to the nearest denser token``. Ties break towards the lower index (the reference adds random
        noise of 1e-6 to the densities instead), so the result is deterministic.
    """
    b, m, d = x.shape
    dev = x.device
    if m == 0:
        empty = (valid.clone(), torch.zeros(b, 0, dtype=torch.long, device=dev))
        return (*empty, torch.zeros(b, 0, device=dev)) if return_score else empty
    xf = x.float()
    dist = torch.cdist(xf, xf) / d**0.5
    big = dist.amax().clamp(min=1.0) * 4 + 1
    both = valid[:, :, None] & valid[:, None, :]
    dist = torch.where(both, dist, big)
    kk = int(clusters.clamp(min=1).max())
    kk = min(kk, m)
    near = dist.topk(kk, dim=-1, largest=False).values  # [B, M, kk]
    per_row_k = clusters.clamp(min=1, max=m)[:, None, None]
    use = torch.arange(kk, device=dev)[None, None] < per_row_k
    density = (-(near.square() * use).sum(-1) / use.sum(-1)).exp()
    idx = torch.arange(m, device=dev)
    # strict order on (density, -index): "denser" is well defined even for equal densities
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    denser &= both
    delta = torch.where(denser, dist, big).amin(-1)
    row_max = torch.where(both, dist, torch.zeros((), device=dev)).flatten(1).amax(-1)
    delta = torch.where(denser.any(-1), delta, row_max[:, None])
    score = (delta * density).masked_fill(~valid, float("-inf"))
    cidx, cvalid = topk_sorted(score, clusters, valid)
    center = torch.zeros(b, m + 1, dtype=torch.bool, device=dev)
    center.scatter_(1, torch.where(cvalid, cidx, torch.full_like(cidx, m)), True)
    center = center[:, :m]
    to_center = torch.where(center[:, None, :], dist, big + 1)
    owner = to_center.argmin(-1)
    owner = torch.where(center, idx[None].expand(b, -1), owner)
    return (center, owner, score) if return_score else (center, owner)


@register
@dataclass
class SparseVLM(DecoderCompressor):
    """SparseVLM (Zhang et al., arXiv 2410.04417; Gumpest/SparseVLMs ``modelling_sparse_llama.py``, ``score.py``,
    ``utils.py``, v1.0): text-guided pruning inside the LLM.

    * Raters (:meth:`rate`, :func:`text_raters`): chosen ONCE, from the LLM's input embeddings, among the prompt
      tokens after the image (the mechanics then query only them; a pure call rates from ``x`` and ``text``).
    * Schedule: ``layers`` are the reference's (default 2, 6, 15 of ``ref_depth`` 32): the reference prunes layer
      ``l``'s OUTPUT with layer ``l``'s own attention, i.e. before layer ``l + 1`` with the attention of the layer
      before it, which is our stage layer ``K = l + 1`` (:meth:`schedule`; ``l`` is scaled to the depth first).
      Score of each visual token = the head-mean attention it receives from the raters (``attn [B, N, Q]``,
      averaged over the valid query rows).
    * Counts: with ``stage_tokens`` (the reference's hand-set lists for 576-token LLaVA-1.5 images, e.g.
      ``(300, 200, 110)`` for its 192 setting) stage ``s`` selects ``min(stage_tokens[s], n - 1)`` tokens and the
      recycled ones come on top, as the reference. Without it (default) the stages shrink geometrically to the
      budget (stage ``s`` of ``S`` keeps ``round(n * (target / n) ** (1 / (S - s)))`` of the ``n`` it receives)
      and the recycled tokens count towards the stage's count, so the budget is exact.
    * Recycling (as the reference): of the ``p`` tokens a stage prunes, the ``int(recycle * p) + 1`` with the
      highest scores are clustered by :func:`dpc_knn` into ``int(cluster_ratio * m) + 1`` tokens (``m``
      candidates) whose features are the members' means (the reference divides by ``count + 1e-6``); the merged
      tokens follow the kept ones of their image, in the order of their centre scores.
    * Positions: compact (the reference renumbers: ``position_ids[:, :new_length]``).
    """

    budget: int | float = 0.33
    layers: tuple[int, ...] = (2, 6, 15)
    ref_depth: int = 32
    recycle: float = 0.3
    cluster_ratio: float = 0.1
    stage_tokens: tuple[int, ...] | None = None

    name: ClassVar[str] = "sparsevlm"
    family: ClassVar[str] = "query"
    paper: ClassVar[str] = "SparseVLM (arXiv 2410.04417)"
    needs: ClassVar[tuple[Signal, ...]] = (Signal.ATTN, Signal.TEXT)
    query: ClassVar[QueryKind] = QueryKind.TEXT
    uses_context: ClassVar[bool] = True
    positions: ClassVar[str] = "compact"
    matches_reference: ClassVar[str] = ("exact with stage_tokens (the reference's hand-set lists, e.g. 300/200/110); "
                                        "default: geometric per-stage counts")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_stage_layers(minimum=0)
        for name in ("recycle", "cluster_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1]; got {v!r}")
        if self.stage_tokens is not None:
            self.stage_tokens = tuple(self.stage_tokens)
            if len(self.stage_tokens) != len(self.layers) or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.stage_tokens):
                raise ValueError(f"stage_tokens must be None or one int >= 1 per stage layer ({len(self.layers)}); "
                                 f"got {self.stage_tokens!r}")

    def schedule(self, num_layers: int) -> tuple[int, ...]:
        if num_layers < 2:
            raise ValueError(f"decoder-stage pruning needs a decoder of at least 2 layers; got {num_layers}")
        out = {min(max(int(round(layer * num_layers / self.ref_depth)), 0), num_layers - 2) + 1
               for layer in self.layers}
        if self.stage_tokens is not None and len(out) != len(self.layers):
            raise ValueError(f"{self.name}: layers {self.layers} collapse to {sorted(out)} on a {num_layers}-layer "
                             "decoder; stage_tokens needs one distinct layer per entry")
        return tuple(sorted(out))

    def rate(self, x: torch.Tensor, mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` raters from the input embeddings of the visual (``x``) and prompt (``text``) tokens."""
        return text_raters(x, mask, text, text_mask)

    def score(self, tokens: VisualTokens, rated: bool = False) -> torch.Tensor:
        """``[B, N]`` mean attention from the raters (``attn [B, N, Q]`` over the valid query rows ``text_mask``;
        unless ``rated``, the raters are first chosen among them from ``x`` and ``text``)."""
        tmask = tokens.text_mask if tokens.text_mask is not None else torch.ones(
            tokens.attn.shape[0], tokens.attn.shape[2], dtype=torch.bool, device=tokens.x.device)
        raters = tmask if rated else text_raters(tokens.x, tokens.mask, tokens.text, tmask)
        w = raters.to(torch.float32)
        return (tokens.attn.float() * w[:, None]).sum(-1) / w.sum(-1, keepdim=True).clamp(min=1)

    def stage_counts(self, counts: torch.Tensor, stage: int, num_stages: int) -> torch.Tensor:
        """``[B]`` tokens kept by stage ``stage`` of ``num_stages`` from rows of ``counts`` tokens (geometric)."""
        n = counts.to(torch.float64)
        if isinstance(self.budget, int):
            target = n.clamp(max=self.budget)
            frac = (target / n.clamp(min=1)) ** (1.0 / max(num_stages - stage, 1))
        else:
            frac = torch.full_like(n, self.budget ** (1.0 / max(num_stages, 1)))
        k = torch.round(n * frac).to(torch.long)
        return torch.minimum(k.clamp(min=1), counts.to(torch.long))

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        return self.compress_stage(tokens, 0, 1)

    def compress_stage(self, tokens: VisualTokens, stage: int, num_stages: int = 1,
                       context: StageContext | None = None) -> VisualTokens:
        counts = tokens.counts
        score = self.score(tokens, rated=context is not None and context.rated)
        zero = torch.zeros_like(counts)
        if self.stage_tokens is not None:  # the reference: select min(list[s], n - 1), recycle on top
            k_sel = torch.minimum(torch.full_like(counts, self.stage_tokens[min(stage, len(self.stage_tokens) - 1)]),
                                  (counts - 1).clamp(min=0))
            pruned = counts - k_sel
        else:
            k = self.stage_counts(counts, stage, num_stages) if num_stages > 1 or isinstance(self.budget, int) \
                else keep_counts(self.budget, counts)
            pruned = counts - k
        m = torch.where(pruned > 0, torch.floor(pruned.to(torch.float64) * self.recycle).to(torch.long) + 1, zero)
        m = torch.minimum(m, pruned)
        c = torch.where(m > 0, torch.floor(m.to(torch.float64) * self.cluster_ratio + 1e-9).to(torch.long) + 1, zero)
        c = torch.minimum(c, m)
        if self.stage_tokens is None:  # the merged tokens count towards the stage's budget
            c = torch.minimum(c, (k - 1).clamp(min=0))
            k_sel = k - c
            m = torch.where(c > 0, m, zero)  # no cluster (k == 1): nothing is recycled
        sel_idx, sel_ok = topk_sorted(score, k_sel, tokens.mask)
        b, n = tokens.mask.shape
        dev = tokens.x.device
        selected = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
        selected.scatter_(1, torch.where(sel_ok, sel_idx, torch.full_like(sel_idx, n)), True)
        selected = selected[:, :n]
        if int(c.max()) == 0:
            return tokens.select(sel_idx, sel_ok)
        # recycling candidates: the best-scored pruned tokens
        rest = tokens.mask & ~selected
        cand_idx, cand_ok = topk_sorted(score, torch.minimum(m, rest.sum(1)), rest)
        xc = tokens.x.gather(1, cand_idx[..., None].expand(-1, -1, tokens.x.shape[2]))
        center, owner, cscore = dpc_knn(xc, cand_ok, torch.where(cand_ok.any(1), c, torch.zeros_like(c)),
                                        return_score=True)
        is_anchor = selected.clone()
        cand_center_tok = torch.where(center & cand_ok, cand_idx, torch.full_like(cand_idx, n))
        anchor_flag = torch.zeros(b, n + 1, dtype=torch.bool, device=dev).scatter_(1, cand_center_tok, True)
        is_anchor |= anchor_flag[:, :n]
        slot_of = is_anchor.long().cumsum(1) - 1
        dest = torch.where(selected, slot_of, torch.full_like(slot_of, -1))
        owner_tok = cand_idx.gather(1, owner)  # the token index of each candidate's centre
        cand_dest = slot_of.gather(1, owner_tok)
        cand_dest = torch.where(cand_ok, cand_dest, torch.full_like(cand_dest, -1))
        dest_ext = torch.cat([dest, torch.full((b, 1), -1, dtype=torch.long, device=dev)], dim=1)
        dest_ext.scatter_(1, torch.where(cand_ok, cand_idx, torch.full_like(cand_idx, n)), cand_dest)
        dest = dest_ext[:, :n]
        n_slots = is_anchor.sum(1)
        mm = int(n_slots.max())
        ar = torch.arange(n, device=dev)
        anchor = torch.where(is_anchor, ar, ar + n).argsort(dim=1)[:, :mm]
        anchor = torch.where(torch.arange(mm, device=dev)[None] < n_slots[:, None], anchor,
                              torch.full_like(anchor, -1))
        out = tokens.merge(dest, anchor)
        if context is not None:
            # the reference orders its merged tokens by centre score (topk order): rank of each centre
            cs = torch.where(center & cand_ok, cscore, torch.full_like(cscore, float("-inf")))
            crank = cs.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # [B, M] rank among candidates
            tok_rank = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
            tok_rank.scatter_(1, cand_center_tok, torch.where(center & cand_ok, crank, torch.full_like(crank, -1)))
            tok_rank = tok_rank[:, :n]
            out_rank = tok_rank.gather(1, anchor.clamp(min=0))
            context.merge_rank = torch.where((anchor >= 0) & ~selected.gather(1, anchor.clamp(min=0)), out_rank,
                                             torch.full_like(out_rank, -1))
        return out
