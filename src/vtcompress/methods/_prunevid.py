"""PruneVid (Huang et al., arXiv 2412.16117), the pre-LLM part: scene segmentation and static / dynamic token merging.

Reference: github Visual-AI/PruneVid (commit b12600c), ``models/pllava/modeling_pllava.py``:
``PllavaForConditionalGeneration.merge_frames_dynamic`` with its helpers ``cluster_dpc_knn``, ``refine_clusters``,
``segment_lengths``, ``spatial_merge_tokens`` / ``compute_cluster_vectors`` (the same code is in ModelTC/LightCompress
``llmc/compression/token_reduction/prunevid.py``). Re-typed in ``tests/reference/test_ref_prunevid.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compressor import TemporalCompressor, budget_tokens, register
from ..ops import flag_indices
from ..tokens import VisualTokens

__all__ = ["PruneVid", "dpc_knn", "refine_runs"]


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
    g, n, c = x.shape
    dev = x.device
    xf = x.float()
    dist = torch.cdist(xf, xf) / (c**0.5)  # [G, n, n]
    cnt = valid.sum(1)
    inf = torch.tensor(float("inf"), device=dev)
    kk = cnt.clamp(max=k)
    kmax = int(kk.max())
    near = dist.masked_fill(~valid[:, None, :], inf).topk(kmax, dim=-1, largest=False).values  # ascending
    take = torch.arange(kmax, device=dev)[None, None] < kk[:, None, None]
    if bool((kk == kmax).all()):
        density = (-(near**2).mean(dim=-1)).exp()
    else:
        density = (-(torch.where(take, near**2, 0.0).sum(-1) / kk[:, None])).exp()
    # j is denser than i (strict total order: equal densities go to the lower index, in place of the noise)
    ar = torch.arange(n, device=dev)
    dj, di = density[:, None, :], density[:, :, None]
    denser = ((dj > di) | ((dj == di) & (ar[None, None, :] < ar[None, :, None]))) & valid[:, None, :]
    pair = valid[:, :, None] & valid[:, None, :]
    dist_max = dist.masked_fill(~pair, -inf).flatten(1).amax(1)[:, None, None]
    delta = torch.where(denser, dist, dist_max).amin(dim=-1)  # [G, n]
    score = (delta * density).masked_fill(~valid, -inf)
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
