"""Temporal methods: compress a video clip across its frames.

Each method receives clip tokens (:class:`~vtcompress.tokens.VisualTokens` with ``frames = T``: the projected
features of ``T`` frames of one ``grid = (H, W)``, ``pos`` numbered frame after frame) and keeps, merges or drops
tokens across frames. Budgets count per clip: an ``int`` is the tokens kept of the clip, a ``float`` the fraction
of its tokens. Spatial methods compose with them: a spatial method given a clip acts frame by frame.

The family's reference implementations (each re-typed in ``tests/reference/``):

* EVS — Efficient Video Sampling (Bagrov et al., arXiv 2510.14624): vLLM ``vllm/multimodal/evs.py``
  ``compute_retention_mask``;
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..compressor import TemporalCompressor, register
from ..tokens import VisualTokens

__all__ = ["EVS"]


def _full_clip(tokens: VisualTokens, name: str) -> tuple[int, int]:
    """``(T, h * w)`` of clip tokens that still fill every frame's grid (``layout`` set, no padding), else
    ``ValueError`` naming the method."""
    if tokens.layout is None or not bool(tokens.mask.all()):
        raise ValueError(f"method {name!r} compares each token with the same position of the previous frame: it "
                         "needs every frame's full grid of tokens (run it first, or after grid methods such as "
                         "avg_pool only; pruning before it leaves no grid to compare)")
    return tokens.frames, tokens.layout[0] * tokens.layout[1]


# ============================================================================================ EVS
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
