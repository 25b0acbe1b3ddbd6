"""Similarity family: methods that merge or select tokens by how alike they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..compressor import (
    Compressor,
    DecoderCompressor,
    EncoderCompressor,
    QueryKind,
    Signal,
    StageContext,
    budget_tokens,
    register,
)
from ..ops import bipartite_soft_matching, maxmin_diversity, topk_sorted
from ..tokens import VisualTokens


def _metric(tokens: VisualTokens) -> Tensor:
    """``[B, N, C]``: the vision encoder's keys when carried (what ToMe / DivPrune compare), else the features."""
    return tokens.keys if tokens.keys is not None else tokens.x


def _check_nonneg_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value!r}")


# ==================================================================================================
# ToMe (projector stage)
# ==================================================================================================
@register
@dataclass
class ToMe(Compressor):
    """Token Merging by bipartite soft matching (Bolya et al., ICLR 2023, arXiv 2210.09461; facebookresearch/ToMe).

    Applied once to the encoder's output ``x [B, N, D]``, in rounds: each round runs
    :func:`~vtcompress.ops.bipartite_soft_matching` (alternating A/B split, cosine similarity of ``keys``
    when the tokens carry them, else of ``x``; each A token's best B edge; the top ``r`` edges merge with a
    size-weighted mean, sizes tracked) and merges ``r = min(count - target, (count - protect) // 2, max_r)``
    tokens (``max_r = 0``: no extra cap), until every image has its budget. Keys are merged with the same
    weights, so later rounds compare merged tokens, as ToMe's next layer does.

    Count produced per image: the budget's ``k`` (:meth:`Compressor.keep_counts`), but never fewer than
    ``protect + 1`` tokens (with fewer than two unprotected tokens nothing can merge); an int budget below
    ``protect + 1`` raises. Each merged token keeps the ``pos`` of its B (destination) token.

    Fields:
        protect: leading tokens (e.g. a [CLS] or register tokens kept in the sequence) never merged.
        max_r: most tokens merged per round (``0``: as many as the bipartite split allows).
    """

    budget: int | float = 0.5
    protect: int = 0
    max_r: int = 0

    name: ClassVar[str] = "tome"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "ToMe (arXiv 2210.09461)"
    matches_reference: ClassVar[str] = "equivalent: same merges, values, sizes per round; tokens kept in index order"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_nonneg_int("protect", self.protect)
        _check_nonneg_int("max_r", self.max_r)
        if isinstance(self.budget, int) and self.budget < self.protect + 1:
            raise ValueError(f"budget={self.budget} tokens is below protect + 1 = {self.protect + 1}: the protected "
                             "tokens plus at least one merged token always remain")

    def target_counts(self, tokens: VisualTokens) -> Tensor:
        """``[B]`` tokens each image ends with (the documented count)."""
        counts = tokens.counts
        floor = torch.clamp(counts, max=self.protect + 1)
        return torch.maximum(self.keep_counts(tokens), floor)

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        target = self.target_counts(tokens)
        while True:
            counts = tokens.counts
            r = torch.minimum(counts - target, (counts - self.protect).clamp(min=0) // 2)
            if self.max_r:
                r = r.clamp(max=self.max_r)
            if not bool((r > 0).any()):
                return tokens
            dest, anchor = bipartite_soft_matching(_metric(tokens), r, tokens.mask, self.protect)
            if torch.equal((anchor >= 0).sum(1), counts):
                # no edge could merge: only non-finite similarities (e.g. NaN keys) get here
                raise ValueError("tome found no finite similarity to merge by; the keys/features contain NaN/inf")
            tokens = tokens.merge(dest, anchor)


# ==================================================================================================
# DivPrune
# ==================================================================================================
@register
@dataclass
class DivPrune(Compressor):
    """DivPrune: diversity-based visual token pruning (Alvar et al., CVPR 2025, arXiv 2503.02175; vbdi/divprune).

    Keeps the budget's ``k`` tokens chosen by greedy max-min cosine distance
    (:func:`~vtcompress.ops.maxmin_diversity`) over the features ``x [B, N, D]`` (the reference uses the
    projected visual features; ``use_keys=True`` compares the encoder keys instead). Kept tokens in spatial
    order.
    """

    budget: int | float = 0.5
    use_keys: bool = False

    name: ClassVar[str] = "divprune"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "DivPrune (arXiv 2503.02175)"
    matches_reference: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_keys, bool):
            raise ValueError(f"use_keys must be a bool; got {self.use_keys!r}")

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        if self.use_keys and tokens.keys is None:
            raise ValueError("divprune(use_keys=True) needs the 'keys' signal, which these tokens do not carry")
        metric = tokens.keys if self.use_keys else tokens.x
        idx, valid = maxmin_diversity(metric, self.keep_counts(tokens), tokens.mask)
        n = tokens.num_tokens
        order = torch.where(valid, idx, idx + n).argsort(dim=1)  # picks back to spatial order
        return tokens.select(idx.gather(1, order), valid.gather(1, order))


