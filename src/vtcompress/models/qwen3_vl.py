"""Qwen3-VL adapter (``Qwen3VLForConditionalGeneration``, and the MoE ``Qwen3VLMoeForConditionalGeneration``):
native-resolution tower, 2x2 patch merger, interleaved 3-D M-RoPE, DeepStack.

``get_image_features`` returns per image ``[t*h*w/4, D]`` merged tokens (raster order over the merged grid
``(t*h/2, w/2)``), and ``deepstack_features``: for each of the tower's DeepStack layers
(``vision_config.deepstack_visual_indexes``) the same tokens from that layer through its own merger, per image
``[t*h*w/4, D]``. The stock LLM adds DeepStack level ``j`` to the hidden states at the visual positions after
decoder layer ``j`` (DeepStack, Meng et al., arXiv 2406.04334).

Projector stage: the methods act on the merged tokens, as on Qwen2-VL; every DeepStack level follows them token
for token -- the kept tokens' levels are kept, a merged token gets its group's levels merged with the same
weights, a pooled one its cell's -- through :func:`vtcompress.models.pipeline._follow` (the methods' own operation
with their decisions, applied to each level), so the injections land on the tokens they belong to. Positions:
each kept token keeps its column of ``get_rope_index`` on the full sequence (text after an image continues from
the grid's maximum, whatever the token count); the interleaving of the M-RoPE sections is the rotary module's.

Decoder stage: a method pruning at layer ``K`` inside the injection layers (``K <=`` the last injection layer,
e.g. FastV at ``K = 2`` with three DeepStack levels) shortens the hidden states before the stock injections
``K, K+1, ...`` run, whose mask covers the full sequence. :class:`DeepStackInjection` takes the injections over
while a decoder stage is attached: a pre-hook on the language model takes ``visual_pos_masks`` /
``deepstack_visual_embeds`` out of its call, and a forward hook on each injection layer calls the model's own
``_deepstack_process`` on the rows that layer returns -- the kept visual tokens, each with its own level
features, and a token a decoder method merged (SparseVLM's recycling) with the mean of its members' (the merge
the decoder applies to their hidden states) -- through :func:`follow_rows`. Before the first prune the stock mask
and levels go in unchanged, so a decoder budget of 1.0 is the stock model bit for bit.

Signals: the tower runs one attention call per image (no window attention, no [CLS]); the attention signal is
the mean attention each patch receives within its image at the tower's last layer (the layer the merger reads),
summed over the 4 patches a merged token covers; keys are averaged over them.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import Tensor, nn

from .context import detach_hook, is_active
from .description import ExtraInjection, ModelDescription
from .qwen2_vl import Qwen2VLAdapter
from .registry import register_adapter

__all__ = ["Qwen3VLAdapter", "DeepStackInjection", "follow_rows"]


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen2-VL's native grids, merger and M-RoPE (the base description), plus the DeepStack levels."""

    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    extra_injections = (ExtraInjection(name="deepstack", output_field="deepstack_features", first_layer=0),)
    video_projector_stage = True  # the videos' DeepStack levels follow the kept tokens as the images' do

    def extra_features(self, model, out) -> list[list[Tensor]]:
        """The DeepStack levels ``[level][image]`` ``[L_i, D]``, token for token with ``pooler_output``."""
        levels = getattr(out, "deepstack_features", None) or []
        feats = list(out.pooler_output)
        result = []
        for j, level in enumerate(levels):
            level = list(level)
            shapes = [tuple(f.shape) for f in feats]
            if [tuple(t.shape) for t in level] != shapes:
                raise ValueError(f"DeepStack level {j} has per-image shapes {[tuple(t.shape) for t in level]}; the "
                                 f"image features have {shapes} (they must match token for token)")
            result.append(level)
        return result

    def wrap(self, out, feats: list[Tensor], extra: list[list[Tensor]] | None = None):
        # the stock output class (Qwen3-VL's or Qwen3-VL-MoE's BaseModelOutputWithDeepstackFeatures): the forward
        # reads pooler_output and deepstack_features ([level][image]), generate expands both per sample
        return type(out)(pooler_output=list(feats), deepstack_features=[list(level) for level in extra or []])

    def signal_to_features(self, model, inputs, records, reduce, feats, modality: str = "image"):
        sig = torch.cat([r[0] for r in records], dim=0)  # [patches, C]: one call per image (frame), in order
        unit = self.merge(model) ** 2
        # the processor orders each merge group's patches consecutively (the merger reads them 4 at a time)
        sig = sig.reshape(-1, unit, sig.shape[-1])
        sig = sig.sum(1) if reduce == "sum" else sig.mean(1)
        return list(torch.split(sig, [int(f.shape[0]) for f in feats], dim=0))

    def decoder_hooks(self, model, decoder) -> list:
        return DeepStackInjection(model, decoder, self).handles


register_adapter(Qwen3VLAdapter())


