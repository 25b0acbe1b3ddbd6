"""Attention family: methods that rank tokens by attention (vision encoder [CLS] or LLM decoder)."""

# ==================================================================================================
# Projector stage: FasterVLM, VisionZip, PruMerge, PruMerge+ — [CLS]-attention methods on the
# vision encoder's output. Keys (``tokens.keys``) are the similarity metric when carried, else ``x``.
#
# Each one follows its reference by default (tests/reference/test_ref_projector.py re-types them):
# - the signal layer (``signal_layer=None``: the vision layer whose output the LLM reads, see
#   vtcompress.models.apply; PruMerge: -1, the tower's last layer) and head reduction (``signal_heads``);
# - the point of action (``acts_on``: "vision" = the tower's features before the multimodal projector);
# - the order in which the LLM receives the tokens (:meth:`llm_order`, used with compact positions);
# - LLM positions: compact (the LLaVA code base simply feeds fewer tokens; ``Compressor.positions``).
# ==================================================================================================
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..compressor import (
    Compressor,
    DecoderCompressor,
    ScoreCompressor,
    Signal,
    SignalLayer,
    StageContext,
    register,
)
from ..ops import flag_indices, topk_sorted
from ..tokens import VisualTokens

_ACTS_ON = ("vision", "projected")
_HEADS = ("mean", "full")


def _unit(t: Tensor) -> Tensor:
    t = t.to(torch.float32)
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _metric(tokens: VisualTokens) -> Tensor:
    """``[B, N, C]``: the keys when the tokens carry them (what the references compare), else ``x``."""
    return tokens.keys if tokens.keys is not None else tokens.x


