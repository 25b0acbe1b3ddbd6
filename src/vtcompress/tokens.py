"""`VisualTokens`: the one data structure every compression method maps to and from.

All tensors are batch-first. ``B`` is the number of images (one row per image) or clips (one row per video),
``N`` the number of tokens now, ``N0`` the number of patches of the original grid (``frames * grid[0] * grid[1]``).

A clip has a time axis: ``frames = T`` frames of the same ``grid = (H, W)``, its patches numbered frame after
frame (``pos = t * H * W + raster index``), so ``pos`` and ``assign`` run over the whole clip and a token merged
across frames keeps the position of its anchor patch. Spatial methods act on one frame at a time
(:meth:`VisualTokens.split_frames` / :meth:`VisualTokens.join_frames`); temporal methods
(:mod:`vtcompress.methods.temporal`) act on the clip. An image is a clip of one frame.

Invariants every method keeps (and the table-driven tests check):

* valid tokens come first in each row, in ascending ``pos`` (spatial / raster order); padding after;
* ``size`` of the valid tokens of a row sums to the number of original patches they stand for
  (merging methods keep the total, pruning methods drop the dropped patches' share);
* ``assign[b, p]`` is the output token that original patch ``p`` went to, or ``-1`` if it was dropped;
  for a kept token ``t``, ``assign[b, pos[b, t]] == t``.

Two shared operations apply a decision to every field at once, so fields can never drift apart:
:meth:`VisualTokens.select` (keep a subset: pruning) and :meth:`VisualTokens.merge` (group tokens into
fewer tokens with a size-weighted mean: merging, pooling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["VisualTokens"]


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t [B,N,...]`` gathered along dim 1 by ``idx [B,K]`` -> ``[B,K,...]``."""
    if t.dim() == 2:
        return t.gather(1, idx)
    expanded = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, expanded)


def _check_pair(name: str, value) -> tuple[int, int]:
    """``(H, W)`` of positive ints, else ``ValueError``."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ValueError(f"{name} must be a pair (H, W) of positive ints; got {value!r}")
    return int(value[0]), int(value[1])


def _check_frames(value) -> int:
    """``frames``: a positive int, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"frames must be a positive int (1 for an image, T for a clip); got {value!r}")
    return int(value)


def _slot_sum(v: Tensor, slot: Tensor, m: int) -> Tensor:
    """``[B, m, Q]``: the rows of ``v [B, N, Q]`` summed per slot ``slot [B, N]`` in ``[0, m]`` (slot ``m``: a dump
    slot, cut off). One ``index_add_`` on the flattened batch (about twice as fast on CPU as a ``scatter_add_``
    along dim 1 with an expanded index)."""
    b, n, q = v.shape
    flat = (slot + torch.arange(b, device=slot.device)[:, None] * (m + 1)).reshape(-1)
    acc = torch.zeros(b * (m + 1), q, device=v.device, dtype=v.dtype).index_add_(0, flat, v.reshape(b * n, q))
    return acc.view(b, m + 1, q)[:, :m]


def _sum_rows(t: Tensor, slot: Tensor, keep: Tensor, m: int) -> Tensor:
    """Sum the rows of ``t [B,N,Q]`` into ``m`` slots given by ``slot [B,N]`` (``keep`` False -> dropped)."""
    vals = torch.where(keep[..., None], t.to(torch.float32), torch.zeros((), device=t.device))
    return _slot_sum(vals, slot, m).to(t.dtype)


