"""Attention family: methods that rank tokens by attention (vision encoder [CLS] or LLM decoder)."""

# ==================================================================================================
# Projector stage: FasterVLM, VisionZip, PruMerge, PruMerge+ — [CLS]-attention methods on the
# vision encoder's output. Keys (``tokens.keys``) are the similarity metric when carried, else ``x``.
# ==================================================================================================
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..compressor import Compressor, ScoreCompressor, check_budget, register
from ..ops import topk_sorted
from ..tokens import VisualTokens


def _unit(t: Tensor) -> Tensor:
    t = t.to(torch.float32)
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _metric(tokens: VisualTokens) -> Tensor:
    """``[B, N, C]``: head-averaged keys when the tokens carry them (what the references compare), else ``x``."""
    return tokens.keys if tokens.keys is not None else tokens.x


def _ascending(flag: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the True entries of ``flag [B, N]`` in ascending order: ``idx [B, K]``, ``valid [B, K]``."""
    n = flag.shape[1]
    ar = torch.arange(n, device=flag.device)
    cnt = flag.sum(1)
    k = int(cnt.max()) if flag.shape[0] else 0
    idx = torch.where(flag, ar, ar + n).argsort(dim=1)[:, :k]
    valid = torch.arange(k, device=flag.device)[None] < cnt[:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


# --------------------------------------------------------------------------------------------- FasterVLM
@register
@dataclass
class FasterVLM(ScoreCompressor):
    """FasterVLM ("[CLS] Attention is All You Need for Training-Free Visual Token Pruning", arXiv 2412.01818).

    Keeps the budget's top-k tokens by the attention they receive from the vision encoder's [CLS]
    (``cls_attn [B, N]``: head mean of the second-to-last layer's [CLS] row), in spatial order.
    """

    budget: int | float = 0.5

    name: ClassVar[str] = "fastervlm"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "FasterVLM (arXiv 2412.01818)"
    needs: ClassVar[tuple[str, ...]] = ("cls_attn",)

    def score(self, tokens: VisualTokens) -> Tensor:
        return tokens.cls_attn.float()


# --------------------------------------------------------------------------------------------- VisionZip
@register
@dataclass
class VisionZip(Compressor):
    """VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467; dvlab-research/VisionZip): dominant + contextual.

    Of the budget's ``k`` tokens per image, ``d = round(k * dominant_ratio)`` are *dominant*: the top ``d`` by
    ``cls_attn [B, N]`` (the reference sums the [CLS] row over heads — same ranking as the mean — and also
    keeps [CLS] itself, which is not among our patch tokens). The other ``c = k - d`` are *contextual*: of
    the ``R`` remaining tokens, in spatial order, those at ranks ``0, s, 2s, ...`` with ``s = max(1, R // c)``
    (the first ``c``) are targets; every other remaining token joins the target with the highest cosine
    similarity of keys (``tokens.keys``; ``x`` when absent), and each target becomes its group's mean
    (size-weighted; the reference's plain mean when sizes are 1). Paper default: 54 dominant + 10 contextual
    = 64, i.e. ``dominant_ratio = 54 / 64``. Exactly ``k`` tokens, in spatial order (each contextual token at
    its target's ``pos``); every valid patch is kept or merged, so sizes sum to the patch count — except
    when ``c = 0`` (``dominant_ratio = 1``, or ``k = 1``), where the remaining tokens are dropped.
    """

    budget: int | float = 0.5
    dominant_ratio: float = 54 / 64

    name: ClassVar[str] = "visionzip"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "VisionZip (arXiv 2412.04467)"
    needs: ClassVar[tuple[str, ...]] = ("cls_attn",)

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.dominant_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"dominant_ratio must be a number in [0, 1] (share of the budget kept as dominant "
                             f"tokens; the rest are contextual); got {r!r}")

    def split_counts(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        """``(d, c)`` ``[B]`` dominant and contextual tokens per image."""
        k = self.keep_counts(tokens)
        d = torch.round(k.to(torch.float64) * self.dominant_ratio).to(torch.long).clamp(max=k)
        return d, k - d

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        d, c = self.split_counts(tokens)
        if bool(((d + c) == tokens.counts).all()):
            return tokens  # everything kept: nothing to merge
        b, n = tokens.mask.shape
        dev = tokens.x.device
        dom_idx, dom_valid = topk_sorted(tokens.cls_attn, d, tokens.mask)
        dominant = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
        dominant.scatter_(1, torch.where(dom_valid, dom_idx, torch.full_like(dom_idx, n)), True)
        dominant = dominant[:, :n]
        rest = tokens.mask & ~dominant
        rank = rest.long().cumsum(1) - 1  # rank among the remaining tokens, in spatial order
        step = (rest.sum(1) // c.clamp(min=1)).clamp(min=1)[:, None]
        target = rest & (rank % step == 0) & (rank // step < c[:, None])
        others = rest & ~target
        kept = dominant | target
        slot = kept.long().cumsum(1) - 1
        dest = torch.where(kept, slot, torch.full_like(slot, -1))
        t_idx, t_valid = _ascending(target)
        if t_idx.shape[1]:  # rows without contextual tokens (c = 0) drop their remaining tokens
            m = _unit(_metric(tokens))
            sim = m @ m.gather(1, t_idx[..., None].expand(-1, -1, m.shape[-1])).transpose(1, 2)  # [B, N, C]
            best = sim.masked_fill(~t_valid[:, None, :], float("-inf")).argmax(dim=-1)  # first on ties
            dest = torch.where(others & (c[:, None] > 0), slot.gather(1, t_idx.gather(1, best)), dest)
        anchor, a_valid = _ascending(kept)
        return tokens.merge(dest, torch.where(a_valid, anchor, torch.full_like(anchor, -1)))


# --------------------------------------------------------------------------------------------- PruMerge
def iqr_outliers(scores: Tensor, mask: Tensor) -> Tensor:
    """``[B, N]`` bool: valid entries of ``scores [B, N]`` above ``Q3 + 1.5 * IQR`` of their row's valid entries.

    Quartiles by linear interpolation (``numpy.percentile`` / ``torch.quantile`` default), computed in
    float64 per row over the valid entries only, as PruMerge's ``outlier_dectection``.
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


def knn_absorb(tokens: VisualTokens, kept: Tensor, k_neighbors: int) -> VisualTokens:
    """Merge the pruned tokens into the ``kept [B, N]`` ones by key nearest neighbours, attention-weighted.

    Each kept token ``i`` takes the ``k_neighbors`` valid tokens most cosine-similar to it (keys, else ``x``;
    candidates: every other valid token, kept or not, as PruMerge); the pruned ones among them join it, a
    pruned token claimed by several kept tokens joins the most similar (lower index on ties), and pruned
    tokens in no neighbourhood are dropped. Each kept token becomes the mean of its group weighted by
    ``size * cls_attn``, so provenance stays a partition (``size`` / ``assign`` exact).
    """
    b, n = tokens.mask.shape
    dev = tokens.x.device
    k_idx, k_valid = _ascending(kept)
    m = _unit(_metric(tokens))
    sim = m.gather(1, k_idx[..., None].expand(-1, -1, m.shape[-1])) @ m.transpose(1, 2)  # [B, K, N]
    ar = torch.arange(n, device=dev)
    cand = tokens.mask[:, None, :] & (ar[None, None, :] != k_idx[:, :, None]) & k_valid[:, :, None]
    top = sim.masked_fill(~cand, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    top = top[..., : min(k_neighbors, n)]
    near = torch.zeros_like(cand).scatter_(-1, top, True) & cand
    claim = near & ~kept[:, None, :]
    best, who = sim.masked_fill(~claim, float("-inf")).max(dim=1)  # [B, N] most similar claimant
    slot = kept.long().cumsum(1) - 1
    dest = torch.where(kept, slot, torch.full_like(slot, -1))
    dest = torch.where(torch.isfinite(best) & tokens.mask, who, dest)
    anchor = torch.where(k_valid, k_idx, torch.full_like(k_idx, -1))
    # attention weights relative to the image's largest, floored at 1e-6 so that a group whose attention
    # is all ~0 still averages its members instead of vanishing (the per-row scale cancels in the mean)
    attn = tokens.cls_attn.to(torch.float32).masked_fill(~tokens.mask, 0.0)
    weight = (attn / attn.amax(dim=1, keepdim=True).clamp_min(1e-30)).clamp_min(1e-6)
    return tokens.merge(dest, anchor, weight=weight)


@register
@dataclass
class PruMerge(Compressor):
    """LLaVA-PruMerge (Shang et al., arXiv 2403.15388; 42Shawn/LLaVA-PruMerge): adaptive prune, then merge.

    Kept set: the tokens whose ``cls_attn [B, N]`` is an outlier, above ``Q3 + 1.5 * IQR`` of the image's
    valid tokens (:func:`iqr_outliers`); the reference keeps ``int(N * outliers / N)`` top tokens, i.e. the
    outliers. The count is adaptive; the **budget is a cap**: an image keeps ``min(max(outliers, 1), k)``
    tokens, the top ones by ``cls_attn`` (default ``budget=1.0``: no cap, the paper's behaviour; never 0
    tokens, where the reference would keep none). Then :func:`knn_absorb` with ``k_neighbors`` (32 in the
    reference): each kept token absorbs the pruned tokens among its nearest keys, weighted by attention.

    Deviations from the reference, for exact provenance: a pruned token joins one kept token (the most
    similar claimant) instead of several; groups are attention-weighted MEANS (the reference adds the
    unnormalised attention-weighted sum to the kept token); no extra token summing all pruned tokens.
    """

    budget: int | float = 1.0
    k_neighbors: int = 32

    name: ClassVar[str] = "prumerge"
    family: ClassVar[str] = "attention"
    paper: ClassVar[str] = "LLaVA-PruMerge (arXiv 2403.15388)"
    needs: ClassVar[tuple[str, ...]] = ("cls_attn",)

    def __post_init__(self) -> None:
        super().__post_init__()
        kn = self.k_neighbors
        if isinstance(kn, bool) or not isinstance(kn, int) or kn < 0:
            raise ValueError(f"k_neighbors must be an int >= 0 (pruned tokens each kept token absorbs); got {kn!r}")

    def priority(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        """``(prio [B, N], adaptive [B])``: keep order (higher first) and the adaptive kept count."""
        outliers = iqr_outliers(tokens.cls_attn, tokens.mask)
        return tokens.cls_attn.to(torch.float64), outliers.sum(1)

    def kept_counts(self, tokens: VisualTokens) -> Tensor:
        """``[B]`` tokens kept per image: ``min(max(adaptive, 1), k)`` (the documented count)."""
        _, adaptive = self.priority(tokens)
        return torch.minimum(adaptive.clamp(min=1), self.keep_counts(tokens))

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        prio, adaptive = self.priority(tokens)
        count = torch.minimum(adaptive.clamp(min=1), self.keep_counts(tokens))
        idx, valid = topk_sorted(prio, count, tokens.mask)
        b, n = tokens.mask.shape
        kept = torch.zeros(b, n + 1, dtype=torch.bool, device=tokens.x.device)
        kept.scatter_(1, torch.where(valid, idx, torch.full_like(idx, n)), True)
        return knn_absorb(tokens, kept[:, :n], self.k_neighbors)


@register
@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+ (arXiv 2403.15388, "PruMerge+"): the IQR outliers plus spatially uniform samples, then merge.

    As the reference's adaptive branch: with ``o`` outliers among ``n`` valid tokens, the tokens at raster
    indices ``0, s, 2s, ...`` with ``s = max(1, (n // max(o, 1)) // 3)`` are added (about ``3 o`` more), then
    :func:`knn_absorb` as PruMerge. Count: ``min(|outliers ∪ samples|, k)``; under the cap the outliers go
    first (by attention), then the samples (by attention).
    """

    name: ClassVar[str] = "prumerge_plus"
    paper: ClassVar[str] = "LLaVA-PruMerge+ (arXiv 2403.15388)"

    def priority(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        attn = tokens.cls_attn.to(torch.float64)
        outliers = iqr_outliers(attn, tokens.mask)
        n = tokens.counts
        stride = ((n // outliers.sum(1).clamp(min=1)) // 3).clamp(min=1)[:, None]
        samples = tokens.mask & (torch.arange(tokens.num_tokens, device=attn.device)[None] % stride == 0)
        group = outliers.long() * 2 + (samples & ~outliers).long()  # 2: outlier, 1: sample, 0: other
        # lexicographic (group, attention): the rank in that order becomes the priority
        by_attn = attn.sort(dim=1, descending=True, stable=True).indices
        order = by_attn.gather(1, group.gather(1, by_attn).sort(dim=1, descending=True, stable=True).indices)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=attn.device)
                                               .expand_as(order).contiguous())
        return -rank.to(torch.float64), (outliers | samples).sum(1)


# ==================================================================================================
# Decoder stage: FastV, PyramidDrop, and the shared DecoderCompressor base (also used by
# SparseVLM in query.py and DART in similarity.py). Mechanics in vtcompress.models.decoder.
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


def decoder_keep_counts(budget: int | float, counts: Tensor) -> Tensor:
    """``[B]`` visual tokens kept per image inside the LLM: an int budget keeps ``min(budget, count)`` (images
    with fewer tokens keep them all, never an error: images differ in token counts), a fraction keeps
    ``round(fraction * count)``, at least one when the image has any."""
    check_budget(budget)
    counts = counts.to(torch.long)
    if isinstance(budget, int):
        return counts.clamp(max=budget)
    k = torch.round(counts.to(torch.float64) * budget).to(torch.long)
    return torch.minimum(k.clamp(min=1), counts)


@dataclass
class StageContext:
    """What the mechanics know about one decoder-stage call beyond :class:`VisualTokens` (one row per image).

    Attributes:
        text_keys: ``[B, T, Dk]`` the prompt tokens' keys (same layer and form as ``tokens.keys``), or ``None``.
        vis_seq: ``[B, N]`` long, each visual token's index in its sample's unpadded sequence (the reference's
            absolute token indices; DART's pivot order depends on them).
        text_seq: ``[B, T]`` long, the same for the prompt tokens, or ``None``.
        initial: ``[B]`` long, the image's visual tokens when the method's first stage ran (multi-stage budgets).
        rated: the mechanics already restricted the prompt query rows to the method's raters (SparseVLM).
        merge_rank: set by a merging method: ``[B, N_out]`` long, the order of each merged output token among its
            image's merged tokens (-1 for kept ones), in the method's output order; the mechanics append merged
            tokens after their image's kept tokens in that order when positions are compact.
    """

    text_keys: Tensor | None = None
    vis_seq: Tensor | None = None
    text_seq: Tensor | None = None
    initial: Tensor | None = None
    rated: bool = False
    merge_rank: Tensor | None = None


@dataclass
class DecoderCompressor(ScoreCompressor):
    """Base of decoder-stage methods: they prune visual tokens between LLM layers.

    The mechanics (:func:`vtcompress.models.decoder.attach_decoder`) call :meth:`schedule` once for the
    model's depth and, before each stage layer ``K``, :meth:`compress_stage` on the visual tokens of each
    image (one row per image; budgets count per image, as at the projector stage): ``x [B, N, D]`` their
    hidden states entering layer ``K`` (through the LLM's final norm if the class sets ``normed``), plus the
    signals named in ``needs`` computed at layer ``K - 1`` (``signal_layer = "previous"``) or at layer ``K``
    itself (``"own"``) on the sequence entering it: ``attn [B, N, Q]``: attention received from the query rows
    chosen by ``query`` — ``"last"``: the last token, ``"text"``: the prompt tokens after the first image,
    valid ones in ``text_mask``; ``keys [B, N, Dk]``: the keys that layer caches (``k_proj`` output rotated by
    RoPE, all KV heads concatenated); ``text [B, Q, D]``: the prompt tokens' hidden states entering ``K``.
    ``image_newline`` tokens (LLaVA-NeXT / OneVision) are never pruned and not counted. The rule is a pure
    function of those tensors, so it is tested on synthesized signals as well. Budgets follow
    :func:`decoder_keep_counts` unless a method says otherwise; multi-stage methods get ``num_stages``.
    ``positions`` is the position scheme of the layers after a prune (``"original"`` or ``"compact"``, see
    :data:`vtcompress.models.decoder.POSITIONS`); ``matches_reference`` says how the default matches the
    authors' code.
    """

    stage: ClassVar[str] = "decoder"
    query: ClassVar[str] = "last"
    signal_layer: ClassVar[str] = "previous"
    normed: ClassVar[bool] = False
    uses_context: ClassVar[bool] = False
    positions: ClassVar[str] = "original"

    def schedule(self, num_layers: int) -> tuple[int, ...]:  # pragma: no cover - abstract
        """Stage layers for a decoder of ``num_layers`` layers (each in ``[1, num_layers - 1]``)."""
        raise NotImplementedError

    def compress_stage(self, tokens: VisualTokens, stage: int, num_stages: int = 1) -> VisualTokens:
        """Decision of stage ``stage`` (0-based) out of ``num_stages``; single-stage methods compress."""
        return self.compress(tokens)

    def keep_counts(self, tokens: VisualTokens) -> Tensor:
        return decoder_keep_counts(self.budget, tokens.counts)

    @staticmethod
    def _check_layer(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (a decoder layer after the first); got {value!r}")

    def _check_stage_layers(self, minimum: int = 1) -> None:
        """Validate and normalise the ``layers`` / ``ref_depth`` fields of multi-stage methods."""
        self.layers = tuple(self.layers)
        if not self.layers:
            raise ValueError("layers must name at least one stage layer; got ()")
        for v in self.layers:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"every entry of layers must be an int >= {minimum}; got {v!r}")
        self._check_layer("ref_depth", self.ref_depth)

    @staticmethod
    def _check_single(layer: int, num_layers: int, name: str) -> tuple[int, ...]:
        if layer >= num_layers:
            raise ValueError(f"{name}: layer={layer} is out of range for a decoder of {num_layers} layers "
                             f"(allowed: 1 .. {num_layers - 1})")
        return (layer,)


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
    needs: ClassVar[tuple[str, ...]] = ("attn",)
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
      visual tokens receive from the last instruction token (the last token). ``attn [B, N, 1]``.
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
    needs: ClassVar[tuple[str, ...]] = ("attn",)
    signal_layer: ClassVar[str] = "own"
    uses_context: ClassVar[bool] = True
    positions: ClassVar[str] = "compact"
    matches_reference: ClassVar[str] = "exact (lambda = budget: budget 0.5 is the paper's 0.5/0.25/0.125)"

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
