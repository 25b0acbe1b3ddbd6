"""Temporal methods: compress a video clip across its frames.

Each method receives clip tokens (:class:`~vtcompress.tokens.VisualTokens` with ``frames = T``: the projected
features of ``T`` frames of one ``grid = (H, W)``, ``pos`` numbered frame after frame) and keeps, merges or drops
tokens across frames. Budgets count per clip: an ``int`` is the tokens kept of the clip, a ``float`` the fraction
of its tokens. Spatial methods compose with them: a spatial method given a clip acts frame by frame.

The family's reference implementations (each re-typed in ``tests/reference/test_ref_<name>.py``):

* ``evs`` — EVS, Efficient Video Sampling (arXiv 2510.14624): vLLM ``vllm/multimodal/evs.py``
  ``compute_retention_mask``;
* ``dycoke`` — DyCoke's temporal token merging (Tao et al., CVPR 2025, arXiv 2411.15024): KD-TAO/DyCoke
  ``llava/model/llava_arch.py`` ``dycole_ttm`` (HEAD dd74634, as last changed by 35cc532);
* ``fastvid`` — FastVID (Shen et al., arXiv 2503.11187): LunarShen/FastVID (HEAD a40a109), the LLaVA-OneVision
  port ``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` ``Qwen2Model.forward``
  (DySeg, STPrune), its signals from ``llava/model/llava_arch.py`` and ``siglip_encoder.py``, defaults from
  ``scripts/eval.sh``;
* ``prunevid`` — PruneVid (Huang et al., arXiv 2412.16117): Visual-AI/PruneVid (b12600c)
  ``models/pllava/modeling_pllava.py`` ``merge_frames_dynamic`` with ``cluster_dpc_knn``, ``refine_clusters``,
  ``segment_lengths``, ``spatial_merge_tokens``, ``compute_cluster_vectors``;
* ``holitom`` — HoliTom (Shao et al., arXiv 2505.21334): cokeshao/HoliTom (HEAD e9b2972) ``holitom/llava_arch.py``
  ``LlavaMetaForCausalLM_holitom``: the video branch of ``prepare_inputs_labels_for_multimodal`` with
  ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_*`` and
  ``cluster_dpc_knn``.

What each leaves out (the parts that need the LLM's attention, or vision-tower signals videos do not carry here)
is said in its docstring and in its ``matches_reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compressor import Signal, TemporalCompressor, budget_tokens, keep_counts, register
from ..ops import flag_indices, topk_sorted
from ..tokens import VisualTokens

__all__ = ["EVS", "DyCoke", "FastVID", "PruneVid", "HoliTom", "dpc_knn", "refine_runs"]


def _full_clip(tokens: VisualTokens, name: str) -> tuple[int, int]:
    """``(T, h * w)`` of clip tokens that still fill every frame's grid (``layout`` set, no padding), else
    ``ValueError`` naming the method."""
    if tokens.layout is None or not bool(tokens.mask.all()):
        raise ValueError(f"method {name!r} compares each token with the same position of the previous frame: it "
                         "needs every frame's full grid of tokens (run it first, or after grid methods such as "
                         "avg_pool only; pruning before it leaves no grid to compare)")
    return tokens.frames, tokens.layout[0] * tokens.layout[1]


# ============================================================================================= EVS
@register
@dataclass
class EVS(TemporalCompressor):
    """EVS: Efficient Video Sampling (Bagrov et al., arXiv 2510.14624), as vLLM ships it (``--video-pruning-rate``;
    ``vllm/multimodal/evs.py`` ``compute_retention_mask``).

    Every token of frame ``t >= 1`` is scored by its cosine dissimilarity ``1 - cos(x[t, p], x[t - 1, p])`` to the
    token at the same grid position ``p`` of the previous frame; the first frame scores 255 (always kept). The
    ``k`` highest scores of the clip ``x [B, T * h * w, D]`` are kept (a stable descending sort: ties go to the
    earlier token), in clip order, with ``k = max(h * w, int(T * h * w * (1 - q)))`` for the pruning rate
    ``q = 1 - budget`` (a float budget; vLLM's rule, computed as vLLM does) or ``k = max(h * w, min(budget, N))``
    for an int budget (tokens per clip). The count never drops below one frame: the first frame is kept whole.

    The clip must hold every frame's full grid (the raw video tokens, or after a grid method such as ``avg_pool``).
    """

    budget: int | float = 0.5

    name: ClassVar[str] = "evs"
    paper: ClassVar[str] = "EVS (arXiv 2510.14624; vLLM vllm/multimodal/evs.py)"
    matches_reference: ClassVar[str] = "exact"

    def retained(self, frames: int, per_frame: int) -> int:
        """Tokens kept of a clip of ``frames`` frames of ``per_frame`` tokens (vLLM's
        ``compute_retained_tokens_count`` for a float budget)."""
        total = frames * per_frame
        if isinstance(self.budget, int):
            return max(per_frame, min(self.budget, total))
        q = 1.0 - self.budget  # the pruning rate vLLM is given; (1 - q) recomputed as it does
        return max(per_frame, int(total * (1 - q)))

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        """``[B, N]``: dissimilarity to the same position of the previous frame, 255 on the first frame."""
        t, hw = _full_clip(tokens, self.name)
        b, _, d = tokens.x.shape
        x = tokens.x.view(b, t, hw, d)
        dis = 1 - F.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)
        first = torch.full((b, 1, hw), 255, dtype=dis.dtype, device=dis.device)
        return torch.cat([first, dis], dim=1).view(b, t * hw)

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        t, hw = _full_clip(tokens, self.name)
        order = torch.argsort(self.score(tokens), dim=1, descending=True, stable=True)
        idx = order[:, : self.retained(t, hw)].sort(dim=1).values  # clip order
        return tokens.select(idx)


# ========================================================================================== DyCoke
@register
@dataclass
class DyCoke(TemporalCompressor):
    """DyCoke's TTM stage (arXiv 2411.15024; KD-TAO/DyCoke ``llava/model/llava_arch.py`` ``dycole_ttm``): prune the
    frames of a clip that repeat an earlier frame of their window of 4.

    Input: clip tokens ``x [B, T * P, D]`` holding every frame's full grid (``P = h * w`` tokens per frame: the raw
    projected video features, e.g. LLaVA-OneVision after its 2x2 frame pooling, or after a grid method only).
    Output: ``[B, K, D]`` kept tokens (a subset, features unchanged), frame after frame in raster order.

    Frames go in windows of 4 (``t = 4w + j``). Like the reference, every comparison is per grid position ``p``
    between the original (unpruned) frames, and a pruned frame keeps its ``q`` tokens *least* similar to the frame
    it is compared with (``topk(q, largest=False)``):

    * ``j = 0``: kept whole;
    * ``j = 1, 3`` (every odd frame): compared with frame ``t - 1``, cosine of the L2-normalised features (the
      reference normalises first, then takes ``cosine_similarity``; kept bit for bit);
    * ``j = 2``: compared with frame ``t - 2`` (the window's first), plain ``cosine_similarity``. The reference
      does this only for ``t <= T - 3`` (its loop ``range(0, T - 4, 4)``): the last window of a clip with
      ``T % 4 == 0`` keeps its frame ``j = 2`` whole, and for ``T <= 4`` the reference raises (``torch.stack`` of an
      empty list) where we keep that frame whole (what its empty loop would do);
    * an odd ``T`` drops its last frame entirely (the reference's pairs ``range(0, T - 1, 2)`` never reach it).

    ``windows="full"`` is the paper's description instead: every window prunes ``j = 2`` (the last one too) and an
    odd clip's last frame follows the window rule (kept whole at ``j = 0``, pruned at ``j = 2``).

    Budget (per clip; the reference's knob is ``merging_ratio = dycoke_k``, the fraction pruned of every pruned
    frame, each keeping ``q = int((1 - merging_ratio) * P)``):

    * ``merging_ratio`` set: exactly that (``budget`` is then ignored): ``K = F_whole * P + F_pruned * q``;
    * else ``budget`` (int = tokens kept of the clip, float in (0, 1] = fraction of its ``T * P`` tokens, rounded)
      gives a target ``n``; ``q = clamp((n - F_whole * P) // F_pruned, 0, P)``, so ``K`` is the largest count
      ``<= n`` the frame pattern allows, never below the whole frames ``F_whole * P`` (:meth:`kept`). A target
      ``n >= T * P`` (``budget=1.0``) returns the input unchanged (an odd clip's last frame is not dropped then).

    A clip of one frame (an image) passes through unchanged. Every row of a batch has the same ``T`` and ``P``,
    hence the same count. Tensor ops run in the input dtype (as the reference would) on CPU and CUDA.

    Left out: DyCoke's second stage, the dynamic KV-cache pruning during decoding (``dycoke_l`` / ``dycoke_p``:
    it needs the LLM's attention at every decoding step, not available at this stage).
    """

    budget: int | float = 0.5
    merging_ratio: float | None = None
    windows: str = "reference"

    name: ClassVar[str] = "dycoke"
    paper: ClassVar[str] = ("DyCoke (Tao et al., CVPR 2025, arXiv 2411.15024; KD-TAO/DyCoke llava/model/llava_arch.py "
                            "dycole_ttm)")
    matches_reference: ClassVar[str] = (
        "deviation: TTM stage only (the decoding-time dynamic KV-cache pruning, dycoke_l / dycoke_p, is left out); "
        "the same kept tokens and features as dycole_ttm, but a pruned frame's tokens stay in raster order (the "
        "reference lists them in ascending-similarity topk order); T <= 4 keeps frame 2 whole where the reference "
        "raises")
    WINDOWS: ClassVar[tuple[str, ...]] = ("reference", "full")

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.merging_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0):
            raise ValueError(f"merging_ratio={r!r} is invalid: the fraction pruned of each pruned frame is a number "
                             "in [0, 1] (the reference's dycoke_k), or None to follow the budget")
        if self.windows not in self.WINDOWS:
            raise ValueError(f"windows={self.windows!r}; allowed: 'reference' (dycole_ttm's loops), 'full' (every "
                             "window of 4 prunes frames 1-3, as the paper describes)")

    # ------------------------------------------------------------------ the frame pattern
    def roles(self, frames: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """Frame indices of a clip of ``frames`` frames: ``(whole, odd, third, dropped)``, where ``odd`` frames are
        pruned against frame ``t - 1`` and ``third`` frames (``t % 4 == 2``) against frame ``t - 2``."""
        t_ = frames
        odd = list(range(1, t_, 2))
        last = t_ if self.windows == "full" else t_ - 2  # reference: range(0, T - 4, 4) -> t = i + 2 <= T - 3
        third = list(range(2, last, 4))
        dropped = [t_ - 1] if self.windows == "reference" and t_ % 2 == 1 and t_ > 1 else []
        taken = set(odd) | set(third) | set(dropped)
        whole = [f for f in range(t_) if f not in taken]
        return whole, odd, third, dropped

    def per_frame(self, frames: int, per_frame: int) -> int:
        """``q``: tokens each pruned frame keeps, for a clip of ``frames`` frames of ``per_frame`` tokens."""
        if self.merging_ratio is not None:
            return int((1 - self.merging_ratio) * per_frame)  # the reference's float expression, kept as is
        whole, odd, third, _ = self.roles(frames)
        pruned = len(odd) + len(third)
        target = int(keep_counts(self.budget, torch.tensor([frames * per_frame]))[0])
        if pruned == 0:
            return per_frame
        return max(0, min(per_frame, (target - len(whole) * per_frame) // pruned))

    def kept(self, frames: int, per_frame: int) -> int:
        """Tokens kept of a clip of ``frames`` frames of ``per_frame`` tokens."""
        total = frames * per_frame
        if frames == 1 or (self.merging_ratio is None
                           and int(keep_counts(self.budget, torch.tensor([total]))[0]) >= total):
            return total
        whole, odd, third, _ = self.roles(frames)
        return len(whole) * per_frame + (len(odd) + len(third)) * self.per_frame(frames, per_frame)

    def similarity(self, tokens: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sim [B, F, P], frame [F])``: each pruned frame's per-position cosine similarity to the frame it is
        compared with (the ``odd`` frames first, then the ``third`` ones), and those frames' indices."""
        t_, p = _full_clip(tokens, self.name)
        b, _, d = tokens.x.shape
        x = tokens.x.reshape(b, t_, p, d)
        _, odd, third, _ = self.roles(t_)
        dev = x.device
        odd_t = torch.tensor(odd, dtype=torch.long, device=dev)
        third_t = torch.tensor(third, dtype=torch.long, device=dev)
        # pairs (t - 1, t): the reference normalises, then takes cosine_similarity (same value up to rounding;
        # the same two ops keep its near-ties)
        sim_odd = F.cosine_similarity(F.normalize(x[:, odd_t - 1], p=2, dim=-1), F.normalize(x[:, odd_t], p=2, dim=-1),
                                      dim=-1)
        sim_third = F.cosine_similarity(x[:, third_t - 2], x[:, third_t], dim=-1)  # no normalisation here
        return torch.cat([sim_odd, sim_third], dim=1), torch.cat([odd_t, third_t])

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        t_, p = _full_clip(tokens, self.name)
        if self.kept(t_, p) == t_ * p:  # nothing pruned, nothing dropped (budget 1.0, an image)
            return tokens
        b, dev = tokens.batch_size, tokens.x.device
        whole, *_ = self.roles(t_)
        q = self.per_frame(t_, p)
        sim, frame = self.similarity(tokens)
        local = sim.topk(q, dim=-1, largest=False).indices  # [B, F, q]: the least similar positions
        picked = (frame[None, :, None] * p + local).reshape(b, -1)
        whole_t = torch.tensor(whole, dtype=torch.long, device=dev)
        full = (whole_t[:, None] * p + torch.arange(p, device=dev)).reshape(1, -1).expand(b, -1)
        idx = torch.cat([full, picked], dim=1).sort(dim=1).values  # clip order (frames, then raster)
        return tokens.select(idx)


# ========================================================================================= FastVID
def _int_field(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: it must be an int >= {minimum}")


def _float_field(name: str, value, lo: float, hi: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                               and lo <= value <= hi):
        raise ValueError(f"{name}={value!r} is invalid: {what} is a number in [{lo:g}, {hi:g}]")


@register
@dataclass
class FastVID(TemporalCompressor):
    """FastVID (arXiv 2503.11187; LunarShen/FastVID ``fastvid_llavaonevision/.../modeling_qwen2.py``
    ``Qwen2Model.forward``, block "FastVID"): split the clip into segments at frame transitions, keep each frame's
    most salient tokens and merge the rest into density-peak anchor tokens of the segment.

    Input: clip tokens ``x [B, T * n, D]`` holding every frame's full grid (``n = h * w`` tokens per frame: the
    projected video features, e.g. LLaVA-OneVision after its 2x2 pooling). Output: ``[B, K, D]``, kept tokens in
    clip order (frames, then raster); ``K`` can differ between clips (their segments differ).

    1. DySeg: ``g_t`` = the frame's global feature; ``s_t = cos(g_t, g_{t+1})``. A cut follows frame ``t`` if
       ``s_t`` is among the ``min_segments - 1`` lowest (reference ``DySeg_c``; capped at ``T - 1``) or
       ``s_t < tau`` (``DySeg_tau``).
    2. Budget per frame: ``R`` retained, ``C = int(R * context_ratio)`` context (``STPrune_d``), ``S = R - C``
       salient tokens.
    3. Anchor frames (reference "Compute Anchor Token Distribution"): in a segment of ``L`` frames, counting from
       its last frame, every ``anchor_interval``-th frame (``DTM_p``) gets ``cur = C * L // ceil(L / p)`` anchors.
    4. ATS: every frame keeps its ``S`` most salient tokens.
    5. Density scores over each frame's other ``m = n - S`` tokens (DPC-kNN): ``d_ij = |x_i - x_j| / sqrt(D)``,
       ``rho_i = exp(-mean of the 4 smallest d_ij^2)`` (itself included), ``delta_i`` = distance to the nearest
       denser token (the frame's largest distance for the densest), score ``rho_i * delta_i``.
    6. DTM: the anchors of a frame are its top-``k`` scores. If ``cur == C`` (every one-frame segment, and the
       anchor frames of a segment where the floor makes ``cur == C``), the frame's ``m`` tokens merge into its own
       ``C`` anchors; the other frames of such a segment lose their non-salient tokens (as the reference). If
       ``cur > C``, *every* non-salient token of the segment is assigned, in *each* anchor frame of the segment,
       to its most cosine-similar anchor. An anchor ``a`` with ``c_a`` tokens assigned (itself included) becomes
       ``w x_a + (1 - w) mean(assigned)`` with ``w = max(1 / (c_a + 1), beta)`` (``DTM_beta``); plain token
       means, as the reference (``size`` is not a weight).

    Signals. The reference reads two vision-tower signals of SigLIP's attention-pooling head: ``g_t`` its pooled
    output and the saliency its probe's attention over the patches (bilinearly pooled to the projected grid).
    Neither is available for videos here, so the defaults are feature-only: ``g_t`` = the mean of the frame's
    projected tokens (what the authors' own Qwen2.5-VL port ``fastvid_qwen25vl/.../modeling_qwen2_5_vl.py`` uses),
    saliency (``saliency="features"``) = ``<x_i, g_t>``: the attention logit a probe equal to the frame summary
    gives each token (the mean over queries of ``q . k_i`` with features for queries and keys).
    ``saliency="cls_attn"`` reads ``cls_attn [B, T * n]`` instead (then ``needs = (Signal.CLS_ATTN,)``).

    Budget (per clip; the reference's knob is ``retention_ratio``, ``R = int(n * retention_ratio)`` per frame):
    a float budget is ``retention_ratio``; an int budget ``K`` (tokens of the clip) sets ``R = min(K, T * n) // T``
    (``K < T`` raises). ``R`` is at least 1. The clip keeps ``K = T * S + sum of the anchor counts <= T * R``:
    exactly ``T * R`` when every segment has one frame; a multi-frame segment loses the floor of
    ``cur`` and the dropped context tokens of frames without anchors when ``cur == C``. A budget keeping every
    token (``R == n``: ``1.0``, or an int ``>= T * n``) returns the clip unchanged.

    Deviations (also in ``matches_reference``): the feature-only signals above; the reference raises where an
    anchor frame would need more anchors than it has tokens (``cur > m``, e.g. ratios above about 0.45 with the
    defaults), where ``T - 1 < min_segments - 1``, ``C == 0`` or ``m < 4``: we cap ``cur`` at ``m``, the cuts at
    ``T - 1``, merge nothing when ``C == 0`` and take the ``min(4, m)`` nearest; the reference adds
    ``U(0, 1e-6)`` noise to ``rho`` to break ties at random, we add none (ties keep the lower index).
    Provenance: a token merged (features) into anchors of several anchor frames (``cur > C`` and ``L > p``) has one
    ``assign``: the anchor in its own window's anchor frame (the first anchor frame at or after it); an anchor
    token keeps its own slot even where the reference's argmax would also count it into another anchor. With
    ``dtm_scope="window"`` a token merges only into its own window's anchor frame (a partition: features, ``size``
    and ``assign`` agree; same result as the default when no segment is longer than ``anchor_interval``).
    Kept tokens keep their original LLM positions (the reference's ``position_ids = keep_indexs``).
    """

    budget: int | float = 0.1
    min_segments: int = 8
    tau: float = 0.9
    context_ratio: float = 0.4
    anchor_interval: int = 4
    beta: float = 0.6
    saliency: str = "features"
    dtm_scope: str = "segment"

    name: ClassVar[str] = "fastvid"
    paper: ClassVar[str] = ("FastVID (Shen et al., arXiv 2503.11187; LunarShen/FastVID fastvid_llavaonevision "
                            "modeling_qwen2.py Qwen2Model.forward)")
    matches_reference: ClassVar[str] = (
        "deviation: feature-only signals by default (frame global feature = mean projected token, as the "
        "authors' Qwen2.5-VL port; saliency = dot with it) where the reference reads SigLIP's pooling head "
        "(saliency='cls_attn' takes the attention); with the same signals the same kept tokens and features; no "
        "random density tie-break noise; anchors capped at the frame's tokens (reference raises); a token merged "
        "into several anchor frames records one assign")
    positions: ClassVar[str] = "original"
    SALIENCY: ClassVar[tuple[str, ...]] = ("features", "cls_attn")
    DTM_SCOPES: ClassVar[tuple[str, ...]] = ("segment", "window")

    def __post_init__(self) -> None:
        super().__post_init__()
        _int_field("min_segments", self.min_segments, 1)
        _int_field("anchor_interval", self.anchor_interval, 1)
        _float_field("tau", self.tau, -1.0, 1.0, "the cosine threshold of a cut")
        _float_field("context_ratio", self.context_ratio, 0.0, 1.0, "the fraction of each frame's tokens merged")
        _float_field("beta", self.beta, 0.0, 1.0, "the least weight of an anchor's own features")
        if self.saliency not in self.SALIENCY:
            raise ValueError(f"saliency={self.saliency!r}; allowed: 'features' (dot with the frame's mean feature), "
                             "'cls_attn' (the vision tower's attention signal)")
        if self.dtm_scope not in self.DTM_SCOPES:
            raise ValueError(f"dtm_scope={self.dtm_scope!r}; allowed: 'segment' (the reference: every anchor frame "
                             "gathers the whole segment), 'window' (a token merges into its own window's anchors)")
        # the signal is read only in this mode; the mechanics read `needs` from the instance
        self.needs = (Signal.CLS_ATTN,) if self.saliency == "cls_attn" else ()

    # ------------------------------------------------------------------ counts
    def frame_retain(self, frames: int, per_frame: int) -> int:
        """``R``: tokens each frame retains (salient + context) for a clip of ``frames`` x ``per_frame`` tokens."""
        if isinstance(self.budget, int):
            r = min(self.budget, frames * per_frame) // frames
            if r < 1:
                raise ValueError(f"budget={self.budget} tokens per clip is below one token per frame of its {frames} "
                                 "frames: fastvid keeps at least one per frame")
            return r
        return max(1, int(per_frame * self.budget))  # the reference's int(frame_token_len * retention_ratio)

    def split(self, frames: int, per_frame: int) -> tuple[int, int]:
        """``(S, C)``: salient and context tokens of a frame (the reference's ``frame_salient_num`` and
        ``frame_context_num``)."""
        r = self.frame_retain(frames, per_frame)
        c = int(r * self.context_ratio)
        return r - c, c

    @staticmethod
    def _frames(tokens: VisualTokens) -> tuple[int, int]:
        if tokens.layout is None or not bool(tokens.mask.all()):
            raise ValueError("method 'fastvid' splits every frame's tokens in equal parts (as its reference): it "
                             "needs every frame's full grid of tokens (run it first, or after grid methods such as "
                             "avg_pool only)")
        return tokens.frames, tokens.layout[0] * tokens.layout[1]

    # ------------------------------------------------------------------ DySeg
    @staticmethod
    def global_features(tokens: VisualTokens) -> Tensor:
        """``[B, T, D]`` float32: each frame's mean token (the feature-only global feature)."""
        t, n = FastVID._frames(tokens)
        b, _, d = tokens.x.shape
        return tokens.x.float().view(b, t, n, d).mean(2)

    def segments(self, tokens: VisualTokens) -> Tensor:
        """``[B, T]`` long: the segment of each frame (0, 1, ...; consecutive frames), DySeg's cuts."""
        g = self.global_features(tokens)
        b, t, _ = g.shape
        seg = torch.zeros(b, t, dtype=torch.long, device=g.device)
        if t == 1:
            return seg
        g = g / g.norm(dim=-1, keepdim=True)
        sim = (g[:, :-1] * g[:, 1:]).sum(-1)  # [B, T - 1]: transition t -> t + 1
        k = min(self.min_segments - 1, t - 1)  # the reference's topk(c - 1) raises for T < c
        low = sim.argsort(dim=1, stable=True)[:, :k]
        cut = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, low, True) | (sim < self.tau)
        seg[:, 1:] = cut.long().cumsum(1)
        return seg

    # ------------------------------------------------------------------ STPrune
    def saliency_scores(self, tokens: VisualTokens) -> Tensor:
        """``[B, T, n]`` float32: the ATS score of each token (higher kept)."""
        t, n = self._frames(tokens)
        b, _, d = tokens.x.shape
        if self.saliency == "cls_attn":
            if tokens.cls_attn is None:
                raise ValueError("fastvid(saliency='cls_attn') needs the 'cls_attn' signal, which these tokens do not "
                                 "carry")
            return tokens.cls_attn.float().view(b, t, n)
        x = tokens.x.float().view(b, t, n, d)
        return (x * x.mean(2, keepdim=True)).sum(-1)

    @staticmethod
    def density_scores(xc: Tensor) -> Tensor:
        """``[F, m]``: DPC-kNN score ``rho * delta`` of the ``m`` tokens ``xc [F, m, D]`` (float32) of each frame,
        as the reference's "Parallel Density Score Computation" (without its random tie-break noise)."""
        d = xc.shape[-1]
        dist = torch.cdist(xc, xc) / (d ** 0.5)
        near = torch.topk(dist, k=min(4, xc.shape[1]), dim=-1, largest=False).values
        rho = (-(near ** 2).mean(dim=-1)).exp()
        denser = rho[:, None, :] > rho[:, :, None]  # [F, i, j]: token j is denser than token i
        dmax = dist.flatten(1).max(dim=-1).values[:, None, None]
        delta = torch.where(denser, dist, dmax).min(dim=-1).values
        return delta * rho

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        t, n = self._frames(tokens)
        r = self.frame_retain(t, n)
        if r >= n:  # every token kept: nothing to prune or merge
            return tokens
        s_num, c_num = self.split(t, n)
        m = n - s_num
        p = self.anchor_interval
        b, big_n, d = tokens.x.shape
        dev = tokens.x.device
        xf = tokens.x.float()
        ar_t = torch.arange(t, device=dev)

        # --- DySeg -> per frame: segment length L, index from the segment's end e, anchor counts
        seg = self.segments(tokens)  # [B, T]
        same = seg[:, :, None] == seg[:, None, :]  # [B, T, T]
        seg_len = same.sum(-1)
        before = (same & (ar_t[None, None, :] < ar_t[None, :, None])).sum(-1)  # frames of its segment before it
        from_end = seg_len - 1 - before
        cur = (c_num * seg_len) // ((seg_len + p - 1) // p)
        ctx = torch.where(from_end % p == 0, cur, torch.zeros_like(cur))  # the reference's frm_context_num_list
        single = (ctx == c_num) & (c_num > 0)  # own-frame DTM
        multi = ctx > c_num  # anchor frames of a multi-frame DTM
        k_f = torch.where(multi, ctx.clamp(max=m), torch.where(single, ctx, torch.zeros_like(ctx)))  # [B, T]
        # the anchor frame of each frame's window (the first anchor frame at or after it in its segment)
        win = ar_t[None] + from_end - p * torch.div(from_end, p, rounding_mode="floor")

        # --- ATS: the S most salient tokens of each frame (stable: ties keep the lower index)
        score_s = self.saliency_scores(tokens)
        sal_rank = score_s.sort(dim=-1, descending=True, stable=True).indices
        salient = torch.zeros(b, t, n, dtype=torch.bool, device=dev).scatter_(2, sal_rank[..., :s_num], True)

        # --- density scores over each frame's m other tokens, in ascending index order (as the reference's mask)
        ar_n = torch.arange(n, device=dev)
        ctx_idx = torch.where(salient, ar_n + n, ar_n).sort(dim=-1).values[..., :m]  # [B, T, m]
        xc = xf.view(b, t, n, d).gather(2, ctx_idx[..., None].expand(-1, -1, -1, d))
        score_d = self.density_scores(xc.reshape(b * t, m, d)).view(b, t, m)

        # --- anchors: the top-k_f density scores of each frame, listed by (frame, descending score)
        order = score_d.sort(dim=-1, descending=True, stable=True).indices  # [B, T, m]
        take = torch.arange(m, device=dev)[None, None] < k_f[..., None]  # [B, T, m] in rank order
        flat, a_valid = flag_indices(take.reshape(b, t * m))  # [B, K]
        a_frame = torch.div(flat, m, rounding_mode="floor")
        a_local = ctx_idx.reshape(b, t * m).gather(1, (a_frame * m + order.reshape(b, t * m).gather(1, flat)))
        a_tok = torch.where(a_valid, a_frame * n + a_local, torch.zeros_like(a_local))  # clip token index
        kk = a_tok.shape[1]
        if kk == 0:  # no context tokens anywhere (C == 0): the salient tokens only
            return tokens.select(*flag_indices(salient.reshape(b, big_n)))

        # --- assignment: each non-salient token to its most similar anchor in every eligible anchor frame
        frame_i = torch.div(torch.arange(big_n, device=dev), n, rounding_mode="floor")  # [N]
        eye = ar_t[:, None] == ar_t[None, :]
        group = multi[:, None, :] & same  # [B, t, f]: anchor frame f gathers frame t
        if self.dtm_scope == "window":
            group = group & (ar_t[None, None, :] == win[:, :, None])
        elig_tf = (eye[None] & single[:, None, :]) | group  # [B, T, T]
        elig = elig_tf[:, frame_i].gather(2, a_frame[:, None, :].expand(-1, big_n, -1))  # [B, N, K]
        elig = elig & ~salient.reshape(b, big_n, 1) & a_valid[:, None, :]
        xn = xf / xf.norm(dim=-1, keepdim=True)
        an = xn.gather(1, a_tok[..., None].expand(-1, -1, d))
        sim = torch.bmm(xn, an.transpose(1, 2)).masked_fill(~elig, float("-inf"))  # [B, N, K]
        fa = a_frame[:, None, :].expand(-1, big_n, -1)
        gmax = torch.full((b, big_n, t), float("-inf"), device=dev).scatter_reduce(2, fa, sim, "amax")
        best = elig & (sim == gmax.gather(2, fa))
        col = torch.where(best, torch.arange(kk, device=dev), kk)  # ties: the first anchor (as argmax)
        first = torch.full((b, big_n, t), kk, dtype=torch.long, device=dev).scatter_reduce(2, fa, col, "amin")
        member = best & (col == first.gather(2, fa))  # [B, N, K]: token i counts into anchor a

        # --- DTM features: w x_a + (1 - w) mean(members), w = max(1 / (c + 1), beta)
        cnt = member.sum(1).float()  # [B, K]
        agg = torch.bmm(member.float().transpose(1, 2), xf) / cnt.clamp(min=1)[..., None]
        w = (1 / (cnt + 1)).clamp(min=self.beta)[..., None]
        x_a = xf.gather(1, a_tok[..., None].expand(-1, -1, d))
        x_new = w * x_a + (1 - w) * agg

        # --- provenance: every kept token its own slot; a merged token goes to its anchor in its partition frame
        is_anchor = torch.zeros(b, big_n + 1, dtype=torch.bool, device=dev)
        is_anchor.scatter_(1, torch.where(a_valid, a_tok, big_n), True)
        is_anchor = is_anchor[:, :big_n]
        kept = salient.reshape(b, big_n) | is_anchor
        slot = kept.long().cumsum(1) - 1
        part = torch.where(single, ar_t[None], win)  # [B, T]: the frame whose anchor holds a merged token
        in_part = member & (a_frame[:, None, :] == part[:, frame_i][:, :, None])
        has = in_part.any(-1)
        pick = in_part.long().argmax(-1)  # [B, N]: the column of that anchor
        dest = torch.where(kept, slot,
                           torch.where(has, slot.gather(1, a_tok.gather(1, pick)), torch.full_like(slot, -1)))
        idx, valid = flag_indices(kept)
        out = tokens.merge(dest, torch.where(valid, idx, torch.full_like(idx, -1)))
        # features: the reference's DTM means (plain token means, a token may count into anchors of several
        # anchor frames), which a size-weighted merge cannot express; provenance, sizes and signals come from merge
        x_full = torch.cat([xf, xf.new_zeros(b, 1, d)], 1)
        x_full.scatter_(1, torch.where(a_valid, a_tok, big_n)[..., None].expand(-1, -1, d), x_new)
        x_out = x_full.gather(1, torch.where(valid, idx, big_n)[..., None].expand(-1, -1, d))
        return out.replace(x=x_out.to(tokens.x.dtype))


# ======================================================================================== PruneVid
def dpc_scores(x: Tensor, valid: Tensor, knn: Tensor, *, exact_self: bool = False) -> tuple[Tensor, Tensor]:
    """The density-peak scores of DPC-KNN (the ``cluster_dpc_knn`` that PruneVid and HoliTom share, from TCFormer)
    for ``G`` groups of tokens at once, each on its ``valid`` tokens only.

    Distances ``cdist / sqrt(C)`` in float32 (the reference's ``x.float()``); density ``exp(-mean squared distance
    to the knn[g] nearest tokens)``, the token itself included (the reference's ``topk(largest=False)``); ``delta``
    the distance to the nearest denser token (the group's largest distance for the densest); score
    ``delta * density``. The reference adds ``U(0, 1e-6)`` noise to the density so that no two tokens tie; ties are
    structural (with ``k = 1`` every density is ``exp(0)``), so a tie is broken by index instead, the lower index
    counting as denser: deterministic, and the reference's result whenever its noise changes no decision.

    Args:
        x: ``[G, n, C]`` features.
        valid: ``[G, n]`` bool, each group's tokens (any pattern).
        knn: ``[G]`` long neighbours of the density, ``<=`` the group's count.
        exact_self: a token's distance to itself is exactly 0 (``cdist``'s matrix-product path, taken for more than
            25 tokens, leaves rounding noise there, which with ``k = 1`` decides the centre; the reference keeps it).

    Returns:
        ``dist [G, n, n]`` float32 and ``score [G, n]``.
    """
    g, n, c = x.shape
    dev = x.device
    # the scores only decide (clusters, centres): no gradient flows through them, and the features a DeepStack level
    # follows carry a forward-mode tangent, which cdist has no rule for
    xf = x.detach().float()
    dist = torch.cdist(xf, xf) / (c**0.5)
    if exact_self:
        dist.diagonal(dim1=1, dim2=2).zero_()
    inf = torch.tensor(float("inf"), device=dev)
    kmax = max(1, min(n, int(knn.max()) if g else 1))
    near = dist.masked_fill(~valid[:, None, :], inf).topk(kmax, dim=-1, largest=False).values  # ascending
    if bool((knn == kmax).all()):
        density = (-(near**2).mean(dim=-1)).exp()  # the reference's mean, bit for bit
    else:
        take = torch.arange(kmax, device=dev)[None, None] < knn[:, None, None]
        density = (-(torch.where(take, near**2, 0.0).sum(-1) / knn.clamp(min=1)[:, None])).exp()
    ar = torch.arange(n, device=dev)
    dj, di = density[:, None, :], density[:, :, None]
    denser = ((dj > di) | ((dj == di) & (ar[None, None, :] < ar[None, :, None]))) & valid[:, None, :]
    pair = valid[:, :, None] & valid[:, None, :]
    dist_max = dist.masked_fill(~pair, -inf).flatten(1).amax(1)[:, None, None]
    delta = torch.where(denser, dist, dist_max).amin(dim=-1)  # [G, n]
    return dist, delta * density


def dpc_knn(x: Tensor, valid: Tensor, num: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-KNN clustering of many token groups at once (the reference's ``cluster_dpc_knn``, per group).

    Each group ``g`` is the valid tokens of ``x[g]``; the result equals the reference run on those tokens alone:
    distances ``cdist / sqrt(C)``; density ``exp(-mean of the squared distances to the k nearest)`` (the token
    itself included, as the reference's top-k); ``delta`` the distance to the nearest denser token (the largest
    distance of the group for the densest); the ``num[g]`` highest ``delta * density`` are the centres, in
    descending score; every token joins its nearest centre (first centre on ties, as ``argmin``) and each centre
    its own cluster.

    The reference adds ``U(0, 1e-6)`` noise to the density so that no two tokens tie; here a tie in density is
    broken by index instead (the lower index counts as denser), so the result is deterministic and equals the
    reference whenever its noise changes no decision (densities further apart than 1e-6).

    Args:
        x: ``[G, n, C]`` float features (computed in float32, as the reference's ``x.float()``).
        valid: ``[G, n]`` bool, the tokens of each group (any pattern; at least one per group).
        num: ``[G]`` long clusters per group, ``1 <= num <= count``.
        k: neighbours of the density; clamped to the group's count (the reference's ``topk`` raises there).

    Returns:
        ``label [G, n]`` long cluster of each token in ``[0, num)`` (garbage for invalid tokens), ``centers
        [G, K]`` long the centre token of each cluster (``K = max(num)``), ``center_ok [G, K]`` bool.
    """
    g, n, _ = x.shape
    dev = x.device
    inf = torch.tensor(float("inf"), device=dev)
    dist, score = dpc_scores(x, valid, valid.sum(1).clamp(max=k))
    score = score.masked_fill(~valid, -inf)
    kc = int(num.max())
    centers = score.sort(dim=1, descending=True, stable=True).indices[:, :kc]  # topk order; ties: lower index
    center_ok = torch.arange(kc, device=dev)[None] < num[:, None]
    to_center = dist.gather(1, centers[:, :, None].expand(g, kc, n))  # [G, K, n] rows of the centres
    label = to_center.masked_fill(~center_ok[:, :, None], inf).argmin(dim=1)  # first centre on ties
    # each centre belongs to its own cluster (the reference's last step); unused centres write to a dump column
    own = torch.where(center_ok, centers, torch.full_like(centers, n))
    label = torch.cat([label, torch.zeros(g, 1, dtype=label.dtype, device=dev)], 1)
    label.scatter_(1, own, torch.arange(kc, device=dev).expand(g, kc).contiguous())
    return label[:, :n], centers, center_ok


def refine_runs(labels: Tensor) -> Tensor:
    """The reference's ``refine_clusters``, batched: ``labels [B, T]`` frame clusters -> ``[B, T]`` refined.

    Per row: every cluster keeps its longest run(s) of consecutive frames (all runs of the maximal length; none if
    that length is 1); the other frames form unassigned runs that, left to right, join the neighbouring run that
    is longer at that moment (the left one on ties; label 0 when there is no neighbour). The left-to-right order
    matters (an earlier join lengthens the left run of a later one), so this loops over the ``T`` frames, each
    step batched over the rows.
    """
    b, t = labels.shape
    dev = labels.device
    ar = torch.arange(t, device=dev)
    start = torch.ones(b, t, dtype=torch.bool, device=dev)
    start[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run = start.long().cumsum(1) - 1
    run_len = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_add_(1, run, torch.ones_like(run))
    length = run_len.gather(1, run)  # [B, T] length of the run each frame is in
    lab = labels.clamp(min=0)
    longest = torch.zeros(b, int(lab.max()) + 1 if t else 1, dtype=torch.long, device=dev)
    longest = longest.scatter_reduce(1, lab, length, reduce="amax").gather(1, lab)
    refined = torch.where((length == longest) & (longest > 1), labels, torch.full_like(labels, -1))
    # the first kept frame at or after each frame (t if none): the right neighbour of an unassigned run
    nxt = torch.where(refined >= 0, ar, torch.full_like(ar, t)).flip(1).cummin(1).values.flip(1)
    right_ok = nxt < t
    right_label = refined.gather(1, nxt.clamp(max=t - 1))
    right_len = torch.where(right_ok, length.gather(1, nxt.clamp(max=t - 1)), torch.zeros_like(nxt))
    cur_len = torch.zeros(b, t, dtype=torch.long, device=dev)  # run length ending at each frame, refined labels
    for i in range(t):
        if i > 0:
            left_label, left_len = refined[:, i - 1], cur_len[:, i - 1]
        else:
            left_label, left_len = torch.zeros_like(refined[:, 0]), torch.zeros_like(cur_len[:, 0])
        new = torch.where(left_len > right_len[:, i], left_label,
                          torch.where(right_len[:, i] > left_len, right_label[:, i],
                                      torch.where(left_len > 0, left_label,
                                                  torch.where(right_ok[:, i], right_label[:, i], 0))))
        fill = (refined[:, i] < 0)[:, None] & (ar[None] >= i) & (ar[None] < nxt[:, i : i + 1])
        refined = torch.where(fill, new[:, None], refined)
        if i > 0:
            cur_len[:, i] = torch.where(refined[:, i] == refined[:, i - 1], cur_len[:, i - 1] + 1, 1)
        else:
            cur_len[:, i] = 1
    return refined


@register
@dataclass
class PruneVid(TemporalCompressor):
    """PruneVid (Huang et al., arXiv 2412.16117): static tokens merged over time, dynamic tokens clustered in space.

    The pre-LLM part of the reference, ``merge_frames_dynamic`` (Visual-AI/PruneVid,
    ``models/pllava/modeling_pllava.py``), on the clip ``x [B, T * L, D]`` (``L = h * w`` tokens a frame):

    1. Scenes: the frame means ``[B, T, D]`` are clustered by DPC-KNN into ``max(1, int(T *
       temporal_segment_ratio))`` clusters (``k`` neighbours), refined into runs of consecutive frames
       (``refine_clusters``); each run of equal labels is a segment of ``W`` frames.
    2. Static / dynamic: a grid position ``l`` is static in a segment when the mean pairwise cosine similarity of
       its ``W`` tokens (``W >= 2``) exceeds ``tau``; its ``W`` tokens merge into one (their mean).
    3. Spatial clustering: the static tokens of a segment (one group) and the dynamic tokens of each frame (one
       group per frame) are each clustered by DPC-KNN into ``max(1, int(n * ratio))`` clusters when the group
       has ``n > cluster_min`` tokens (each cluster becomes its mean); groups of at most ``cluster_min`` are kept.

    Budget: ``budget`` is the reference's ``cluster_ratio`` (the paper's default 0.5): a float in ``(0, 1]``
    directly, an int (tokens per clip) as the fraction ``budget / N`` of the clip's ``N = T * L`` tokens (an int
    above ``N`` raises). The count is not set by the budget alone: a row keeps
    ``sum_segments f(S_s) + sum_frames f(L - S_seg(t))`` tokens, ``S_s`` the static positions of segment ``s``,
    ``f(n) = n if n <= cluster_min else max(1, int(n * ratio))``; so it is at most about ``budget * N`` plus the
    small groups, less where tokens are static. ``budget = 1.0`` (or an int equal to ``N``) returns the input
    unchanged ("keep everything"; the reference with ``cluster_ratio = 1`` would still merge static tokens).

    Output tokens are in clip order (ascending ``pos``): a static token keeps the position of its cluster centre
    in the segment's first frame, a dynamic one the position of its centre in its frame. Merged features are
    size-weighted means of the original tokens (the reference's mean over frames, then over a cluster).

    Left out: the reference's third stage, keeping the ``alpha`` share of tokens most attended by the question in
    LLM layer ``selected_layer`` (``VTPWindowCache.process_attention``): it needs the LLM's attention, not
    available to a pre-LLM method on videos.

    Args:
        tau: cosine-similarity threshold of static tokens (reference ``tau``, paper default 0.8), in ``[-1, 1]``.
        temporal_segment_ratio: scene clusters per frame (reference default 0.25), in ``(0, 1]``.
        k: DPC-KNN neighbours of the density (the reference's 7, for frames and tokens alike), ``>= 1``.
        cluster_min: groups of at most this many tokens are not clustered (the reference's 14), ``>= 0``.
    """

    budget: int | float = 0.5
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    k: int = 7
    cluster_min: int = 14

    name: ClassVar[str] = "prunevid"
    paper: ClassVar[str] = "PruneVid (arXiv 2412.16117; Visual-AI/PruneVid models/pllava/modeling_pllava.py)"
    matches_reference: ClassVar[str] = (
        "deviation: the pre-LLM merge_frames_dynamic only (the LLM question-attention selection, alpha / "
        "selected_layer, is left out); tokens in clip order, not [static, dynamic] per segment; scenes per clip, "
        "not the first clip's for the batch; DPC-KNN density ties broken by index instead of 1e-6 random noise; "
        "k and cluster counts clamped where the reference raises"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tau", "temporal_segment_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} must be a finite float")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau!r} is out of range: a cosine-similarity threshold in [-1, 1]")
        if not 0.0 < self.temporal_segment_ratio <= 1.0:
            raise ValueError(f"temporal_segment_ratio={self.temporal_segment_ratio!r} is out of range: scene "
                             "clusters per frame, in (0, 1]")
        for name, low in (("k", 1), ("cluster_min", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}={v!r} must be an int >= {low}")

    # ------------------------------------------------------------------ the steps
    def ratio(self, num_tokens: int) -> float:
        """The reference's ``cluster_ratio`` for a clip of ``num_tokens`` tokens."""
        if isinstance(self.budget, int):
            return budget_tokens(self.budget, num_tokens) / num_tokens
        return float(self.budget)

    @staticmethod
    def _clip(tokens: VisualTokens) -> tuple[int, int]:
        if tokens.layout is None or not bool(tokens.mask.all()):
            raise ValueError("method 'prunevid' compares the tokens of each grid position across the frames of a "
                             "scene: it needs every frame's full grid of tokens (run it first, or after grid "
                             "methods such as avg_pool only)")
        return tokens.frames, tokens.layout[0] * tokens.layout[1]

    def segments(self, tokens: VisualTokens) -> Tensor:
        """``[B, T]`` long: the segment (scene) of each frame, ``0, 1, ...`` in time order."""
        t, hw = self._clip(tokens)
        b, _, d = tokens.x.shape
        means = tokens.x.float().view(b, t, hw, d).mean(2)  # [B, T, D]
        num = torch.full((b,), max(1, int(t * self.temporal_segment_ratio)), dtype=torch.long, device=means.device)
        ok = torch.ones(b, t, dtype=torch.bool, device=means.device)
        labels, _, _ = dpc_knn(means, ok, num, self.k)
        refined = refine_runs(labels)
        change = torch.ones_like(refined, dtype=torch.bool)
        change[:, 1:] = refined[:, 1:] != refined[:, :-1]
        return change.long().cumsum(1) - 1

    def plan(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        """The merge plan: ``dest [B, N]`` (output slot of each token) and ``anchor [B, M]`` (the token whose
        ``pos`` each slot keeps, ascending, ``-1`` padding): the arguments of :meth:`VisualTokens.merge`."""
        t, hw = self._clip(tokens)
        b, n, d = tokens.x.shape
        dev = tokens.x.device
        seg = self.segments(tokens)  # [B, T]
        x = tokens.x.float().view(b, t, hw, d)
        onehot = F.one_hot(seg, t).to(torch.float32).transpose(1, 2)  # [B, S=T slots, T]
        width = onehot.sum(2)  # [B, S] frames of each segment (0: unused slot)
        # mean pairwise cosine of each position over the segment's frames: sum over all pairs = |sum of unit
        # vectors|^2, minus the W self-pairs (the reference's "- 1" per frame), over W (W - 1)
        unit = F.normalize(x, p=2, dim=-1)
        usum = torch.bmm(onehot, unit.reshape(b, t, hw * d)).view(b, t, hw, d)
        w = width[:, :, None]
        sim = ((usum * usum).sum(-1) - w) / (w * (w - 1)).clamp_min(1)
        static = (sim > self.tau) & (w >= 2)  # [B, S, L]; W = 1 is NaN in the reference: never static
        first = (width.cumsum(1) - width).long()  # [B, S] first frame of each segment
        seg_mean = torch.bmm(onehot, x.reshape(b, t, hw * d)).view(b, t, hw, d) / w[..., None].clamp_min(1)
        static_tok = static.gather(1, seg[:, :, None].expand(b, t, hw))  # [B, T, L]
        # the groups clustered in space: the static positions of each segment (their segment means), the dynamic
        # positions of each frame (their features)
        feats = torch.cat([seg_mean.reshape(b * t, hw, d), x.reshape(b * t, hw, d)])  # [2 B T, L, D]
        member = torch.cat([static.reshape(b * t, hw), ~static_tok.reshape(b * t, hw)])
        count = member.sum(1)
        num = (count.double() * self.ratio(n)).floor().long().clamp(min=1)
        loc = torch.arange(hw, device=dev).expand(2 * b * t, hw).clone()  # anchor position of each token's slot
        big = (count > self.cluster_min).nonzero()[:, 0]
        if big.numel():
            label, centers, _ = dpc_knn(feats[big], member[big], num[big], self.k)
            loc[big] = centers.gather(1, label)
        static_loc, dyn_loc = loc[: b * t].view(b, t, hw), loc[b * t :].view(b, t, hw)
        # the anchor token of each token: a static one at its centre in the segment's first frame, a dynamic one
        # at its centre in its own frame; anchors are distinct per slot, so they name the slots
        frame = torch.arange(t, device=dev)[None, :, None]
        anchor_static = (first.gather(1, seg)[:, :, None] * hw + static_loc.gather(1, seg[:, :, None].expand(
            b, t, hw)))
        anchor_of = torch.where(static_tok, anchor_static, frame * hw + dyn_loc).reshape(b, n)
        is_anchor = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, anchor_of, True)
        slot = is_anchor.long().cumsum(1) - 1
        dest = slot.gather(1, anchor_of)
        idx, ok = flag_indices(is_anchor)
        return dest, torch.where(ok, idx, torch.full_like(idx, -1))

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        t, hw = self._clip(tokens)
        if self.ratio(t * hw) >= 1.0:  # keep everything (the budget language's 1.0), see the class docstring
            return tokens
        dest, anchor = self.plan(tokens)
        return tokens.merge(dest, anchor)


# ========================================================================================= HoliTom
def _dpc_knn(feat: Tensor, valid: Tensor, num: Tensor, knn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-KNN clustering of ``G`` groups of tokens at once, as the reference's ``cluster_dpc_knn`` followed by the
    assignment of ``merge_tokens_by_clustering``, on each group's ``valid`` tokens only.

    Args:
        feat: ``[G, n, D]`` features (any float dtype; distances in float32 as the reference's ``x.float()``).
        valid: ``[G, n]`` bool, the tokens of each group (anywhere in the row; the others take no part).
        num: ``[G]`` long, clusters per group (``<=`` its valid tokens; 0: no clusters, every token unowned).
        knn: ``[G]`` long, neighbours of the local density (the reference's ``k = min(K, cluster_num)``).

    Returns:
        ``center [G, n]`` bool (the ``num[g]`` centres), ``owner [G, n]`` long (index in the row of the centre each
        valid token joins: itself for a centre; ``-1`` for invalid tokens or a group without clusters) and
        ``members [G, n]`` long (non-centre tokens that joined each centre).
    """
    g, n, _ = feat.shape
    f = feat
    dist, score = dpc_scores(feat, valid, knn, exact_self=True)
    inf = torch.tensor(float("inf"), device=f.device)
    ar = torch.arange(n, device=f.device)
    idx, ok = topk_sorted(score, num, valid)
    center = torch.zeros(g, n, dtype=torch.bool, device=f.device)
    if idx.shape[1]:
        center.scatter_(1, idx, ok)  # the picks of a row are distinct indices: no write hides another
    # every other token joins its nearest centre (argmin: the first, i.e. lowest-index, centre on ties, as the
    # reference's argmin over its ascending-sorted centres)
    nearest = torch.where(center[:, None, :], dist, inf).argmin(-1)
    owner = torch.where(center, ar[None], nearest)
    owner = torch.where(valid & (num > 0)[:, None], owner, torch.full_like(owner, -1))
    joins = (owner >= 0) & ~center
    members = torch.zeros(g, n, dtype=torch.long, device=f.device).scatter_add_(
        1, owner.clamp(min=0), joins.to(torch.long))
    return center, owner, members


@register
@dataclass
class HoliTom(TemporalCompressor):
    """HoliTom's outer-LLM merging (Shao et al., arXiv 2505.21334; cokeshao/HoliTom ``holitom/llava_arch.py``, the
    video branch of ``prepare_inputs_labels_for_multimodal``): global redundancy-aware temporal segmentation, then
    spatio-temporal merging within each segment.

    Input: clip tokens ``x [B, T * n, D]`` holding every frame's full grid (``n = h * w``: the projected video
    features the LLM would receive, e.g. LLaVA-OneVision after its 2x2 frame pooling, which is where the reference
    acts). Output: ``[B, K, D]`` merged tokens in clip order (ascending ``pos``), one row per clip.

    1. Temporal segmentation (``select_static_windows``): ``sim [T - 1, n]`` is the cosine similarity of each token
       with the same grid position of the next frame (of the L2-normalised features, computed in the input dtype,
       as the reference). A position is *static* over frames ``s..e`` when every step's ``sim > tau``; merging it
       saves ``e - s`` tokens. A dynamic programme over the frames splits the clip into segments of at most
       ``max_window`` frames maximising the tokens saved ``R`` (ties: the shorter last segment, the reference's
       strict ``>``).
    2. Within a segment of ``W > 1`` frames (``get_static_dynamic_features``), its static positions become one
       token each, the mean over the ``W`` frames (temporal merge); the other (dynamic) tokens stay per frame. A
       segment of one frame has no static tokens.
    3. Spatial merge (``holitom``): the retention ratio is raised to ``r' = min(r * N / (N - R), 1)`` (``N = T * n``),
       then each frame's ``n_d`` dynamic tokens keep ``c = ceil(n_d * r')`` tokens
       (``merge_tokens_by_attention_density``): ``round(c * (1 - contextual))`` *dominant* tokens of the highest
       vision-encoder attention (``cls_attn``) are kept as they are and the rest are clustered into the other
       tokens by DPC-KNN; each segment's ``n_s`` static tokens are clustered into ``round(n_s * r')`` tokens
       (``merge_tokens_by_density``; ``round``, not ``ceil``, as the reference: a segment with few static tokens
       can keep none of them, and those patches are dropped).
    4. DPC-KNN (``cluster_dpc_knn``, ``merge_tokens_by_clustering``): distances ``cdist / sqrt(D)``, density
       ``exp(-mean of the squared distances to the min(k, clusters) nearest)``, centres = the top ``score =
       density * distance to the nearest denser token``; every other token joins its nearest centre and the centre
       becomes ``beta * centre + (1 - beta) * mean(its members)`` (``beta=None``: the plain mean of the centre and
       its members, the reference's ``NO_BETA``). A centre keeps its own position; a static token sits at its
       segment's first frame (the order of the reference's ``mm_newline_position="grid"`` path, which sorts each
       frame by position; newline tokens are the model's business).

    Means are plain (unweighted) means of the features, as the reference's, whatever ``size`` the tokens carry;
    ``size`` and ``assign`` record every merged patch.

    Budget (per clip): ``r = budget`` for a float in (0, 1] (the reference's ``RETAIN_RATIO``; its scripts use
    0.10-0.25), ``r = budget / N`` for an int (tokens kept of the clip, ``<= N``). The count the method produces is
    the reference's: ``K = sum over frames of ceil(n_d * r') + sum over segments of round(n_s * r')``, about
    ``r * N`` (each frame's ``ceil`` adds under one token; ``K = N - R < r * N`` when ``r'`` reaches 1). ``budget=1.0``
    (or ``N``) returns the clip unchanged (the reference at ``RETAIN_RATIO=1`` would still merge the static tokens of
    its segments, ``K = N - R``; any budget below it does).

    Hyper-parameters (reference environment variable and default in brackets): ``tau`` [``T``, 0.8], ``beta``
    [``BETA``, 0.6; ``NO_BETA``], ``k`` [``K``, 7], ``max_window`` [``MAX_WINDOW_SIZE``, 1024], ``contextual``
    [``D``, 0]: the fraction of each frame's dynamic budget given to DPC-KNN clusters instead of attention-ranked
    dominant tokens. Our default is ``contextual=1.0``, the feature-only path: the vision-encoder attention the
    reference's default ``D=0`` ranks by is not available for videos at this stage; ``contextual < 1`` needs the
    ``cls_attn`` signal on the tokens (the mean attention each token receives, as the reference's SigLIP
    ``attn_weights.mean(1).mean(1)`` pooled like the features) and ``contextual=0`` is the reference's default.

    Differences from the reference code: the density's random tie-break (``+ torch.rand * 1e-6``, "to ensure no
    tokens have the same density") is a deterministic one, the lower index counting as denser on an exact tie (ties
    are structural: a group of one cluster has ``k = 1``, every density ``exp(0)``), and a token's distance to itself
    is exactly 0 (``cdist`` leaves rounding noise there for more than 25 tokens); the reference's contextual path
    (any ``D > 0`` with clusters) raises, its ``pos.masked_select(mask.unsqueeze(-1))`` broadcasting a ``[F, L]``
    tensor with an ``[F, L, 1]`` mask: we do what it means, ``pos.masked_select(mask)``; ties in ``topk`` go to the
    lower index. Left out: the inner-LLM merging (``HOLITOM_k`` / ``HOLITOM_r``, ``holitom/modeling_qwen2.py``
    ``Qwen2Model_holitom.forward``: at decoder layer ``k`` the visual tokens keep the ``1 - r`` of highest
    last-token attention of layer ``k - 1`` and each other one is averaged into its most cosine-similar kept hidden
    state), which needs the LLM's attention and hidden states, not available at this stage.
    """

    budget: int | float = 0.5
    tau: float = 0.8
    beta: float | None = 0.6
    k: int = 7
    max_window: int = 1024
    contextual: float = 1.0

    name: ClassVar[str] = "holitom"
    paper: ClassVar[str] = ("HoliTom (Shao et al., arXiv 2505.21334; cokeshao/HoliTom holitom/llava_arch.py "
                            "prepare_inputs_labels_for_multimodal)")
    matches_reference: ClassVar[str] = (
        "deviation: outer-LLM merging only (the inner-LLM merging, HOLITOM_k / HOLITOM_r, is left out); the same "
        "segments, merged tokens and features as the reference, its random density tie-break (+ rand * 1e-6) made "
        "deterministic (lower index denser); default "
        "contextual=1.0 (feature-only DPC-KNN for dynamic tokens; the reference's D=0 ranks them by vision attention: "
        "contextual=0 with cls_attn); the reference's contextual-path pos bug (it raises for D > 0) fixed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau!r} is invalid: the cosine-similarity threshold of a static token is a "
                             "number in [-1, 1] (the reference's T, 0.8)")
        b = self.beta
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0):
            raise ValueError(f"beta={b!r} is invalid: the weight of a cluster centre is a number in [0, 1] (the "
                             "reference's BETA, 0.6), or None for the plain mean (NO_BETA)")
        for name in ("k", "max_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                what = "neighbours of the DPC-KNN density (the reference's K, 7)" if name == "k" else \
                    "frames of a segment at most (the reference's MAX_WINDOW_SIZE, 1024)"
                raise ValueError(f"{name}={v!r} is invalid: the {what} is an int >= 1")
        c = self.contextual
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise ValueError(f"contextual={c!r} is invalid: the fraction of each frame's dynamic tokens kept as "
                             "DPC-KNN clusters (the rest: top vision attention) is a number in [0, 1] (the "
                             "reference's D)")

    # ------------------------------------------------------------------ the budget
    def ratio(self, total: int) -> float:
        """``r``: the reference's retention ratio for a clip of ``total`` tokens (``ValueError`` for an int budget
        above it)."""
        if isinstance(self.budget, int):
            if self.budget > total:
                raise ValueError(f"budget={self.budget} tokens is out of range: the clip has N={total} tokens")
            return self.budget / total
        return float(self.budget)

    # ------------------------------------------------------------------ 1. temporal segmentation
    def segments(self, tokens: VisualTokens) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The reference's ``select_static_windows`` for every clip at once.

        Returns ``start [B, T]`` / ``end [B, T]`` long (first and last frame of each frame's segment), ``reduced
        [B]`` float64 (the tokens the segmentation saves, the reference's ``total_reduced``) and ``static
        [B, T, n]`` bool (the positions merged over their segment; False in segments of one frame).
        """
        t_, n = _full_clip(tokens, self.name)
        b, _, d = tokens.x.shape
        dev = tokens.x.device
        x = tokens.x.reshape(b, t_, n, d)
        xn = F.normalize(x, p=2, dim=-1)  # the reference normalises, then takes cosine_similarity (kept as is)
        sim = F.cosine_similarity(xn[:, :-1], xn[:, 1:], dim=-1)  # [B, T - 1, n]
        broken = (~(sim > self.tau)).to(torch.long)
        # breaks[b, i, p]: frame steps q < i where position p changed; p is static over frames s..e iff
        # breaks[e] == breaks[s] (the reference's cumprod of sim > tau from s)
        breaks = torch.cat([torch.zeros(b, 1, n, dtype=torch.long, device=dev), broken.cumsum(1)], dim=1)
        ar = torch.arange(t_, device=dev)
        same = (breaks[:, :, None, :] == breaks[:, None, :, :]).sum(-1)  # [B, s, e] static positions over s..e
        saved = (same * (ar[None, :] - ar[:, None]).clamp(min=0)).float()  # pruned_static_count[s, e]
        # dynamic programme over the frames (sequential in the frame; vectorised over clips and window sizes):
        # dp[i] = best saving of frames 0..i, prev[i] = first frame of the last segment
        dp = torch.zeros(b, t_, dtype=torch.float32, device=dev)
        prev = torch.zeros(b, t_, dtype=torch.long, device=dev)
        zero = torch.zeros(b, dtype=torch.float32, device=dev)
        for i in range(t_):
            base = dp[:, i - 1] if i > 0 else zero
            top_ws = min(i + 1, self.max_window)
            if top_ws < 2:
                dp[:, i] = base
                prev[:, i] = i
                continue
            ws = torch.arange(2, top_ws + 1, device=dev)
            j = i - ws  # the last frame before the segment [j + 1, i]; -1: the segment starts the clip
            val = torch.where(j >= 0, dp[:, j.clamp(min=0)], zero[:, None]) + saved[:, j + 1, i]  # [B, windows]
            # the reference's running max with a strict '>' keeps the first (shortest) window reaching the max
            a = val.argmax(1)
            top = val.gather(1, a[:, None])[:, 0]
            better = top > base
            dp[:, i] = torch.where(better, top, base)
            prev[:, i] = torch.where(better, i - ws[a] + 1, torch.full_like(a, i))
        # backtrack from the last frame (a loop over segments, vectorised over clips)
        first = torch.zeros(b, t_ + 1, dtype=torch.bool, device=dev)  # column T: dump for finished clips
        cur = torch.full((b,), t_ - 1, dtype=torch.long, device=dev)
        for _ in range(t_):
            act = cur >= 0
            s = prev.gather(1, cur.clamp(min=0)[:, None])[:, 0]
            first.scatter_(1, torch.where(act, s, torch.full_like(s, t_))[:, None], True)
            cur = torch.where(act, s - 1, cur)
        first = first[:, :t_]
        start = torch.where(first, ar[None], torch.full_like(prev, -1)).cummax(1).values
        nxt = torch.where(first, ar[None], torch.full_like(prev, t_)).flip(1).cummin(1).values.flip(1)
        end = torch.cat([nxt[:, 1:], torch.full((b, 1), t_, dtype=torch.long, device=dev)], dim=1) - 1
        idx = lambda f: f[..., None].expand(b, t_, n)  # noqa: E731
        static = (end > start)[..., None] & (breaks.gather(1, idx(end)) == breaks.gather(1, idx(start)))
        return start, end, dp[:, -1].double(), static

    # ------------------------------------------------------------------ the whole method
    def compress(self, tokens: VisualTokens) -> VisualTokens:
        t_, n = _full_clip(tokens, self.name)
        b, total, d = tokens.x.shape
        r = self.ratio(total)
        if r >= 1.0:
            return tokens
        dev = tokens.x.device
        start, end, reduced, static = self.segments(tokens)
        # the reference raises its ratio by the share the segmentation already saved: r / ((N - R) / N), at most 1
        # (float64: the reference's Python floats)
        rr = torch.clamp(r / ((total - reduced) / total), max=1.0)  # [B]
        n_dyn = (n - static.sum(-1)).double()  # [B, T] dynamic tokens of each frame
        keep = torch.ceil(n_dyn * rr[:, None])
        dom = torch.round(keep * (1 - self.contextual)).long()  # round: half to even, as Python's round
        ctx = keep.long() - dom
        window = (end > start) & (start == torch.arange(t_, device=dev)[None])  # first frame of a segment W > 1
        n_stat = static.sum(-1).double()
        n_clu = torch.where(window, torch.round(n_stat * rr[:, None]).long(), torch.zeros_like(dom))

        # dominant tokens: the highest attention among each frame's dynamic tokens, kept as they are
        dominant = torch.zeros(b, t_, n, dtype=torch.bool, device=dev)
        if bool((dom > 0).any()):
            if tokens.cls_attn is None:
                raise ValueError(f"holitom with contextual={self.contextual} keeps the dynamic tokens of highest "
                                 "vision-encoder attention: it needs the cls_attn signal, which these tokens do not "
                                 "carry (contextual=1.0 needs features only)")
            attn = tokens.cls_attn.reshape(b * t_, n)
            pick, ok = topk_sorted(attn, dom.view(-1), ~static.view(b * t_, n))
            if pick.shape[1]:
                dominant.view(b * t_, n).scatter_(1, pick, ok)

        # contextual tokens: DPC-KNN within each frame's remaining dynamic tokens
        num = ctx.view(-1)
        c_dyn, o_dyn, m_dyn = _dpc_knn(tokens.x.reshape(b * t_, n, d), (~static & ~dominant).view(b * t_, n), num,
                                       num.clamp(max=self.k))
        frame = torch.arange(t_, device=dev)[None, :, None]
        ar_n = torch.arange(n, device=dev)
        o_dyn, m_dyn = o_dyn.view(b, t_, n), m_dyn.view(b, t_, n)
        anchor = torch.where(dominant, frame * n + ar_n, torch.where(o_dyn >= 0, frame * n + o_dyn, -1))
        owner, members = o_dyn, m_dyn

        # static tokens: the mean over the segment's frames, then DPC-KNN within the segment
        groups = int(window.sum())
        if groups:
            gid = torch.full((b * t_,), -1, dtype=torch.long, device=dev)
            gid[window.view(-1)] = torch.arange(groups, device=dev)
            rows = torch.arange(b, device=dev)[:, None] * t_
            frame_g = gid[(rows + start).view(-1)]  # [B * T] the static group of each frame, -1 in one-frame segments
            inside = frame_g >= 0
            xs = torch.zeros(groups, n, d, dtype=torch.float32, device=dev).index_add_(
                0, frame_g[inside], tokens.x.reshape(b * t_, n, d)[inside].float())
            width = (end - start + 1).view(-1)[window.view(-1)].to(torch.float32)
            xs = xs / width[:, None, None]
            g_static = static.view(b * t_, n)[window.view(-1)]
            g_num = n_clu.view(-1)[window.view(-1)]
            _, o_st, m_st = _dpc_knn(xs, g_static, g_num, g_num.clamp(max=self.k))
            fg = frame_g.clamp(min=0).view(b, t_)
            o_st, m_st = o_st[fg], m_st[fg]  # [B, T, n]: every frame of a segment shares its static clustering
            anchor = torch.where(static, torch.where(o_st >= 0, start[..., None] * n + o_st, -1), anchor)
            owner = torch.where(static, o_st, owner)
            members = torch.where(static, m_st, members)

        # weights of the merge: a centre beta, each of its m members (1 - beta) / m (the same for all W frames of a
        # static token, so the result is beta * mean_t(centre) + (1 - beta) * mean(members' temporal means))
        if self.beta is None:
            w = torch.ones(b, t_, n, dtype=torch.float32, device=dev)
        else:
            m = members.gather(2, owner.clamp(min=0)).to(torch.float32)  # members of each token's centre
            is_center = owner == ar_n
            w = torch.where(is_center, torch.where(m > 0, float(self.beta), 1.0),
                            (1.0 - float(self.beta)) / m.clamp(min=1))
            w = torch.where(dominant, torch.ones_like(w), w)
        anchor = anchor.view(b, total)
        is_anchor = anchor == torch.arange(total, device=dev)[None]
        slot = is_anchor.cumsum(1) - 1
        dest = torch.where(anchor >= 0, slot.gather(1, anchor.clamp(min=0)), torch.full_like(anchor, -1))
        idx, ok = flag_indices(is_anchor)
        # plain means as the reference: cancel the size weighting of merge
        return tokens.merge(dest, torch.where(ok, idx, torch.full_like(idx, -1)),
                            weight=w.view(b, total) / tokens.size.to(torch.float32))

    def kept(self, tokens: VisualTokens) -> Tensor:
        """``[B]`` long: the count :meth:`compress` produces for each clip (the formula of the class docstring)."""
        t_, n = _full_clip(tokens, self.name)
        total = t_ * n
        r = self.ratio(total)
        if r >= 1.0:
            return torch.full((tokens.batch_size,), total, dtype=torch.long, device=tokens.x.device)
        start, end, reduced, static = self.segments(tokens)
        rr = torch.clamp(r / ((total - reduced) / total), max=1.0)
        dyn = torch.ceil((n - static.sum(-1)).double() * rr[:, None]).sum(1)
        window = (end > start) & (start == torch.arange(t_, device=tokens.x.device)[None])
        stat = torch.where(window, torch.round(static.sum(-1).double() * rr[:, None]), 0.0).sum(1)
        return (dyn + stat).long()