@dataclass
class VisualTokens:
    """Visual tokens of a batch of images, with provenance.

    Attributes:
        x: ``[B, N, D]`` features (floating point).
        mask: ``[B, N]`` bool, True for valid tokens (ragged batches are right-padded).
        pos: ``[B, N]`` long, index in the original ``grid`` (raster order) of each token's anchor patch.
        grid: ``(H, W)`` of the original patch grid of one frame; ``frames * H * W == N0``.
        size: ``[B, N]`` float, number of original patches each token stands for.
        assign: ``[B, N0]`` long, output token of each original patch, ``-1`` if dropped.
        layout: ``(h, w)`` when the current tokens still form a full regular grid in every frame
            (``frames * h * w == N``), else ``None`` (after pruning). Grid operations (pooling, unshuffle) need it.
        cls_attn: optional ``[B, N]`` attention each token receives from the vision encoder's [CLS]
            (or mean attention received, for encoders without [CLS]).
        keys: optional ``[B, N, Dk]`` attention keys of the tokens (head-averaged) from the vision encoder.
        text: optional ``[B, T, Dt]`` embeddings of the prompt, for text-guided methods.
        text_mask: optional ``[B, T]`` bool valid prompt tokens.
        attn: optional ``[B, N, Q]`` attention each token receives from ``Q`` chosen query rows of an LLM
            decoder layer (decoder stage: FastV's last token ``Q = 1``, SparseVLM's prompt tokens); when
            ``Q`` rows are prompt tokens, ``text_mask [B, Q]`` marks the valid ones.
        frames: ``T``, the frames of a clip (1 for an image); the time axis of ``pos`` / ``assign``.
    """

    x: Tensor
    mask: Tensor
    pos: Tensor
    grid: tuple[int, int]
    size: Tensor
    assign: Tensor
    layout: tuple[int, int] | None = None
    cls_attn: Tensor | None = None
    keys: Tensor | None = None
    text: Tensor | None = None
    text_mask: Tensor | None = None
    attn: Tensor | None = None
    frames: int = 1

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_features(
        cls,
        x: Tensor,
        grid: tuple[int, int] | None = None,
        mask: Tensor | None = None,
        cls_attn: Tensor | None = None,
        keys: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        frames: int = 1,
    ) -> VisualTokens:
        """Wrap the full, uncompressed patch features ``x [B, N, D]`` of a ``grid`` (default: square).

        ``mask`` marks valid patches; ``pos``, ``size`` and ``assign`` start as the identity. A clip passes
        ``frames = T`` and its ``T * H * W`` features frame after frame (``grid`` is one frame's).
        """
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"features must be a tensor of shape [B, N, D]; got {shape}")
        b, n, _ = x.shape
        frames = _check_frames(frames)
        if n % frames:
            raise ValueError(f"{n} tokens do not split into frames={frames} frames of equal size")
        if grid is None:
            side = int(round((n // frames)**0.5))
            if side * side * frames != n:
                what = f"{n} tokens" if frames == 1 else f"{n // frames} tokens per frame"
                raise ValueError(f"{what} do not form a square grid; pass grid=(H, W) with H * W == {n // frames}")
            grid = (side, side)
        grid = (int(grid[0]), int(grid[1]))
        if frames * grid[0] * grid[1] != n:
            what = f"grid {grid}" if frames == 1 else f"grid {grid} x frames={frames}"
            raise ValueError(f"{what} has {frames * grid[0] * grid[1]} patches but the features have N={n} tokens")
        dev = x.device
        pos = torch.arange(n, device=dev).expand(b, n).clone()
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=dev)
        mask = mask.to(device=dev, dtype=torch.bool)
        assign = torch.where(mask, pos, torch.full_like(pos, -1))
        size = mask.to(torch.float32)
        tokens = cls(
            x=x, mask=mask, pos=pos, grid=grid, size=size, assign=assign, layout=grid,
            cls_attn=cls_attn, keys=keys, text=text, text_mask=text_mask, frames=frames,
        )
        tokens.validate()
        return tokens

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        """``N``: tokens per row now (including padding)."""
        return self.x.shape[1]

    @property
    def num_patches(self) -> int:
        """``N0``: patches of the original grid (of every frame of a clip)."""
        return self.frames * self.grid[0] * self.grid[1]

    @property
    def frame_patches(self) -> int:
        """``H * W``: patches of one frame."""
        return self.grid[0] * self.grid[1]

    def frame_of(self) -> Tensor:
        """``[B, N]`` long: the frame of each token's anchor patch (``pos // (H * W)``)."""
        return torch.div(self.pos, self.frame_patches, rounding_mode="floor")

    @property
    def counts(self) -> Tensor:
        """``[B]`` long: valid tokens per row."""
        return self.mask.sum(1)

    def replace(self, **changes) -> VisualTokens:
        return dataclasses.replace(self, **changes)

    def to(self, *args, **kwargs) -> VisualTokens:
        """Move the floating fields (``x``, signals) like ``Tensor.to``; index fields only change device."""
        def conv(t):
            if t is None:
                return None
            return t.to(*args, **kwargs) if t.is_floating_point() else t.to(device=t.to(*args, **kwargs).device)
        return self.replace(**{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)
                               if isinstance(getattr(self, f.name), Tensor)})

    def row(self, b: int) -> VisualTokens:
        """The valid tokens of image ``b`` as a batch of one."""
        n = int(self.counts[b])
        idx = torch.arange(n, device=self.x.device)[None]
        sub = self.replace(**{name: (t[b : b + 1] if t is not None else None) for name, t in self._batched().items()})
        return sub.select(idx)

    def _batched(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("grid", "layout", "frames")}

    def take_rows(self, idx: Tensor | list[int]) -> VisualTokens:
        """The rows ``idx`` of the batch (images or clips), in that order."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.x.device)
        return self.replace(**{name: (t[idx] if t is not None else None) for name, t in self._batched().items()})

    @classmethod
    def cat_rows(cls, parts: list[VisualTokens]) -> VisualTokens:
        """Rows of same-grid, same-frames ``parts`` in one batch, right-padded to the longest (layout kept only
        when every part has the same one)."""
        first = parts[0]
        if any(p.grid != first.grid or p.frames != first.frames for p in parts):
            raise ValueError("cat_rows needs parts of one grid and one frame count; got "
                             f"{sorted({(p.grid, p.frames) for p in parts})}")
        n = max(p.num_tokens for p in parts)
        fields = {}
        for name in first._batched():
            ts = [getattr(p, name) for p in parts]
            if any(t is None for t in ts):
                if not all(t is None for t in ts):
                    raise ValueError(f"cat_rows: field {name!r} is set in some parts and not in others")
                fields[name] = None
                continue
            if name in ("assign", "text", "text_mask"):
                if name != "assign" and len({t.shape[1] for t in ts}) > 1:
                    raise ValueError(f"cat_rows: field {name!r} has different lengths across parts")
                fields[name] = torch.cat(ts)
                continue
            pad = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, n - t.shape[1])) for t in ts]
            fields[name] = torch.cat(pad)
        layouts = {p.layout for p in parts}
        layout = layouts.pop() if len(layouts) == 1 and all(p.num_tokens == n for p in parts) else None
        return first.replace(**fields, layout=layout)

    # ------------------------------------------------------------------ the time axis
    def split_frames(self) -> VisualTokens:
        """The frames of each clip as rows of their own: ``[B, N]`` clip tokens of ``T`` frames -> ``[B * T, M]``
        one-frame tokens (row ``b * T + t`` is frame ``t`` of clip ``b``; ``pos`` / ``assign`` local to the frame;
        prompt fields repeated). What a spatial method sees of a clip; :meth:`join_frames` undoes it.

        Every token must stand for patches of its own frame only: a token merged across frames has no one frame
        to go to (``ValueError``; apply spatial methods before a temporal merging method).
        """
        b, n = self.mask.shape
        t_, hw = self.frames, self.frame_patches
        dev = self.x.device
        frame = torch.where(self.mask, self.frame_of(), torch.full_like(self.pos, t_))  # padding -> frame T
        patch_frame = torch.arange(t_, device=dev).repeat_interleave(hw)  # [N0]
        if bool((self.assign >= 0).any()):
            owner = frame.gather(1, self.assign.clamp(min=0))
            cross = (self.assign >= 0) & (owner != patch_frame[None])
            if bool(cross.any()):
                raise ValueError(
                    "these clip tokens merge patches of different frames (a temporal merging method ran): a "
                    "spatial method acts on one frame at a time, so run it before the temporal method")
        cnt = torch.zeros(b, t_ + 1, dtype=torch.long, device=dev).scatter_add_(1, frame, torch.ones_like(frame))
        start = cnt.cumsum(1) - cnt
        rank = torch.arange(n, device=dev)[None] - start.gather(1, frame)  # index within its frame
        m = max(1, int(cnt[:, :t_].max())) if b and n else 1
        rows = torch.arange(b, device=dev)[:, None] * t_ + frame
        dump = b * t_ * m
        dest = torch.where(self.mask, rows * m + rank, torch.full_like(rank, dump)).reshape(-1)

        def spread(t: Tensor, fill=0) -> Tensor:
            out = torch.full((dump + 1, *t.shape[2:]), fill, dtype=t.dtype, device=dev)
            out.index_copy_(0, dest, t.reshape(b * n, *t.shape[2:]))
            return out[:dump].view(b * t_, m, *t.shape[2:])

        fields = {name: spread(t) for name, t in self._batched().items()
                  if t is not None and name not in ("assign", "text", "text_mask", "mask", "pos")}
        mask = spread(self.mask, False)
        pos = spread(self.pos - frame.clamp(max=t_ - 1) * hw)
        local = torch.where(self.mask, rank, torch.full_like(rank, -1))  # [B, N]: each token's index in its frame
        assign = torch.where(self.assign >= 0, local.gather(1, self.assign.clamp(min=0)), self.assign)
        fields["assign"] = assign.view(b * t_, hw)
        for name in ("text", "text_mask"):
            v = getattr(self, name)
            fields[name] = v.repeat_interleave(t_, 0) if v is not None else None
        layout = self.layout if self.layout is not None and m == self.layout[0] * self.layout[1] else None
        return self.replace(**fields, mask=mask, pos=pos, layout=layout, frames=1)

    @classmethod
    def join_frames(cls, tokens: VisualTokens, frames: int) -> VisualTokens:
        """Rows of single frames back into clips: ``[B * T, M]`` (row ``b * T + t``: frame ``t`` of clip ``b``)
        -> ``[B, N]`` clip tokens of ``T = frames`` frames, valid tokens first in frame order. The inverse of
        :meth:`split_frames`."""
        t_ = _check_frames(frames)
        bt, m = tokens.mask.shape
        if tokens.frames != 1 or bt % t_:
            raise ValueError(f"join_frames needs one-frame rows, a multiple of frames={t_}; got {bt} rows of "
                             f"frames={tokens.frames}")
        b, hw = bt // t_, tokens.frame_patches
        dev = tokens.x.device
        cnt = tokens.counts.view(b, t_)
        offset = (cnt.cumsum(1) - cnt).reshape(bt, 1)  # tokens of the clip's earlier frames
        frame = torch.arange(t_, device=dev).repeat(b)[:, None]  # [B*T, 1]
        mask = tokens.mask.reshape(b, t_ * m)
        order = (~mask).to(torch.int8).argsort(dim=1, stable=True)  # valid first, frames in order
        n = max(1, int(cnt.sum(1).max())) if b else 1
        order = order[:, :n]

        def gather(t: Tensor) -> Tensor:
            return _gather_rows(t.reshape(b, t_ * m, *t.shape[2:]), order)

        fields = {name: gather(t) for name, t in tokens._batched().items()
                  if t is not None and name not in ("assign", "text", "text_mask", "pos")}
        fields["pos"] = gather(torch.where(tokens.mask, tokens.pos + frame * hw, torch.zeros_like(tokens.pos)))
        assign = torch.where(tokens.assign >= 0, tokens.assign + offset, tokens.assign)
        fields["assign"] = assign.reshape(b, t_ * hw)
        for name in ("text", "text_mask"):
            v = getattr(tokens, name)
            fields[name] = v[::t_] if v is not None else None
        layout = tokens.layout if tokens.layout is not None and n == t_ * tokens.layout[0] * tokens.layout[1] \
            else None
        return tokens.replace(**fields, layout=layout, frames=t_)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad value if shapes, dtypes or values are inconsistent.

        Checked (each a few vectorised reductions, no Python loop over tokens): every field a tensor of its shape
        and dtype; ``grid`` / ``layout`` pairs of positive ints, ``layout`` fitting in ``grid`` with ``h * w == N``;
        ``mask`` valid tokens first in each row (right padding: no holes, the order every kernel relies on); for
        valid tokens ``0 <= pos < N0``, finite ``size > 0``, finite floating ``cls_attn``; finite ``keys`` / ``attn``
        (valid prompt rows of ``text_mask``) / ``text``; ``assign`` in
        ``[-1, N)`` pointing only at valid tokens; features without NaN/inf.
        """
        x = self.x
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"features x must be a tensor of shape [B, N, D]; got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"features must be floating point (float32/bfloat16/float16); got dtype {x.dtype}")
        b, n, _ = x.shape
        grid = _check_pair("grid", self.grid)
        frames = _check_frames(self.frames)
        n0 = frames * grid[0] * grid[1]
        for name in ("mask", "pos", "size", "assign"):
            if not isinstance(getattr(self, name), Tensor):
                raise ValueError(f"{name} must be a tensor; got {type(getattr(self, name)).__name__}")
        for name in ("cls_attn", "keys", "text", "text_mask", "attn"):
            t = getattr(self, name)
            if t is not None and not isinstance(t, Tensor):
                raise ValueError(f"{name} must be a tensor or None; got {type(t).__name__}")
        for name, t, dtype in (("mask", self.mask, torch.bool), ("pos", self.pos, torch.long),
                               ("size", self.size, None)):
            if tuple(t.shape) != (b, n):
                raise ValueError(f"{name} must have shape [B, N] = {(b, n)}; got {tuple(t.shape)}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}; got {t.dtype}")
        if not self.size.is_floating_point():
            raise ValueError(f"size must be floating point (patches a token stands for); got dtype {self.size.dtype}")
        if tuple(self.assign.shape) != (b, n0):
            raise ValueError(
                f"assign must have shape [B, N0] = {(b, n0)} for grid {grid} x frames={frames}; got "
                f"{tuple(self.assign.shape)}"
            )
        if self.assign.dtype != torch.long:
            raise ValueError(f"assign must have dtype torch.int64; got {self.assign.dtype}")
        if self.layout is not None:
            layout = _check_pair("layout", self.layout)
            if frames * layout[0] * layout[1] != n:
                what = "h * w" if frames == 1 else f"frames={frames} x h * w"
                raise ValueError(f"layout {layout} does not match N={n} tokens ({what} must equal N)")
            if layout[0] > grid[0] or layout[1] > grid[1]:
                raise ValueError(f"layout {layout} does not fit in the original grid {grid}: a grid of tokens "
                                 "derived from it has at most its rows and columns")
        if self.cls_attn is not None:
            if tuple(self.cls_attn.shape) != (b, n):
                raise ValueError(f"cls_attn must have shape [B, N] = {(b, n)}; got {tuple(self.cls_attn.shape)}")
            if not self.cls_attn.is_floating_point():
                raise ValueError(f"cls_attn must be floating point (attention weights); got {self.cls_attn.dtype}")
        if self.keys is not None:
            if self.keys.dim() != 3 or tuple(self.keys.shape[:2]) != (b, n):
                raise ValueError(f"keys must have shape [B, N, Dk] with B, N = {(b, n)}; got {tuple(self.keys.shape)}")
            if not self.keys.is_floating_point():
                raise ValueError(f"keys must be floating point; got dtype {self.keys.dtype}")
        if self.attn is not None:
            if self.attn.dim() != 3 or tuple(self.attn.shape[:2]) != (b, n):
                raise ValueError(f"attn must have shape [B, N, Q] with B, N = {(b, n)}; got {tuple(self.attn.shape)}")
            if not self.attn.is_floating_point():
                raise ValueError(f"attn must be floating point; got dtype {self.attn.dtype}")
        if self.text is not None:
            if self.text.dim() != 3 or self.text.shape[0] != b:
                raise ValueError(f"text must have shape [B, T, D] with B = {b}; got {tuple(self.text.shape)}")
            if not self.text.is_floating_point():
                raise ValueError(f"text must be floating point; got dtype {self.text.dtype}")
        if self.text_mask is not None:
            t_len = self.text.shape[1] if self.text is not None else (self.attn.shape[2] if self.attn is not None
                                                                      else self.text_mask.shape[1])
            if tuple(self.text_mask.shape) != (b, t_len) or self.text_mask.dtype != torch.bool:
                raise ValueError(f"text_mask must be a bool tensor of shape {(b, t_len)}; got "
                                 f"{tuple(self.text_mask.shape)} {self.text_mask.dtype}")
        # values (valid tokens only: padding may hold anything)
        m = self.mask
        if n > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
            row = int((m[:, 1:] & ~m[:, :-1]).any(1).nonzero()[0])
            raise ValueError(f"mask has holes (row {row}: a valid token after a padded one); valid tokens must come "
                             "first in each row (right padding): drop tokens with select(), not by masking them")
        bad = m & ((self.pos < 0) | (self.pos >= n0))
        if bool(bad.any()):
            v = int(self.pos[bad][0])
            raise ValueError(f"pos {v} is outside the grid {grid}: a valid token's pos must be in [0, {n0})")
        bad = m & ~(self.size > 0)  # also catches NaN
        if bool(bad.any()) or bool((m & torch.isinf(self.size)).any()):
            v = float(self.size[bad][0]) if bool(bad.any()) else float("inf")
            raise ValueError(f"size {v} is invalid: a valid token stands for a finite number of patches > 0")
        if bool(((self.assign < -1) | (self.assign >= n)).any()):
            v = int(self.assign[(self.assign < -1) | (self.assign >= n)][0])
            raise ValueError(f"assign value {v} is out of range: a patch goes to a token in [0, {n}) or -1 (dropped)")
        if b and n and bool((self.assign >= 0).any()):
            hit = m.gather(1, self.assign.clamp(min=0)) | (self.assign < 0)
            if not bool(hit.all()):
                raise ValueError("assign sends a patch to a padded (invalid) token; it must point at a valid token "
                                 "or be -1")
        if self.cls_attn is not None and not bool(torch.isfinite(self.cls_attn)[m].all()):
            raise ValueError("cls_attn contains NaN/inf for valid tokens; attention weights must be finite")
        # the other signals methods rank or match by: finite where they are read (valid tokens; valid prompt rows)
        if self.keys is not None and not bool(torch.isfinite(self.keys[m]).all()):
            raise ValueError("keys contain NaN/inf for valid tokens; attention keys must be finite")
        if self.attn is not None:
            read = m[:, :, None]  # [B, N, 1]; padded prompt rows (text_mask) are never read either
            if self.text_mask is not None and self.text_mask.shape[1] == self.attn.shape[2]:
                read = read & self.text_mask[:, None, :]
            if bool((read & ~torch.isfinite(self.attn)).any()):
                raise ValueError("attn contains NaN/inf for valid tokens; attention weights must be finite")
        if self.text is not None:
            tm = self.text_mask if self.text_mask is not None and self.text_mask.shape == self.text.shape[:2] else None
            tv = self.text[tm] if tm is not None else self.text
            if not bool(torch.isfinite(tv).all()):
                raise ValueError("text contains NaN/inf for valid prompt tokens; embeddings must be finite")
        # one fast reduction first (NaN/inf propagate into the sum); the exact per-element check only if it is not
        # finite, which also tells a finite sum that overflowed (huge but finite features) from real NaN/inf
        if not bool(torch.isfinite(x.sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(-1).sum())
            raise ValueError(f"features contain NaN/inf values ({bad} token(s)); compressing them is meaningless")

    # ------------------------------------------------------------------ the two shared operations
    def select(self, idx: Tensor, valid: Tensor | None = None) -> VisualTokens:
        """Keep tokens ``idx [B, K]`` (indices into the current tokens) in every field.

        ``valid [B, K]`` marks real picks (rows with fewer picks are right-padded; padded picks may
        point anywhere). Dropped tokens' patches get ``assign = -1``. The caller keeps ``idx`` in
        ascending order so that spatial order is kept.
        """
        b, n = self.mask.shape
        k = idx.shape[1]
        idx = idx.to(device=self.x.device, dtype=torch.long)
        valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(torch.bool)
        valid = valid & self.mask.gather(1, idx)
        fields = {}
        for name, t in self._batched().items():
            if t is None or name in ("assign", "text", "text_mask"):
                continue
            fields[name] = _gather_rows(t, idx)
        fields["mask"] = valid
        fields["size"] = torch.where(valid, fields["size"], torch.zeros_like(fields["size"]))
        # remap[b, old] = new index (or -1): the provenance of every original patch follows its token.
        remap = torch.full((b, n + 1), -1, dtype=torch.long, device=idx.device)
        slot = torch.where(valid, idx, torch.full_like(idx, n))  # padded picks write to a dump column
        remap.scatter_(1, slot, torch.arange(k, device=idx.device).expand(b, k).contiguous())
        remap[:, n] = -1
        assign = torch.where(self.assign >= 0, remap.gather(1, self.assign.clamp(min=0)), self.assign)
        layout = self.layout if (k == n and bool(valid.all()) and
                                 bool((idx == torch.arange(n, device=idx.device)).all())) else None
        return self.replace(**fields, assign=assign, layout=layout)

    def merge(
        self,
        dest: Tensor,
        anchor: Tensor,
        weight: Tensor | None = None,
        layout: tuple[int, int] | None = None,
    ) -> VisualTokens:
        """Group tokens into ``M`` output tokens with a size-weighted mean.

        Args:
            dest: ``[B, N]`` long, output slot in ``[0, M)`` of each current token, ``-1`` to drop it.
            anchor: ``[B, M]`` long, the current token whose ``pos`` each slot keeps (its position in
                the LLM), or ``-1`` for an empty (padding) slot. Slots must be in ascending anchor ``pos``.
            weight: optional ``[B, N]`` extra weight per token (e.g. attention), multiplied with ``size``.
            layout: the grid the output forms, if it is a full regular grid (pooling).

        ``x`` and ``keys`` become weighted means, ``size`` and ``cls_attn`` sums (mass is conserved),
        ``assign`` follows every patch to its slot.
        """
        b, n = self.mask.shape
        m = anchor.shape[1]
        dev = self.x.device
        dest = torch.where(self.mask, dest.to(dev, torch.long), torch.full_like(dest, -1))
        slot = torch.where(dest >= 0, dest, torch.full_like(dest, m))  # dropped tokens -> dump slot m
        w = self.size.to(torch.float32) * (1.0 if weight is None else weight.to(torch.float32))
        w = torch.where(dest >= 0, w, torch.zeros_like(w))
        # every merged token of weight 1 (first merges, no extra weight): the weighted mean is the plain mean,
        # bit for bit, without the [B, N, D] multiply
        unit = weight is None and bool(((self.size == 1) | (dest < 0)).all())
        dens: dict[torch.dtype, Tensor] = {}

        def wmean(t: Tensor) -> Tensor:
            acc_dtype = torch.promote_types(t.dtype, torch.float32)  # at least float32; float64 stays float64
            wt = w.to(acc_dtype)[..., None]
            num = _slot_sum(t.to(acc_dtype) if unit else t.to(acc_dtype) * wt, slot, m)
            if acc_dtype not in dens:
                dens[acc_dtype] = _slot_sum(wt, slot, m).clamp_min(1e-12)
            return (num / dens[acc_dtype]).to(t.dtype)

        def ssum(t: Tensor) -> Tensor:
            vals = torch.where(dest >= 0, t.to(torch.float32), torch.zeros_like(w))
            return _slot_sum(vals[..., None], slot, m)[..., 0].to(t.dtype)

        valid = anchor >= 0
        safe_anchor = anchor.clamp(min=0)
        assign = torch.where(self.assign >= 0, dest.gather(1, self.assign.clamp(min=0)), self.assign)
        return self.replace(
            x=wmean(self.x),
            mask=valid,
            pos=torch.where(valid, self.pos.gather(1, safe_anchor), torch.zeros_like(safe_anchor)),
            size=ssum(self.size),
            assign=assign,
            layout=layout,
            cls_attn=ssum(self.cls_attn) if self.cls_attn is not None else None,
            keys=wmean(self.keys) if self.keys is not None else None,
            attn=_sum_rows(self.attn, slot, dest >= 0, m) if self.attn is not None else None,
        )

    def sort_by_pos(self) -> VisualTokens:
        """Reorder each row so valid tokens come first in ascending ``pos`` (restores the invariant)."""
        big = self.num_patches + 1
        key = torch.where(self.mask, self.pos, torch.full_like(self.pos, big))
        order = key.argsort(dim=1, stable=True)
        return self.select(order, self.mask.gather(1, order))

    def unmerge(self, y: Tensor) -> Tensor:
        """Spread per-token values ``y [B, N, ...]`` back to the original grid ``[B, N0, ...]``.

        Dropped patches get zeros. Useful for visualising and for composing methods.
        """
        idx = self.assign.clamp(min=0)
        out = _gather_rows(y, idx)
        keep = (self.assign >= 0).reshape(*self.assign.shape, *([1] * (y.dim() - 2)))
        return torch.where(keep, out, torch.zeros_like(out))
