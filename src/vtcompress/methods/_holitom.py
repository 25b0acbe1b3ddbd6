"""HoliTom's outer-LLM token merging (work in progress, merged into temporal.py when done).

HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", arXiv 2505.21334);
reference code: github cokeshao/HoliTom (HEAD e9b2972), ``holitom/llava_arch.py``, class
``LlavaMetaForCausalLM_holitom``: the video branch of ``prepare_inputs_labels_for_multimodal`` and the functions it
calls, ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``,
``merge_tokens_by_density``, ``cluster_dpc_knn`` and ``merge_tokens_by_clustering``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compressor import TemporalCompressor, register
from ..ops import flag_indices, topk_sorted
from ..tokens import VisualTokens
from .temporal import _full_clip

__all__ = ["HoliTom"]


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
    g, n, d = feat.shape
    f = feat.float()
    dist = torch.cdist(f, f) / (d**0.5)  # [G, n, n], as the reference
    # a token's distance to itself is 0 (cdist's matrix-product path, taken for more than 25 tokens, leaves rounding
    # noise there, which with k = 1 would decide the centre): exact, and independent of the group's padding
    dist.diagonal(dim1=1, dim2=2).zero_()
    inf = torch.tensor(float("inf"), device=f.device)
    col = valid[:, None, :]
    # local density: exp(-mean squared distance to the k nearest tokens of the group, itself included)
    kmax = max(1, min(n, int(knn.max()) if g else 1))
    near = torch.where(col, dist, inf).topk(kmax, dim=-1, largest=False).values  # ascending, as topk(largest=False)
    take = torch.arange(kmax, device=f.device) < knn[:, None, None]
    sq = torch.where(take, near**2, torch.zeros((), device=f.device))
    density = (-(sq.sum(-1) / knn.clamp(min=1)[:, None].to(sq.dtype))).exp()  # [G, n]
    # the reference adds torch.rand * 1e-6 to the density "to ensure no tokens have the same density" (ties are
    # structural: with k = 1 every density is exp(0) = 1; with k = 2 mutual nearest neighbours tie): we break exact
    # ties deterministically instead, the lower index counting as denser
    ar = torch.arange(n, device=f.device)
    di, dj = density[:, :, None], density[:, None, :]
    higher = col & ((dj > di) | ((dj == di) & (ar[None, None, :] < ar[None, :, None])))  # [G, i, j]: j denser
    pair = valid[:, :, None] & col
    dist_max = torch.where(pair, dist, -inf).flatten(1).amax(1)  # the group's largest distance
    delta = torch.where(higher, dist, dist_max[:, None, None]).amin(-1)  # distance to the nearest denser token
    score = delta * density
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

