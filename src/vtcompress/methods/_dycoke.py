"""DyCoke's temporal token merging (TTM) stage (work in progress, merged into temporal.py when done).

DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", CVPR 2025,
arXiv 2411.15024); reference code: github KD-TAO/DyCoke, ``llava/model/llava_arch.py``, ``dycole_ttm`` (HEAD
dd74634, the function as last changed by 35cc532 "Update ttm code").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..compressor import TemporalCompressor, keep_counts, register
from ..tokens import VisualTokens
from .temporal import _full_clip

__all__ = ["DyCoke"]


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
