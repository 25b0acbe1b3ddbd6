"""FastVID: dynamic temporal segmentation + spatiotemporal pruning (work in progress, merged into temporal.py).

FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", arXiv 2503.11187);
reference code: github LunarShen/FastVID (HEAD a40a109), LLaVA-OneVision port
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py``, ``Qwen2Model.forward``, the
block ``FastVID`` (DySeg, STPrune: ATS + density scores + DTM), with its signals from
``llava/model/llava_arch.py`` ``encode_images`` / ``get_attn_2dPool`` and
``multimodal_encoder/siglip_encoder.py`` ``SigLipVisionAbstract.forward``; defaults from
``lmms-eval/lmms_eval/models/llava_onevision.py`` / ``scripts/eval.sh``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..compressor import Signal, TemporalCompressor, register
from ..ops import flag_indices
from ..tokens import VisualTokens

__all__ = ["FastVID"]


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
