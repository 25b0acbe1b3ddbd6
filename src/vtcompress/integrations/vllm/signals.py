"""Vision-tower signals inside vLLM: [CLS] attention / mean attention received, and keys, of one layer.

vLLM's vision towers run fused attention (``MMEncoderAttention``) and return no weights. As the Hugging Face path
(:mod:`vtcompress.models.signals`), the attention of the chosen layer stays untouched; a hook on that layer
records what its attention consumes and the same :func:`~vtcompress.models.signals.attention_signal` computes

- CLIP (LLaVA): the query / key projections, read from the output of the layer's fused ``qkv_proj`` (a forward
  hook): ``softmax(q_cls K^T * scale)`` per head, then the head mean (or one full-width head);
- Qwen2-VL: the layer's input (a forward pre-hook on its attention module), from which the module's own ``qkv``,
  ``split_qkv`` and rotary embedding give the rotated ``q``, ``k`` the fused kernel sees; then per image (the
  ``cu_seqlens`` segments, one attention call per image in the Hugging Face tower) the mean attention each patch
  receives.

Tensor parallelism: each rank holds ``H / tp`` heads of the signal layer, so the head mean needs a sum over ranks
(an all-reduce of ``[B, L]`` scores and ``[B, L, Dh]`` keys, or an all-gather for ``heads="full"``); that is not
implemented, and the plugin refuses ``tensor_parallel_size > 1`` (see :func:`check_parallel`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...models.signals import attention_signal

__all__ = ["Captured", "capture_clip", "capture_qwen2_vl", "check_parallel"]


@dataclass
class Captured:
    """Per-image signals in the tower's token order: ``attn`` ``[B, T]`` and ``keys`` ``[B, T, Dk]`` (CLIP), or
    one ``[T_i]`` / ``[T_i, Dk]`` entry per image (Qwen2-VL, images of different sizes)."""

    attn: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)


def check_parallel(vllm_config) -> None:
    """Refuse tensor-parallel vision towers: the head mean of the signal needs every head (see the module doc)."""
    tp = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
    if tp > 1:
        raise ValueError(
            f"tensor_parallel_size={tp}: the vtcompress vLLM plugin computes vision signals from all heads of one "
            "layer, which tensor parallelism splits over ranks (an all-reduce of the per-rank head sums would be "
            "needed); serve with tensor_parallel_size=1 (data or pipeline parallelism are unaffected)")


def _record(out: Captured, q: Tensor, k: Tensor, scale: float, has_cls: bool, attn: bool, keys: bool,
            heads: str) -> None:
    """``q, k [B, H, L, Dh]`` -> the signals, as the Hugging Face recorder stores them."""
    if attn:
        out.attn.append(attention_signal(q, k, None, scale, has_cls=has_cls, heads=heads))
    if keys:
        kf = k.detach().to(torch.float32)
        out.keys.append(kf.mean(1) if heads == "mean" else kf.transpose(1, 2).flatten(2))


@contextmanager
def capture_clip(attn_module: nn.Module, *, attn: bool, keys: bool, heads: str):
    """Record the signals of a vLLM ``CLIPAttention`` (one call: a ``[B, T]`` batch of images, [CLS] first)."""
    out = Captured()
    h, d, scale = attn_module.num_heads_per_partition, attn_module.head_dim, attn_module.scale

    def hook(_mod, _args, result):
        qkv = result[0] if isinstance(result, tuple) else result
        q, k, _v = qkv.chunk(3, dim=-1)
        b, t = q.shape[:2]
        q = q.reshape(b, t, h, d).transpose(1, 2)
        k = k.reshape(b, t, h, d).transpose(1, 2)
        _record(out, q, k, scale, True, attn, keys, heads)

    handle = attn_module.qkv_proj.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


@contextmanager
def capture_qwen2_vl(attn_module: nn.Module, *, attn: bool, keys: bool, heads: str):
    """Record the signals of a vLLM ``Qwen2VisionAttention``: one entry per ``cu_seqlens`` segment (image)."""
    out = Captured()

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs["x"]
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        cos = kwargs.get("rotary_pos_emb_cos", args[2] if len(args) > 2 else None)
        sin = kwargs.get("rotary_pos_emb_sin", args[3] if len(args) > 3 else None)
        with torch.no_grad():
            qkv, _ = mod.qkv(x)
            q, k, _v = mod.split_qkv(qkv)  # [s, b, H, Dh]
            q, k = (t.transpose(0, 1) for t in (q, k))  # [b, s, H, Dh]
            q, k = torch.chunk(mod.apply_rotary_emb(torch.cat([q, k], dim=0), cos, sin), 2, dim=0)
        scale = mod.hidden_size_per_attention_head ** -0.5
        bounds = [int(v) for v in cu.tolist()]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            seg = Captured()
            _record(seg, q[:, s:e].transpose(1, 2), k[:, s:e].transpose(1, 2), scale, False, attn, keys, heads)
            out.attn += [a[0] for a in seg.attn]
            out.keys += [kk[0] for kk in seg.keys]
        return None

    handle = attn_module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()

