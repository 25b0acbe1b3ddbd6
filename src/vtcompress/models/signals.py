"""Vision-encoder signals for attention-guided methods, captured without switching to eager attention.

Methods such as FasterVLM, VisionZip and PruMerge rank patches by the attention they receive from the
vision encoder's [CLS] token (VisionZip, arXiv 2412.04467; PruMerge, arXiv 2403.15388) in one layer
(by default the layer whose output the LLM reads, -2 for LLaVA-1.5; PruMerge: the last; see
vtcompress.models.apply), and merge by the similarity of that layer's keys. Reference code asks the
encoder for ``output_attentions``, which forces eager attention and materialises every layer's
``[B, H, L, L]`` matrix. Here an attention function registered through transformers'
``AttentionInterface`` wraps the model's own implementation (SDPA or eager): every layer still runs it
unchanged, and for the one chosen attention module it also computes

- ``attn [B, L]``: head-mean ``softmax(q_cls K^T * scale)`` (the [CLS] row), or, for encoders without a
  [CLS] token (SigLIP, the Qwen2-VL vision tower), the head-mean attention each token receives, averaged
  over the queries (computed in query chunks, so the extra memory stays bounded);
- ``keys [B, L, Dh]``: the keys averaged over heads.

``heads="full"`` instead treats the layer as ONE full-width head, as PruMerge's reference does
(42Shawn/LLaVA-PruMerge, ``clip_encoder.py``, ``token_prune_merge_advanced``: it hooks ``q_proj`` / ``k_proj``
and computes ``softmax(q k^T * C^-1/2)`` over all ``C = H * Dh`` channels): the logits are the sum of the
per-head dot products scaled by ``(H * Dh)^-1/2``, and the keys are all heads concatenated, ``[B, L, H * Dh]``
(the ``k_proj`` output). The query / key tensors the attention function receives are the projections reshaped
to heads (CLIP applies its scale inside the attention function), so both reductions come from the same call.

The switch is ``model.set_attn_implementation({"vision_config": name})``; the previous implementation and
the previous content of the global registry are put back on exit. Encoders that split their input into
several attention calls per layer (Qwen2-VL runs one call per image, Qwen2.5-VL one per window) give one
record per call, in call order.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .description import modeling_function

__all__ = ["SignalRecord", "capture_signals", "attention_signal", "SIGNAL_ATTENTION"]

#: name under which the wrapping attention function is registered while a capture is active
SIGNAL_ATTENTION = "vtcompress_signals"
_CHUNK_ELEMENTS = 1 << 24
_LOCK = threading.RLock()
# id(vision config) -> [base implementation name, active captures]: the switch is made by the first capture on a
# config and undone by the last, so concurrent captures (threads) on one model never see each other's switch
_BASES: dict[int, list] = {}
# id(attention module) -> recorder, per context (thread / asyncio task): a concurrent call on the same model, with
# or without its own capture, never records into another call's recorder
_RECORDERS: ContextVar[dict | None] = ContextVar("vtcompress_signal_recorders", default=None)
_ACTIVE = [0]  # number of active captures (the registration is removed when it drops to zero)
_SAVED: dict[str, object] = {}


@dataclass
class SignalRecord:
    """What one attention module recorded: one entry per call of the attention function.

    ``attn[i]``: ``[B, L]`` float32; ``keys[i]``: ``[B, L, Dh]`` float32 (when requested).
    """

    has_cls: bool
    want_attn: bool = True
    want_keys: bool = False
    heads: str = "mean"
    attn: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)

    def record(self, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float | None) -> None:
        if self.want_attn:
            self.attn.append(attention_signal(query, key, attention_mask, scaling, has_cls=self.has_cls,
                                              heads=self.heads))
        if self.want_keys:
            k = key.detach().to(torch.float32)
            # [B, H, L, Dh] -> head mean [B, L, Dh], or all heads side by side [B, L, H * Dh] (the k_proj output)
            self.keys.append(k.mean(1) if self.heads == "mean" else k.transpose(1, 2).flatten(2))


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


@torch.no_grad()
def attention_signal(
    query: Tensor, key: Tensor, attention_mask: Tensor | None = None, scaling: float | None = None,
    has_cls: bool = True, heads: str = "mean",
) -> Tensor:
    """Attention signal ``[B, L]`` from ``query, key [B, H, L, Dh]``.

    With ``has_cls``: the attention row of query 0 (the [CLS] token), ``softmax(q_0 K^T * scaling)``.
    Without: the attention each key receives, averaged over all queries (each query row sums to one,
    so the result sums to one per image). ``attention_mask`` is an additive or boolean mask broadcastable
    to ``[B, H, L, L]``. Computed in float32.

    ``heads="mean"``: per-head softmax, then the head mean. ``heads="full"``: one head over all ``H * Dh``
    channels, ``softmax(q_full k_full^T * (H * Dh)^-1/2)`` (PruMerge's reference; ``scaling`` is ignored).
    """
    if heads not in ("mean", "full"):
        raise ValueError(f"heads={heads!r}; allowed: 'mean' (head-mean attention), 'full' (one full-width head)")
    if key.shape[1] != query.shape[1]:  # grouped keys: repeat them to the query heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    if heads == "full":  # concatenate the heads: [B, 1, L, H * Dh]
        query = query.transpose(1, 2).flatten(2)[:, None]
        key = key.transpose(1, 2).flatten(2)[:, None]
        scaling = None
    b, h, lq, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    q = query.detach().to(torch.float32)
    k = key.detach().to(torch.float32).transpose(-1, -2)
    mask = _additive(attention_mask, torch.float32)
    if mask is not None and heads == "full" and mask.dim() == 4 and mask.shape[1] > 1:
        mask = mask[:, :1]  # one head: a per-head mask (none of the supported towers has one) reduces to head 0
    if has_cls:
        logits = (q[:, :, :1] @ k) * scale
        if mask is not None:
            logits = logits + mask[..., :1, :]
        return logits.softmax(-1)[:, :, 0].mean(1)
    total = torch.zeros(b, h, key.shape[2], dtype=torch.float32, device=query.device)
    # query chunks bound the extra memory to ~_CHUNK_ELEMENTS floats (a SigLIP batch of 10 crops x 16 heads x
    # 729 tokens would otherwise need 340 MB); a loop over a few chunks, not over tokens
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * key.shape[2]))
    for start in range(0, lq, chunk):
        logits = (q[:, :, start : start + chunk] @ k) * scale
        if mask is not None:
            logits = logits + mask[..., start : start + chunk, :]
        total += logits.softmax(-1).sum(2)
    return (total / lq).mean(1)


def _base_function(module: nn.Module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        fn = modeling_function(module, "eager_attention_forward")
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager attention function to wrap")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _signal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Runs the module's own attention implementation unchanged; the chosen module also records signals."""
    entry = _BASES.get(id(getattr(module, "config", None)))
    base = entry[0] if entry is not None else "sdpa"
    out = _base_function(module, base)(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
    rec = (_RECORDERS.get() or {}).get(id(module))
    if rec is not None:
        rec.record(query, key, attention_mask, scaling)
    return out


def _signal_mask(*args, config=None, **kwargs):
    """The mask the wrapped implementation would get: towers that build their padding mask with transformers'
    ``masking_utils`` (Idefics3 / SmolVLM's ``pixel_attention_mask``) look the mask function up by the
    implementation's name, and a name without one receives the raw 2-D mask."""
    from transformers.masking_utils import AttentionMaskInterface

    entry = _BASES.get(id(config))
    base = entry[0] if entry is not None else "sdpa"
    return AttentionMaskInterface._global_mapping[base](*args, config=config, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    mapping = AttentionInterface._global_mapping
    masks = AttentionMaskInterface._global_mapping
    if _ACTIVE[0] == 0:
        _SAVED.clear()
        if SIGNAL_ATTENTION in mapping:
            _SAVED["fn"] = mapping[SIGNAL_ATTENTION]
        if SIGNAL_ATTENTION in masks:
            _SAVED["mask"] = masks[SIGNAL_ATTENTION]
        AttentionInterface.register(SIGNAL_ATTENTION, _signal_attention)
        AttentionMaskInterface.register(SIGNAL_ATTENTION, _signal_mask)
    _ACTIVE[0] += 1


def _unregister() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _ACTIVE[0] -= 1
    if _ACTIVE[0] == 0:
        for key, mapping in (("fn", AttentionInterface._global_mapping),
                             ("mask", AttentionMaskInterface._global_mapping)):
            if key in _SAVED:
                mapping[SIGNAL_ATTENTION] = _SAVED.pop(key)
            else:
                mapping.pop(SIGNAL_ATTENTION, None)


@contextmanager
def capture_signals(model: nn.Module, vision_config, module: nn.Module, has_cls: bool, attn: bool = True,
                    keys: bool = False, heads: str = "mean"):
    """Record the signals of attention ``module`` while the vision tower runs inside the context.

    Args:
        model: the top-level model (``set_attn_implementation`` is called on it).
        vision_config: the vision sub-config whose attention implementation is switched.
        module: the attention module of the chosen vision layer.
        has_cls: the encoder's token 0 is a [CLS] token (its row is the signal).
        attn, keys: which signals to record.
        heads: ``"mean"`` (head-mean attention and keys) or ``"full"`` (one full-width head, concatenated keys).

    Yields:
        a :class:`SignalRecord` filled by every call of ``module`` in the context.
    """
    with _LOCK:
        entry = _BASES.get(id(vision_config))  # another capture (thread) on this config: its base, not our switch
        base = entry[0] if entry is not None else getattr(vision_config, "_attn_implementation", None) or "eager"
    if base not in ("sdpa", "eager"):
        raise ValueError(
            f"capturing vision attention signals needs the vision tower's attention implementation to be "
            f"'sdpa' or 'eager'; it is {base!r} "
            "(switch with model.set_attn_implementation({'vision_config': 'sdpa'}))"
        )
    if heads not in ("mean", "full"):
        raise ValueError(f"heads={heads!r}; allowed: 'mean' (head-mean attention), 'full' (one full-width head)")
    rec = SignalRecord(has_cls=has_cls, want_attn=attn, want_keys=keys, heads=heads)
    with _LOCK:
        _register()
        entry = _BASES.get(id(vision_config))
        if entry is None:
            entry = _BASES[id(vision_config)] = [base, 0]
            try:
                model.set_attn_implementation({"vision_config": SIGNAL_ATTENTION})
            except BaseException:
                _BASES.pop(id(vision_config), None)
                _unregister()
                raise
        entry[1] += 1
    token = _RECORDERS.set({**(_RECORDERS.get() or {}), id(module): rec})
    try:
        yield rec
    finally:
        try:
            _RECORDERS.reset(token)
        except ValueError:  # closed from another context: drop ours from the current view
            _RECORDERS.set({k: v for k, v in (_RECORDERS.get() or {}).items() if v is not rec})
        with _LOCK:
            entry[1] -= 1
            try:
                if entry[1] == 0:
                    _BASES.pop(id(vision_config), None)
                    model.set_attn_implementation({"vision_config": entry[0]})
            finally:
                _unregister()