def _flag(idx: Tensor, valid: Tensor, n: int) -> Tensor:
    """``[B, N]`` bool with True at the valid entries of ``idx [B, K]``."""
    out = torch.zeros(idx.shape[0], n + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(1, torch.where(valid, idx, torch.full_like(idx, n)), True)
    return out[:, :n]


def _check_signal_fields(m) -> None:
    """Validate the ``signal_layer`` / ``signal_heads`` / ``acts_on`` fields of a [CLS]-attention method."""
    sl = m.signal_layer
    if sl is not None and (isinstance(sl, bool) or not isinstance(sl, int)):
        raise ValueError(f"signal_layer must be None (the vision layer whose output the LLM reads) or an int "
                         f"layer index (negative from the end); got {sl!r}")
    if m.signal_heads not in _HEADS:
        raise ValueError(f"signal_heads={m.signal_heads!r}; allowed: 'mean' (head-mean attention and keys), "
                         "'full' (one full-width head: q.k over all channels scaled by C^-1/2)")
    if m.acts_on not in _ACTS_ON:
        raise ValueError(f"acts_on={m.acts_on!r}; allowed: 'vision' (the vision tower's features, before the "
                         "multimodal projector), 'projected' (the projector's output)")


def _order_keys(after: VisualTokens, first: Tensor, rank: Tensor) -> Tensor:
    """``[B, M]`` float LLM-order keys of ``after``'s tokens: tokens whose anchor ``pos`` is flagged in
    ``first [B, N0]`` come first by ``rank [B, N0]``, the others after them in spatial order."""
    n0 = after.num_patches
    pos = after.pos.clamp(min=0, max=n0 - 1)
    lead = first.gather(1, pos)
    key = torch.where(lead, rank.gather(1, pos).to(torch.float64), (2 * n0 + after.pos).to(torch.float64))
    return key.masked_fill(~after.mask, float("inf"))


def _by_pos(before: VisualTokens, values: Tensor, fill) -> Tensor:
    """``values [B, N]`` of ``before``'s tokens spread onto their anchor patches ``[B, N0]``."""
    b, n0 = before.assign.shape
    out = torch.full((b, n0 + 1), fill, dtype=values.dtype, device=values.device)
    out.scatter_(1, torch.where(before.mask, before.pos, torch.full_like(before.pos, n0)), values)
    return out[:, :n0]


# --------------------------------------------------------------------------------------------- FasterVLM
@register
@dataclass
class FasterVLM(ScoreCompressor):
    """FasterVLM ("[CLS] Attention is All You Need for Training-Free Visual Token Pruning", arXiv 2412.01818).

    Keeps the budget's top-k tokens by the attention they receive from the vision encoder's [CLS]
    (``cls_attn [B, N]``: head mean of the [CLS] row in the vision layer whose output the LLM reads,
    ``vision_feature_layer``, -2 for LLaVA-1.5), in spatial order. Selection only, so acting on the vision
    features (``acts_on="vision"``) or on the projected ones keeps the same set.
    """

    budget: int | float = 0.5
    signal_layer: int | None = None
    signal_heads: str = "mean"
    acts_on: str = "projected"

    name: ClassVar[str] = "fastervlm"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "FasterVLM (arXiv 2412.01818)"
    needs: ClassVar[tuple[Signal, ...]] = (Signal.CLS_ATTN,)
    matches_reference: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_signal_fields(self)

    def score(self, tokens: VisualTokens) -> Tensor:
        return tokens.cls_attn.float()


# --------------------------------------------------------------------------------------------- VisionZip
@register
@dataclass
class VisionZip(Compressor):
    """VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467; dvlab-research/VisionZip): dominant + contextual.

    As ``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``). Of the budget's ``k`` tokens per
    image, ``d = round(k * dominant_ratio)`` are *dominant*: the top ``d`` by ``cls_attn [B, N]`` (the [CLS]
    row of the layer whose output the LLM reads; the reference sums it over heads, the same ranking as our
    head mean). The other ``c = k - d`` are *contextual*: of the ``R`` remaining tokens, in spatial order,
    those at ranks ``0, s, 2s, ...`` with ``s = max(1, R // c)`` (the first ``c``) are targets; every other
    remaining token joins the target with the highest cosine similarity of keys (head-mean keys of that
    layer, ``tokens.keys``; ``x`` when absent), and each contextual token is **target + mean(tokens assigned
    to it)** (the reference's ``target_hidden + aggregated_hidden``; a target nobody joins stays itself; the
    mean is size-weighted, the reference's plain mean when sizes are 1). The reference merges the vision
    tower's features before the multimodal projector (``acts_on="vision"``, the default).

    Output: exactly ``k`` tokens (each contextual token anchored at its target). Provenance: every valid patch
    is kept or assigned, so sizes sum to the patch count, except when ``c = 0`` (``dominant_ratio = 1``, or
    ``k = 1``): the remaining tokens are dropped. LLM order (:meth:`llm_order`, with compact positions): the
    dominant tokens in spatial order, then the contextual ones in target order, as the reference concatenates.

    Budget and the paper's 54 + 10: ``visionzip(model, dominant=54, contextual=10)`` keeps ``dominant - 1 = 53``
    patches plus the [CLS] feature, then 10 contextual tokens: 64 tokens into the LLM, [CLS] first. Our int
    budget counts image tokens into the LLM too, but patches only: the default ``dominant_ratio = 54 / 64``
    at ``budget=64`` gives 54 dominant patches + 10 contextual (the [CLS] slot goes to one more patch). To
    reproduce the reference exactly, keep the [CLS] feature (``vision_feature_select_strategy="full"``: it
    is an always-kept prefix token) and use ``budget=63, dominant_ratio=53 / 63``: [CLS] + 53 + 10 = 64.
    """

    budget: int | float = 0.5
    dominant_ratio: float = 54 / 64
    signal_layer: int | None = None
    signal_heads: str = "mean"
    acts_on: str = "vision"

    name: ClassVar[str] = "visionzip"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "VisionZip (arXiv 2412.04467)"
    needs: ClassVar[tuple[Signal, ...]] = (Signal.CLS_ATTN, Signal.KEYS)
    matches_reference: ClassVar[str] = ("exact with vision_feature_select_strategy='full', budget=63, "
                                        "dominant_ratio=53/63 (the reference's [CLS] slot)")

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.dominant_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"dominant_ratio must be a number in [0, 1] (share of the budget kept as dominant "
                             f"tokens; the rest are contextual); got {r!r}")
        _check_signal_fields(self)

    def split_counts(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        """``(d, c)`` ``[B]`` dominant and contextual tokens per image."""
        k = self.keep_counts(tokens)
        d = torch.round(k.to(torch.float64) * self.dominant_ratio).to(torch.long).clamp(max=k)
        return d, k - d

    def _dominant(self, tokens: VisualTokens, d: Tensor) -> Tensor:
        idx, valid = topk_sorted(tokens.cls_attn, d, tokens.mask)
        return _flag(idx, valid, tokens.num_tokens)

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        d, c = self.split_counts(tokens)
        if bool(((d + c) == tokens.counts).all()):
            return tokens  # everything kept: nothing to merge
        dominant = self._dominant(tokens, d)
        rest = tokens.mask & ~dominant
        rank = rest.long().cumsum(1) - 1  # rank among the remaining tokens, in spatial order
        step = (rest.sum(1) // c.clamp(min=1)).clamp(min=1)[:, None]
        target = rest & (rank % step == 0) & (rank // step < c[:, None])
        others = rest & ~target
        kept = dominant | target
        slot = kept.long().cumsum(1) - 1
        dest = torch.where(kept, slot, torch.full_like(slot, -1))
        t_idx, t_valid = flag_indices(target)
        if t_idx.shape[1]:  # rows without contextual tokens (c = 0) drop their remaining tokens
            m = _unit(_metric(tokens))
            sim = m @ m.gather(1, t_idx[..., None].expand(-1, -1, m.shape[-1])).transpose(1, 2)  # [B, N, C]
            best = sim.masked_fill(~t_valid[:, None, :], float("-inf")).argmax(dim=-1)  # first on ties
            dest = torch.where(others & (c[:, None] > 0), slot.gather(1, t_idx.gather(1, best)), dest)
        anchor, a_valid = flag_indices(kept)
        anchor = torch.where(a_valid, anchor, torch.full_like(anchor, -1))
        out = tokens.merge(dest, anchor)
        # x: each kept token itself, plus (contextual) the size-weighted mean of the others assigned to it
        b, n, dim = tokens.x.shape
        mslots = anchor.shape[1]
        joined = others & (dest >= 0)
        into = torch.where(joined, dest, torch.full_like(dest, mslots))
        w = torch.where(joined, tokens.size.to(torch.float32), torch.zeros_like(tokens.size, dtype=torch.float32))
        acc = torch.zeros(b, mslots + 1, dim, device=tokens.x.device, dtype=torch.float32)
        acc.scatter_add_(1, into[..., None].expand(-1, -1, dim), tokens.x.to(torch.float32) * w[..., None])
        den = torch.zeros(b, mslots + 1, device=tokens.x.device, dtype=torch.float32).scatter_add_(1, into, w)
        mean = acc[:, :mslots] / den[:, :mslots, None].clamp_min(1e-12)
        own = tokens.x.gather(1, anchor.clamp(min=0)[..., None].expand(-1, -1, dim)).to(torch.float32)
        x = torch.where(a_valid[..., None], own + mean, torch.zeros_like(own))
        return out.replace(x=x.to(tokens.x.dtype))

    def llm_order(self, before: VisualTokens, after: VisualTokens) -> Tensor:
        """``[B, M]`` keys of the reference's LLM order of ``after = self(before)``: dominant tokens (spatial
        order), then contextual tokens (target order)."""
        d, c = self.split_counts(before)
        if bool(((d + c) == before.counts).all()):
            return after.pos.to(torch.float64).masked_fill(~after.mask, float("inf"))  # all kept: the identity
        dom = _by_pos(before, self._dominant(before, d), False)
        n0 = after.num_patches
        return _order_keys(after, dom, torch.arange(n0, device=dom.device).expand_as(dom))


# --------------------------------------------------------------------------------------------- PruMerge
def iqr_outliers(scores: Tensor, mask: Tensor) -> Tensor:
    """``[B, N]`` bool: valid entries of ``scores [B, N]`` above ``Q3 + 1.5 * IQR`` of their row's valid entries.

    Quartiles by linear interpolation (``numpy.percentile`` / ``torch.quantile`` default), computed in
    float64 per row over the valid entries only, as PruMerge's ``outlier_dectection`` (which flattens the
    whole batch: the same for its batch of one image).
    """
    s = scores.to(torch.float64)
    srt = s.masked_fill(~mask, float("inf")).sort(dim=1).values  # valid values first, ascending
    last = (mask.sum(1) - 1).clamp(min=0).to(torch.float64)[:, None]

    def quantile(q: float) -> Tensor:
        p = q * last
        lo, hi = p.floor().long(), p.ceil().long()
        vlo, vhi = srt.gather(1, lo), srt.gather(1, hi)
        return vlo + (vhi - vlo) * (p - lo)

    q1, q3 = quantile(0.25), quantile(0.75)
    return mask & (s > q3 + 1.5 * (q3 - q1))


def _reference_count(outliers: Tensor, counts: Tensor) -> Tensor:
    """``int(N * reduction_ratio)`` with ``reduction_ratio = outliers / N`` in float64, as the reference (its
    ``int()`` truncates: ``N * (o / N)`` can land just under ``o``)."""
    n = counts.to(torch.float64)
    return torch.floor(n * (outliers.to(torch.float64) / n.clamp(min=1))).to(torch.long)


def knn_absorb(tokens: VisualTokens, kept: Tensor, rank: Tensor, k_neighbors: int,
               summary_token: bool = True) -> VisualTokens:
    """PruMerge's merge step (42Shawn/LLaVA-PruMerge ``clip_encoder.py``, ``token_prune_merge_advanced``).

    Each kept token ``i`` (``kept [B, N]``) becomes ``x_i + sum_j a_j x_j`` over its ``k_neighbors`` valid
    tokens most cosine-similar by keys (keys, else ``x``; candidates: every other valid token, kept or pruned,
    as the reference), ``a = cls_attn`` (a plain attention-weighted SUM, not a mean). With ``summary_token``
    one more token, ``sum over pruned j of a_j x_j``, stands for every pruned token (the reference's
    ``extra_one_token``); without it the pruned tokens are dropped.

    Provenance (``size`` / ``assign``, a partition): each kept token owns its own patch; the summary token owns
    every pruned patch and sits at the first of them (``pos``). The kept tokens' neighbour terms overlap (a
    token can be a neighbour of several kept tokens, and kept tokens are neighbours of each other): that soft
    mixing is not a partition and is not recorded. ``rank [B, N]`` (lower first) is unused here; it is the
    reference's order of the kept tokens, kept for :meth:`PruMerge.llm_order`.
    """
    b, n = tokens.mask.shape
    dev = tokens.x.device
    kept = kept & tokens.mask
    pruned = tokens.mask & ~kept
    summary = pruned & (pruned.long().cumsum(1) == 1) if summary_token else torch.zeros_like(pruned)
    anchor_flag = kept | summary
    slot = anchor_flag.long().cumsum(1) - 1
    anchor, a_valid = flag_indices(anchor_flag)
    anchor = torch.where(a_valid, anchor, torch.full_like(anchor, -1))
    first = torch.where(summary, slot, torch.zeros_like(slot)).sum(1, keepdim=True)  # the summary's slot
    dest = torch.where(kept, slot, torch.full_like(slot, -1))
    if summary_token:
        dest = torch.where(pruned & summary.any(1, keepdim=True), first.expand_as(dest), dest)
    out = tokens.merge(dest, anchor)

    x = tokens.x.to(torch.float32)
    attn = tokens.cls_attn.to(torch.float32).masked_fill(~tokens.mask, 0.0)
    m = _unit(_metric(tokens))
    ar = torch.arange(n, device=dev)
    k_idx, k_valid = flag_indices(kept)
    sim = m.gather(1, k_idx[..., None].expand(-1, -1, m.shape[-1])) @ m.transpose(1, 2)  # [B, K, N]
    cand = tokens.mask[:, None, :] & (ar[None, None, :] != k_idx[:, :, None]) & k_valid[:, :, None]
    kk = min(k_neighbors, n)
    top_val, top = sim.masked_fill(~cand, float("-inf")).topk(kk, dim=-1) if kk else (sim[..., :0], k_idx[..., :0])
    # a row with fewer candidates than k_neighbors takes them all (the reference would fail)
    wts = torch.where(torch.isfinite(top_val), attn.gather(1, top.flatten(1)).view_as(top_val),
                      torch.zeros_like(top_val))
    w = torch.zeros(b, k_idx.shape[1], n, device=dev, dtype=torch.float32).scatter_add_(-1, top, wts)
    own = x.gather(1, k_idx[..., None].expand(-1, -1, x.shape[-1]))
    upd = own + w @ x  # [B, K, D]: x_i + sum over neighbours of a_j x_j
    # place: kept token k_idx[:, t] -> its slot; the summary token -> its slot
    mslots = anchor.shape[1]
    xo = torch.zeros(b, mslots + 1, x.shape[-1], device=dev, dtype=torch.float32)
    into = torch.where(k_valid, slot.gather(1, k_idx), torch.full_like(k_idx, mslots))
    xo.scatter_(1, into[..., None].expand(-1, -1, x.shape[-1]), upd)
    if summary_token:
        tot = ((attn * pruned)[..., None] * x).sum(1)  # [B, D]
        has = summary.any(1)
        s_into = torch.where(has[:, None], first, torch.full_like(first, mslots))
        xo.scatter_(1, s_into[..., None].expand(-1, -1, x.shape[-1]), tot[:, None])
    return out.replace(x=xo[:, :mslots].to(tokens.x.dtype))


@register
@dataclass
class PruMerge(Compressor):
    """LLaVA-PruMerge (Shang et al., arXiv 2403.15388; 42Shawn/LLaVA-PruMerge): adaptive prune, then merge.

    As ``llava/model/multimodal_encoder/clip_encoder.py``, ``token_prune_merge_advanced``:

    - signals from the vision tower's LAST layer (``signal_layer=-1``) as one full-width head
      (``signal_heads="full"``: ``softmax(q k^T * C^-1/2)`` over all ``C`` channels of ``q_proj`` /
      ``k_proj``, keys full width), while the features are the layer the LLM reads (-2 for LLaVA-1.5);
    - kept: ``int(N * o / N)`` tokens, the top ones by ``cls_attn [B, N]``, where ``o`` counts the outliers
      above ``Q3 + 1.5 * IQR`` of the image's valid tokens (:func:`iqr_outliers`);
    - :func:`knn_absorb` with ``k_neighbors`` (32): each kept token adds the attention-weighted SUM of its
      nearest tokens by key; one summary token (``summary_token=True``) sums all pruned tokens weighted by
      attention, and owns their patches;
    - the features are the vision tower's, before the projector (``acts_on="vision"``);
    - LLM order (:meth:`llm_order`, with compact positions): kept tokens by descending attention, then the
      summary token, as the reference returns them.

    The count is adaptive; the **budget is a cap** on the tokens returned (the summary token included):
    ``kept <= k - 1`` with a summary token (default ``budget=1.0``: no cap in practice, the paper's behaviour).
    An image with no outlier keeps only its summary token, as the reference; with ``summary_token=False`` it
    keeps its top token instead (never 0 tokens).
    """

    budget: int | float = 1.0
    k_neighbors: int = 32
    summary_token: bool = True
    signal_layer: int | None = -1
    signal_heads: str = "full"
    acts_on: str = "vision"

    name: ClassVar[str] = "prumerge"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "LLaVA-PruMerge (arXiv 2403.15388)"
    needs: ClassVar[tuple[Signal, ...]] = (Signal.CLS_ATTN, Signal.KEYS)
    matches_reference: ClassVar[str] = "exact (where the reference runs)"

    def __post_init__(self) -> None:
        super().__post_init__()
        kn = self.k_neighbors
        if isinstance(kn, bool) or not isinstance(kn, int) or kn < 0:
            raise ValueError(f"k_neighbors must be an int >= 0 (neighbours each kept token adds); got {kn!r}")
        if not isinstance(self.summary_token, bool):
            raise ValueError(f"summary_token must be a bool (append the reference's token summing the pruned "
                             f"tokens); got {self.summary_token!r}")
        _check_signal_fields(self)

    def priority(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        """``(rank [B, N], count [B])``: the reference's keep order (0 first; invalid tokens last) and the
        adaptive kept count ``int(N * outliers / N)``."""
        attn = tokens.cls_attn.to(torch.float64)
        outliers = iqr_outliers(attn, tokens.mask)
        order = attn.masked_fill(~tokens.mask, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        return _rank(order), _reference_count(outliers.sum(1), tokens.counts)

    def _plan(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        """``(kept [B, N], rank [B, N])`` under the budget cap."""
        rank, count = self.priority(tokens)
        cap = self.keep_counts(tokens)
        if self.summary_token:
            # the summary token counts against the cap when something is pruned
            cap = torch.where(cap < tokens.counts, cap - 1, cap).clamp(min=0)
            count = torch.minimum(count, cap)
        else:
            count = torch.minimum(count.clamp(min=1), cap)
        kept = (rank < count[:, None]) & tokens.mask
        return kept, rank

    def kept_counts(self, tokens: VisualTokens) -> Tensor:
        """``[B]`` tokens returned per image: the kept ones, plus the summary token when any is pruned."""
        kept, _ = self._plan(tokens)
        k = kept.sum(1)
        return k + ((k < tokens.counts) & self.summary_token).long()

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        kept, rank = self._plan(tokens)
        return knn_absorb(tokens, kept, rank, self.k_neighbors, self.summary_token)

    def llm_order(self, before: VisualTokens, after: VisualTokens) -> Tensor:
        """``[B, M]`` keys of the reference's LLM order of ``after = self(before)``: kept tokens in priority
        order, then the summary token."""
        kept, rank = self._plan(before)
        return _order_keys(after, _by_pos(before, kept, False), _by_pos(before, rank, 0))


def _rank(order: Tensor) -> Tensor:
    """Inverse permutation of ``order [B, N]``: ``rank[b, order[b, i]] = i``."""
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(1, order, ar)


@register
@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+ (arXiv 2403.15388, "PruMerge+"): the IQR outliers plus spatially uniform samples, then merge.

    As the reference's ``token_prune_merge_advanced_plus`` (adaptive branch): with ``o`` outliers among ``N``
    valid tokens, ``ratio = o / N``, ``step = int(1 / ratio)`` and the samples are ``arange(0, N - 1,
    int(step / 3))`` (the reference's ``arange(0, 575, ...)`` for ``N = 576``: index ``N - 1`` is never
    sampled); the samples that are not already kept follow the kept tokens, in ascending index. Where the
    reference fails (no outlier: ``1 / 0``; ``int(step / 3) = 0``) we use ``o = 1`` and a stride of 1.
    Then :func:`knn_absorb` as PruMerge. Count: ``int(N * o / N)`` outliers plus the new samples (plus the
    summary token), capped by the budget in that order.
    """

    name: ClassVar[str] = "prumerge_plus"
    paper: ClassVar[str] = "LLaVA-PruMerge+ (arXiv 2403.15388)"
    matches_reference: ClassVar[str] = "exact (where the reference runs)"

    def priority(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        attn = tokens.cls_attn.to(torch.float64)
        outliers = iqr_outliers(attn, tokens.mask)
        n = tokens.counts
        o = outliers.sum(1)
        count = _reference_count(o, n)
        by_attn = attn.masked_fill(~tokens.mask, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        top = _rank(by_attn) < count[:, None]
        ratio = o.clamp(min=1).to(torch.float64) / n.clamp(min=1).to(torch.float64)
        step = torch.floor(1.0 / ratio).to(torch.long)
        stride = (step // 3).clamp(min=1)[:, None]
        ar = torch.arange(tokens.num_tokens, device=attn.device)[None]
        samples = tokens.mask & (ar % stride == 0) & (ar < (n - 1)[:, None]) & ~top
        # order: the top tokens by attention, then the new samples ascending, then the rest
        key = torch.where(top, _rank(by_attn).to(torch.float64),
                          torch.where(samples, tokens.num_tokens + ar.to(torch.float64),
                                      3.0 * tokens.num_tokens + _rank(by_attn)))
        key = key.masked_fill(~tokens.mask, float("inf"))
        rank = _rank(key.argsort(dim=1, stable=True))
        return rank, count + samples.sum(1)


# ==================================================================================================
# Decoder stage: FastV, PyramidDrop (their base DecoderCompressor, shared with SparseVLM in query.py and
# DART in similarity.py, lives in vtcompress.compressor). Mechanics in vtcompress.models.decoder.
# Each follows its reference by default (tests/reference/test_ref_decoder.py re-types them).
# ==================================================================================================


def scale_layers(layers: tuple[int, ...] | list[int], ref_depth: int, num_layers: int) -> tuple[int, ...]:
    """Stage layers given for a ``ref_depth``-layer LLM, mapped to one of ``num_layers`` layers.

    Each layer ``l`` becomes ``round(l * num_layers / ref_depth)`` clipped to ``[1, num_layers - 1]`` (a
    decoder-stage prune needs one layer before it for its signal and one after it to matter); duplicates
    collapse, so a shallow model gets fewer stages. Returns the sorted distinct layers.
    """
    if num_layers < 2:
        raise ValueError(f"decoder-stage pruning needs a decoder of at least 2 layers; got num_layers={num_layers}")
    out = {min(max(int(round(layer * num_layers / ref_depth)), 1), num_layers - 1) for layer in layers}
    return tuple(sorted(out))


@register
@dataclass
class FastV(DecoderCompressor):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764; pkunlp-icler/FastV).

    Score of each visual token = the head-mean attention it receives from the LAST token in decoder layer
    ``layer - 1`` (as the reference, which reads the previous layer's attention weights); the top
    ``budget`` tokens of each image (FastV's ``1 - R``; default R = 50 %) go on from layer ``layer`` (FastV's
    K, default 2), in their original order and positions (as the reference). ``attn [B, N, 1]``; with several
    query rows their mean.
    """

    budget: int | float = 0.5
    layer: int = 2

    name: ClassVar[str] = "fastv"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "FastV (arXiv 2403.06764)"
    needs: ClassVar[tuple[Signal, ...]] = (Signal.ATTN,)
    positions: ClassVar[str] = "original"
    matches_reference: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_layer("layer", self.layer)

    def schedule(self, num_layers: int) -> tuple[int, ...]:
        return self._check_single(self.layer, num_layers, self.name)

    def score(self, tokens: VisualTokens) -> Tensor:
        return tokens.attn.float().mean(-1)


@register
@dataclass
class PyramidDrop(DecoderCompressor):
    """PyramidDrop (Xing et al., arXiv 2410.17247; Cooperx521/PyramidDrop ``modeling_llama_pdrop.py``,
    ``LlamaModel.pdrop_rank_drop``): prune in stages through the LLM, a pyramid of visual tokens.

    * Stage layers ``layers`` of a ``ref_depth``-layer LLM (default 8 / 16 / 24 of 32, the paper's LLaVA-1.5
      setting), scaled to the model's depth by :func:`scale_layers`; the drop happens before layer ``K``.
    * Score (as the reference): at each stage layer ``K``, THAT layer's own q / k (``signal_layer = "own"``)
      on the hidden states entering it, at the positions they have then; the head-mean softmax attention the
      visual tokens receive from the last instruction token (the last token). ``attn [B, N, 1]``. (The
      reference's LLaMA has no grouped KV heads; with GQA each KV head serves its query heads, as ``repeat_kv``.)
    * Counts: stage ``s`` keeps ``int(n0 * r_s)`` of the image's ``n0`` visual tokens (``int()`` truncates, as
      the reference; it may reach 0), with ``r_s = budget * lambda ** s``: the float budget is the fraction
      kept after the first stage, as for the other decoder methods, and lambda (``ratio``) defaults to the
      budget itself, so ``budget = 0.5`` is the paper's ``[0.5, 0.25, 0.125]`` and ``budget = 1.0`` is the
      stock model. An int budget keeps ``min(budget, n0)`` at the first stage and ``int(budget * lambda ** s)``
      later (lambda defaults to ``budget / n0``). ``ratio`` sets lambda explicitly.
    * Positions: compact (the reference renumbers the positions after every drop; decoding continues from the
      renumbered length).
    """

    budget: int | float = 0.5
    layers: tuple[int, ...] = (8, 16, 24)
    ref_depth: int = 32
    ratio: float | None = None

    name: ClassVar[str] = "pyramiddrop"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "PyramidDrop (arXiv 2410.17247)"
    needs: ClassVar[tuple[Signal, ...]] = (Signal.ATTN,)
    signal_layer: ClassVar[SignalLayer] = SignalLayer.OWN
    uses_context: ClassVar[bool] = True
    positions: ClassVar[str] = "compact"
    matches_reference: ClassVar[str] = "exact (lambda defaults to the budget: 0.5 gives the paper's 0.5/0.25/0.125)"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_stage_layers()
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, float)
                                       or not 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must be None (lambda = the budget) or a float in (0, 1] (the fraction of the "
                             f"previous stage kept per stage); got {self.ratio!r}")

    def schedule(self, num_layers: int) -> tuple[int, ...]:
        return scale_layers(self.layers, self.ref_depth, num_layers)

    def score(self, tokens: VisualTokens) -> Tensor:
        return tokens.attn.float().mean(-1)

    def stage_counts(self, initial: Tensor, stage: int) -> Tensor:
        """``[B]`` visual tokens kept by stage ``stage`` of images that had ``initial [B]`` at the first stage."""
        n0 = initial.to(torch.long)
        if isinstance(self.budget, int):
            first = n0.clamp(max=self.budget)
            if stage == 0:
                return first
            lam = (torch.full_like(n0, self.ratio, dtype=torch.float64) if self.ratio is not None
                   else self.budget / n0.clamp(min=1).to(torch.float64))
            return torch.floor(first.to(torch.float64) * lam**stage).to(torch.long).clamp(max=first)
        lam = self.budget if self.ratio is None else self.ratio
        r = self.budget * lam**stage  # the reference's image_token_ratio_list[stage + 1]
        return torch.floor(n0.to(torch.float64) * r).to(torch.long)

    def compress_stage(self, tokens: VisualTokens, stage: int, num_stages: int = 1,
                       context: StageContext | None = None) -> VisualTokens:
        if context is not None and context.initial is not None:
            k = self.stage_counts(context.initial, stage)
        elif stage == 0:
            k = self.stage_counts(tokens.counts, 0)
        else:  # a pure call on a later stage's tokens: lambda of what this stage received
            lam = self.ratio if self.ratio is not None else (self.budget if isinstance(self.budget, float) else 1.0)
            k = torch.floor(tokens.counts.to(torch.float64) * lam).to(torch.long)
        idx, valid = topk_sorted(self.score(tokens), torch.minimum(k, tokens.counts), tokens.mask)
        return tokens.select(idx, valid)