class DeepStackInjection:
    """DeepStack injections that follow a decoder stage's pruning (see the module docstring).

    Per call, the language model's pre-hook moves ``visual_pos_masks [B, L]`` and ``deepstack_visual_embeds``
    (levels ``[V, D]``, the visual positions in row-major order) into this object's per-context state; the forward
    hook of decoder layer ``j < len(levels)`` adds level ``j`` to the rows that layer returned: all rows (the stock
    mask) before any prune, else the real kept rows whose position is visual, each with the level row of its
    position (its rank among the visual positions of the call's sequence).
    """

    def __init__(self, model: nn.Module, decoder, desc: ModelDescription):
        self.decoder = decoder
        self.lm = desc.language_model(model)
        self.layers = desc.llm_layers(model)
        self._state: ContextVar = ContextVar(f"vtcompress_deepstack_{id(self)}", default=None)
        self.handles = [self.lm.register_forward_pre_hook(self._take, with_kwargs=True)]
        levels = len(getattr(desc.vision_config(model), "deepstack_visual_indexes", None) or ())
        self.first = desc.extra_injections[0].first_layer  # level j goes in after layer first + j
        for j in range(min(levels, len(self.layers) - self.first)):
            self.handles.append(self.layers[self.first + j].register_forward_hook(self._make_inject(j)))

    def __deepcopy__(self, memo) -> DeepStackInjection:
        # hooks copied onto a deep copy of the model still point here; they see another module and detach there
        return self

    def _take(self, module, args, kwargs=None):
        if kwargs is None:  # called as a plain hook while another thread (un)registered hooks
            return None
        if module is not self.lm:  # a deep copy of the model: stock
            detach_hook(module, self._take, self.lm)
            return None
        if not is_active(self.decoder):
            return None
        embeds = kwargs.get("deepstack_visual_embeds")
        mask = kwargs.get("visual_pos_masks")
        if embeds is None or mask is None:
            self._state.set(None)
            return None
        self._state.set((mask, list(embeds)))
        kwargs = dict(kwargs)
        kwargs["deepstack_visual_embeds"] = None
        kwargs["visual_pos_masks"] = None
        return args, kwargs

    def _make_inject(self, j: int):
        layer = self.first + j

        def hook(module, args, output):
            if module is not self.layers[layer]:  # a deep copy of the model
                _detach_forward_hook(module, hook, self.layers[layer])
                return None
            state = self._state.get()
            if state is None or not is_active(self.decoder):
                return None
            mask, levels = state
            if j >= len(levels):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            maps = self.decoder.stage_maps(layer)
            if maps is None:  # nothing pruned yet: the stock injection
                new = self.lm._deepstack_process(hidden, mask, levels[j])
            else:
                rows, feats = follow_rows(mask.to(hidden.device), levels[j].to(hidden.device), maps)
                rows_mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
                rows_mask[:, : rows.shape[1]] = rows  # an uncached continuation's generated rows follow: not visual
                new = self.lm._deepstack_process(hidden, rows_mask, feats)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook


def follow_rows(mask: Tensor, level: Tensor, maps: list[tuple[Tensor, Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
    """The visual rows of a pruned sequence and their DeepStack features.

    Args:
        mask: ``[B, L]`` bool visual positions of the call's sequence (``visual_pos_masks``).
        level: ``[V, D]`` one DeepStack level, the rows of ``mask`` in row-major order.
        maps: the decoder stages so far (:meth:`~vtcompress.models.decoder.DecoderHandle.stage_maps`): each keeps
            rows ``rel [B, Ls]`` of the rows entering it (``real [B, Ls]``: not a filler / pad) and, when it merged
            tokens, sends each entering row into row ``into [B, Lprev]`` (``-1``: dropped).

    Returns:
        ``rows [B, Ls]`` bool (the real rows that hold visual tokens) and their features ``[rows.sum(), D]`` in
        row-major order: a kept token's own level row, a merged token the mean of its visual members' (the
        decoder's merges are plain means of the hidden states: every token entering a stage weighs 1).
    """
    b, n = mask.shape
    lv = level.new_zeros(b, n, level.shape[-1])
    lv[mask] = level
    vis = mask
    for rel, real, into in maps:
        if into is None:  # pruning only: the kept rows' own features, exactly
            lv = lv.gather(1, rel[..., None].expand(-1, -1, lv.shape[-1]))
            vis = vis.gather(1, rel) & real
            continue
        ls = rel.shape[1]
        lv, vis = lv[:, : into.shape[1]], vis[:, : into.shape[1]]  # rows after the prompt's are generated text
        slot = torch.where((into >= 0) & vis, into, torch.full_like(into, ls))
        w = vis.to(torch.float32)
        acc = torch.zeros(b, ls + 1, lv.shape[-1], dtype=torch.float32, device=lv.device)
        acc.scatter_add_(1, slot[..., None].expand(-1, -1, lv.shape[-1]), lv.to(torch.float32) * w[..., None])
        cnt = torch.zeros(b, ls + 1, dtype=torch.float32, device=lv.device).scatter_add_(1, slot, w)
        lv = (acc[:, :ls] / cnt[:, :ls, None].clamp(min=1)).to(level.dtype)
        vis = (cnt[:, :ls] > 0) & real
    return vis, lv[vis]


def _detach_forward_hook(module: nn.Module, hook, owner: nn.Module) -> None:
    """Remove forward ``hook`` from a module it was copied onto (a deep copy; a shallow copy shares the dict)."""
    if module._forward_hooks is owner._forward_hooks:
        return
    for key, fn in list(module._forward_hooks.items()):
        if fn == hook:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