# =====================================================================================================
# Encoder-stage ToMe (``tome_encoder``): merging inside the vision tower;
# the mechanics (hooks, proportional attention) live in ``vtcompress/models/encoder.py``.
# =====================================================================================================
@register
@dataclass
class ToMeEncoder(EncoderCompressor):
    """ToMe inside the vision encoder (Bolya et al., "Token Merging: Your ViT But Faster", arXiv 2210.09461).

    After each vision encoder layer up to the feature layer, bipartite soft matching on the layer's head-mean
    keys merges ``r_l`` patch tokens into their most similar partner (size-weighted mean, sizes tracked, the
    [CLS] / prefix tokens protected); the following layers use proportional attention (``+ log(size)`` on the
    attention logits). Applied to a model by :func:`vtcompress.models.encoder.encoder_merging` (``stage =
    "encoder"``). Difference from the reference (facebookresearch/ToMe): the merge runs after the whole block
    (a hook on the stock layer) instead of between its attention and its MLP, so the merging layer's MLP still
    sees the unmerged tokens; the similarity is the same layer's keys, as in the reference.

    Token count produced: with ``budget`` ``K`` (int) or a fraction ``f`` of the ``N0`` patches, the feature
    layer holds exactly ``K`` (resp. ``round(f * N0)``, at least 1) patch tokens per image; the merges are spread
    evenly over the ``L`` layers before the feature layer (earlier layers take the remainder), each layer merging
    at most half of its tokens; when that limit binds, layer ``l`` merges ``min(R, n_l // 2, n_l - K)`` with the
    smallest ``R`` that reaches ``K`` (the most even non-increasing schedule); a budget below what ``L`` halvings
    reach raises. ``r`` (ToMe's own knob)
    replaces the budget: an int merges ``min(r, n_l // 2)`` tokens in every layer, a tuple gives one ``r`` per
    layer; the count is then ``N0 - sum(r_l)``.

    :meth:`compress` applies the same merging to fixed ``VisualTokens`` (no layers in between): bipartite rounds
    until the budget is met.

    Args:
        r: ``None`` (use the budget), an int per layer, or a tuple with one int per merging layer.
        prop_attn: add ``log(size)`` to the attention logits of the layers after a merge (ToMe's proportional
            attention).
        metric: ``"keys"`` (head-mean attention keys, as ToMe) or ``"features"`` (the layer's output states).
    """

    r: int | tuple[int, ...] | None = None

    name: ClassVar[str] = "tome_encoder"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "ToMe in the vision encoder (arXiv 2210.09461)"
    matches_reference: ClassVar[str] = "deviation: merges after the whole block (reference: between attention and MLP)"

    def __post_init__(self) -> None:
        super().__post_init__()
        rs = (self.r,) if isinstance(self.r, int) else self.r
        if rs is not None and (
            not isinstance(rs, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rs)
        ):
            raise ValueError(f"r must be None, an int >= 0 or a tuple of ints >= 0 (one per layer); got {self.r!r}")

    def schedule(self, num_patches: int, num_layers: int) -> list[int]:
        """Tokens merged after each of ``num_layers`` layers, for ``num_patches`` patches per image."""
        n = num_patches
        out = []
        if self.r is not None:
            rs = [self.r] * num_layers if isinstance(self.r, int) else list(self.r)
            if len(rs) != num_layers:
                raise ValueError(
                    f"r={self.r!r} gives {len(rs)} layer(s) but {num_layers} layer(s) merge (those before the "
                    "feature layer)"
                )
            for r in rs:
                out.append(min(r, n // 2))
                n -= out[-1]
            return out
        k = budget_tokens(self.budget, num_patches)
        total = num_patches - k
        if total == 0:
            return [0] * num_layers
        if num_layers == 0:
            raise ValueError(f"budget={self.budget!r} needs merging but no encoder layer precedes the feature layer")
        reach = num_patches
        for _ in range(num_layers):
            reach -= reach // 2
        if k < reach:
            raise ValueError(
                f"budget={self.budget!r} ({k} tokens) is out of reach: {num_layers} ToMe layer(s) each merge at most "
                f"half of the tokens, leaving at least {reach} of {num_patches}"
            )

        def greedy(cap: int) -> list[int]:
            """Merge ``min(cap, n // 2, n - k)`` per layer: the schedule whose largest step is ``cap``."""
            steps, m = [], num_patches
            for _ in range(num_layers):
                steps.append(min(cap, m // 2, m - k))
                m -= steps[-1]
            return steps

        # the even split (earlier layers take the remainder) when no layer would merge more than half its tokens
        even = [total // num_layers + (1 if i < total % num_layers else 0) for i in range(num_layers)]
        for r in even:
            if r > n // 2:
                break
            n -= r
        else:
            return even
        # otherwise the most even non-increasing schedule: the smallest largest step that still reaches k
        lo, hi = 1, num_patches // 2
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(greedy(mid)) == total:
                hi = mid
            else:
                lo = mid + 1
        return greedy(lo)

    def merge_step(self, tokens: VisualTokens, r: int | Tensor) -> VisualTokens:
        """One bipartite soft-matching round: merge ``r`` (``[B]`` or int) tokens of each row away.

        The metric is ``tokens.keys`` when ``metric == "keys"`` and the tokens carry keys, else ``tokens.x``.
        Output tokens stay in spatial order (kept tokens keep their anchor ``pos``).
        """
        dest, anchor = bipartite_soft_matching(self.metric_of(tokens), r, tokens.mask)
        return tokens.merge(dest, anchor)

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        target = self.keep_counts(tokens)
        counts = tokens.counts
        # each round can at most halve a row, so this takes about log2(N / K) rounds
        while bool((counts > target).any()):
            tokens = self.merge_step(tokens, counts - target)
            counts = tokens.counts
        return tokens


# ==================================================================================================
# FOLDER: all merging concentrated in the last block(s) before the feature layer, folded
# into as many bipartite rounds as needed. Encoder-stage mechanics: vtcompress.models.encoder.
# ==================================================================================================


@register
@dataclass
class Folder(EncoderCompressor):
    """FOLDER: token merging folded into the last vision block(s) (Wang et al., ICCV 2025, arXiv 2501.02430).

    FOLDER's analysis finds that reduction early in the vision encoder loses the most information and that
    merging (size-weighted averaging) beats dropping, so it removes ALL ``N0 - k`` tokens inside the last
    block(s) before the feature layer LLaVA reads: one bipartite soft-matching round can remove at most half
    the tokens, so the block "folds" several ToMe rounds (arXiv 2210.09461) back to back, each on the merged
    keys of the previous one, until ``k`` patch tokens remain. Proportional attention (``log size`` bias)
    applies in the layers that still run after the merge.

    As an encoder-stage method (``vtcompress.apply`` / :func:`~vtcompress.models.encoder.encoder_merging`):
    :meth:`schedule` puts the whole reduction on the last ``layers`` merge layers (default 1, the reference
    LLaVA setting), :meth:`merge_step` folds ``r`` tokens into rounds. Called directly on
    :class:`VisualTokens` ``[B, N, D]`` (projector-stage use), :meth:`compress` folds each row down to its
    budget in one go, on ``keys`` when present, else on ``x``. Output: ``k`` tokens per row, spatial order,
    sizes summing to the merged patches.

    Differences from the reference code (anakin-skywalker-Joseph/Folder): merging runs after the block (the
    shared encoder hook) rather than between its attention and MLP, and the optional [CLS]-attention penalty
    of the matching scores (reference ``alpha``) is not applied; the reference's standalone
    ``merge_features`` also scales outputs by ``1 + log(size)``, which its in-encoder LLaVA variant
    (reproduced here) does not.
    """

    layers: int = 1

    name = "folder"
    family = "similarity"
    paper = "FOLDER (arXiv 2501.02430)"
    matches_reference = "deviation: merges after the block; no [CLS]-attention penalty (reference alpha)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers={self.layers!r}: the number of final merge layers must be an int >= 1")

    def schedule(self, num_patches: int, num_layers: int) -> list[int]:
        """Tokens merged after each of the ``num_layers`` layers before the feature layer: ``N0 - k`` split
        evenly over the last ``min(layers, num_layers)`` of them (earlier ones get the remainder), 0 before."""
        k = budget_tokens(self.budget, num_patches)
        total = num_patches - k
        out = [0] * num_layers
        if total == 0:
            return out
        if num_layers < 1:
            raise ValueError(f"folder needs at least one vision layer before the feature layer; got {num_layers}")
        n = min(self.layers, num_layers)
        base, extra = divmod(total, n)
        for j in range(n):
            out[num_layers - n + j] = base + (1 if j < extra else 0)
        return out

    def merge_step(self, tokens: VisualTokens, r) -> VisualTokens:
        """Merge ``r`` (an int, or ``[B]``) tokens per row by folded bipartite rounds (each removes at most half)."""
        left = torch.as_tensor(r, device=tokens.x.device, dtype=torch.long).expand(tokens.batch_size).clone()
        left = torch.minimum(left, (tokens.counts - 1).clamp(min=0))
        while bool((left > 0).any()):  # a few rounds (log2 of the reduction), each a vectorised merge
            step = torch.minimum(left, tokens.counts // 2)
            dest, anchor = bipartite_soft_matching(self.metric_of(tokens), step, tokens.mask)
            tokens = tokens.merge(dest, anchor)
            left = left - step
        return tokens

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        return self.merge_step(tokens, tokens.counts - self.keep_counts(tokens))


# ==================================================================================================
# Decoder stage: DART — duplication-aware pruning inside the LLM. Mechanics in
# vtcompress.models.decoder; shared base in methods/attention.py.
# ==================================================================================================


@register
@dataclass
class DART(DecoderCompressor):
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More", arXiv 2502.11494; the authors' LLaVA ``modeling_llama`` ``get_retained_image_token``, ported as
    ModelTC/LightCompress ``token_reduction/dart.py``): keep the visual tokens that duplicate the pivots least.

    Before layer ``layer`` (default 2, the reference's ``K``), per image:

    * pivots: the ``pivot_image`` visual tokens and the ``pivot_text`` prompt tokens (the tokens after the image)
      with the largest L1 norm of their keys in layer ``layer - 1`` — the keys that layer caches, i.e. AFTER RoPE
      (``keys [B, N, Dk]``; the prompt's keys come in the mechanics' :class:`StageContext`; a pure call without
      them ranks the prompt tokens by the L1 norm of ``text``);
    * the visual pivots are kept; then pivot by pivot each one keeps the ``int(T / (pivot_image + pivot_text))``
      not-yet-kept visual tokens least cosine-similar to it, on the final-RMSNorm'd hidden states entering layer
      ``layer`` (``normed``: the mechanics pass ``x`` and ``text`` through the LLM's final norm, as the
      reference). ``T`` is the budget in tokens (an int budget, or ``budget * N``: the reference's
      ``max_num_trunction``), so an image keeps ``pivot_image + P * int(T / P)`` tokens: 4 + 8 x 16 = 132 at
      ``budget=128`` (the reference's LLaVA-1.5 setting), not 128. ``budget=1.0`` keeps everything.
    * pivot order: the reference visits its pivots in the iteration order of a Python ``set`` of their token
      indices; with the mechanics' token indices (``StageContext.vis_seq`` / ``text_seq``) we visit them in
      that same order (it matters when two pivots would pick the same token); otherwise image pivots by norm,
      then prompt pivots.

    ``exact_budget=True`` is the cleaner variant: the pivots count towards the budget and the rest is split
    evenly over the pivots (the first ones take the remainder), so an image keeps exactly its budget.
    """

    budget: int | float = 0.5
    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    exact_budget: bool = False

    name: ClassVar[str] = "dart"
    family: ClassVar[str] = "similarity"
    paper: ClassVar[str] = "DART (arXiv 2502.11494)"
    needs: ClassVar[tuple[Signal, ...]] = (Signal.KEYS,)
    query: ClassVar[QueryKind] = QueryKind.TEXT  # the prompt tokens come as ``text`` (text pivots; optional)
    normed: ClassVar[bool] = True
    uses_context: ClassVar[bool] = True
    positions: ClassVar[str] = "original"
    matches_reference: ClassVar[str] = "exact (keeps pivots + P * int(budget / P): 132 at 128); exact_budget: budget"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_layer("layer", self.layer)
        for name in ("pivot_image", "pivot_text"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0; got {v!r}")
        if self.pivot_image + self.pivot_text == 0:
            raise ValueError("DART needs at least one pivot: pivot_image + pivot_text must be >= 1")
        if not isinstance(self.exact_budget, bool):
            raise ValueError(f"exact_budget must be a bool; got {self.exact_budget!r}")

    def schedule(self, num_layers: int) -> tuple[int, ...]:
        return self._check_single(self.layer, num_layers, self.name)

    def pivots(self, tokens: VisualTokens, context: StageContext | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(image_idx [B, Pi], image_ok, text_idx [B, Pt], text_ok)``: pivot indices, highest key L1 norm first."""
        norm = torch.norm(tokens.keys, p=1, dim=-1).float().masked_fill(~tokens.mask, float("-inf"))
        pi = min(self.pivot_image, tokens.num_tokens)
        img_idx = norm.topk(pi, dim=1).indices if pi else norm.new_zeros(norm.shape[0], 0).long()
        cap = self.keep_counts(tokens) if self.exact_budget else tokens.counts
        img_ok = torch.arange(pi, device=norm.device)[None] < torch.minimum(cap, tokens.counts)[:, None]
        if tokens.text is None or self.pivot_text == 0:
            z = torch.zeros(norm.shape[0], 0, dtype=torch.long, device=norm.device)
            return img_idx, img_ok, z, z.bool()
        tmask = tokens.text_mask if tokens.text_mask is not None else torch.ones(
            tokens.text.shape[:2], dtype=torch.bool, device=norm.device)
        tk = context.text_keys if context is not None and context.text_keys is not None else tokens.text
        tnorm = torch.norm(tk, p=1, dim=-1).float().masked_fill(~tmask, float("-inf"))
        pt = min(self.pivot_text, tokens.text.shape[1])
        txt_idx = tnorm.topk(pt, dim=1).indices
        txt_ok = torch.arange(pt, device=norm.device)[None] < tmask.sum(1, keepdim=True)
        return img_idx, img_ok, txt_idx, txt_ok

    def _quota(self, tokens: VisualTokens, kept: Tensor, piv_ok: Tensor) -> Tensor:
        """``[B, P]`` tokens each pivot picks."""
        counts = tokens.counts
        if not self.exact_budget:
            # the reference: TOKEN_TOPK = max_num_trunction // (pivot_image_token + pivot_text_token), every pivot
            trunc = (torch.full_like(counts, self.budget, dtype=torch.float64) if isinstance(self.budget, int)
                     else counts.to(torch.float64) * self.budget)
            q = torch.floor(trunc / (self.pivot_image + self.pivot_text)).to(torch.long)
            return torch.where(piv_ok, q[:, None], torch.zeros_like(q[:, None]))
        k = self.keep_counts(tokens)
        left = (k - kept.sum(1)).clamp(min=0)
        n_piv = piv_ok.sum(1).clamp(min=1)
        rank = piv_ok.long().cumsum(1) - 1  # order of each valid pivot
        quota = left[:, None] // n_piv[:, None] + (rank < (left % n_piv)[:, None]).long()
        return torch.where(piv_ok, quota, torch.zeros_like(quota))

    @staticmethod
    def _set_order(img_seq: Tensor, img_ok: Tensor, txt_seq: Tensor, txt_ok: Tensor) -> Tensor:
        """``[B, Pi + Pt]`` the order in which the reference visits the pivots: ``list(set(image + text).copy())``
        of their token indices (a handful of ints per row, on the host)."""
        seq = torch.cat([img_seq, txt_seq], dim=1)
        ok = torch.cat([img_ok, txt_ok], dim=1)
        order = torch.arange(seq.shape[1]).expand(seq.shape[0], -1).clone()
        for r, (row, row_ok) in enumerate(zip(seq.tolist(), ok.tolist(), strict=True)):
            valid = [i for i, v in enumerate(row_ok) if v]
            where = {row[i]: i for i in valid}
            visited = [where[t] for t in list(set([row[i] for i in valid]).copy())]
            order[r] = torch.tensor(visited + [i for i in range(len(row)) if i not in visited])
        return order.to(seq.device)

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        return self.compress_stage(tokens, 0, 1)

    def compress_stage(self, tokens: VisualTokens, stage: int = 0, num_stages: int = 1,
                       context: StageContext | None = None) -> VisualTokens:
        b, n, d = tokens.x.shape
        dev = tokens.x.device
        if not self.exact_budget and ((isinstance(self.budget, float) and self.budget >= 1.0)
                                      or (isinstance(self.budget, int) and self.budget >= n)):
            return tokens  # a budget of every token keeps every token
        img_idx, img_ok, txt_idx, txt_ok = self.pivots(tokens, context)
        if txt_idx.shape[1] and tokens.text.shape[-1] != d:  # text pivots are compared with the visual tokens
            raise ValueError(f"{self.name}: text pivots need prompt embeddings of the tokens' width; got text "
                             f"[B, T, {tokens.text.shape[-1]}] for tokens [B, N, {d}] (pivot_text=0 uses image "
                             "pivots only)")
        kept = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
        kept.scatter_(1, torch.where(img_ok, img_idx, torch.full_like(img_idx, n)), True)
        kept = kept[:, :n]
        x = tokens.x
        piv = torch.cat([x.gather(1, img_idx[..., None].expand(-1, -1, d)),
                         tokens.text.to(x.dtype).gather(1, txt_idx[..., None].expand(-1, -1, d))
                         if txt_idx.shape[1] else x[:, :0]], dim=1)
        piv_ok = torch.cat([img_ok, txt_ok], dim=1)
        quota = self._quota(tokens, kept, piv_ok)
        if context is not None and context.vis_seq is not None and context.text_seq is not None \
                and piv.shape[1] > 1:
            order = self._set_order(context.vis_seq.gather(1, img_idx), img_ok, context.text_seq.gather(1, txt_idx)
                                    if txt_idx.shape[1] else txt_idx, txt_ok)
            piv = piv.gather(1, order[..., None].expand(-1, -1, d))
            piv_ok, quota = piv_ok.gather(1, order), quota.gather(1, order)
        for i in range(piv.shape[1]):  # a handful of pivots, each a vectorised pick over the batch
            sim = torch.nn.functional.cosine_similarity(piv[:, i : i + 1], x, dim=-1).float()
            free = tokens.mask & ~kept
            idx, ok = topk_sorted(-sim, torch.minimum(quota[:, i], free.sum(1)), free)
            ext = torch.cat([kept, torch.zeros(b, 1, dtype=torch.bool, device=dev)], dim=1)
            kept = ext.scatter_(1, torch.where(ok, idx, torch.full_like(idx, n)), True)[:, :n]
        idx, ok = topk_sorted(kept.float(), kept.sum(1), kept)
        return tokens.select(idx, ok)
