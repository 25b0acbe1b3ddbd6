"""Gemma 3 description (``Gemma3ForConditionalGeneration``): SigLIP, avg-pool projector, bidirectional image blocks.

``get_image_features`` returns a Tensor ``[images, T, D]``: the SigLIP tower's last hidden state (``P x P`` patches,
no [CLS]) average-pooled by the model's own ``multi_modal_projector.avg_pool`` to ``T = mm_tokens_per_image``
tokens (a ``sqrt(T) x sqrt(T)`` grid), RMS-normed and projected. An image's placeholder run is ``T`` ids
``image_token_id`` between ``<start_of_image>`` / ``<end_of_image>`` (text tokens: never compressed). Each image is
one view with grid ``(sqrt(T), sqrt(T))``; the compressed features go back as a Tensor ``[K, 1, D]`` (the stock
forward only checks the element count and ``masked_scatter``\\ s them in placeholder order; one row per token lets
``generate``'s beam / ``num_return_sequences`` expansion split them per sample).

Attention masks. The stock model marks the placeholders with ``token_type_ids == 1`` (``mm_token_type_ids`` on older
releases) and lets each contiguous run -- one image -- attend bidirectionally within itself, on top of the causal
mask of every layer (and inside the window of the sliding-window layers). The shortened ``token_type_ids`` keep
exactly the kept placeholders, so the LLM builds the block of the kept tokens itself: the same mask the stock model
builds for the shortened sequence. The sliding window then counts the tokens of the shortened sequence (the LLM
simply receives fewer tokens, as in every projector-stage reference).

Signals: SigLIP has no [CLS], so the attention signal is the mean attention each patch receives in the tower's last
layer (the one whose output is pooled), summed over the patches a pooled token covers; keys are averaged over them.
Both are pooled by running the model's own ``avg_pool`` on the per-patch signal grid. Encoder-stage merging is not
available (the projector reshapes the tower's output into the full ``P x P`` grid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .description import ModelDescription, PositionScheme
from .layout import ImageLayout
from .registry import register_adapter

__all__ = ["Gemma3Description"]


class Gemma3Description(ModelDescription):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    position_scheme = PositionScheme.ROPE_1D
    decoder_sliding_window = True  # the decoder stage follows each layer's mask and cache (sliding / full, blocks)

    def feature_layer(self, model) -> int:
        return -1  # the projector pools the tower's last hidden state (after SigLIP's post-layernorm)

    def num_prefix_tokens(self, model) -> int:
        return 0

    def grid(self, model) -> tuple[int, int]:
        side = int(self.projector(model).tokens_per_side)
        return (side, side)

    def features(self, model, inputs, out) -> list[Tensor]:
        return list(out.pooler_output)  # [images, T, D] -> one [T, D] per image

    def wrap(self, out, feats):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # [K, 1, D]: the stock forward reads K * D values in placeholder order; rows split per sample under
        # generate's beam / num_return_sequences expansion (a single [1, K, D] row cannot be split)
        return BaseModelOutputWithPooling(pooler_output=torch.cat(feats, dim=0)[:, None])

    def layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        h, w = self.grid(model)
        out = []
        for f in feats:
            if int(f.shape[0]) != h * w:
                raise ValueError(f"a Gemma 3 image has {f.shape[0]} features; expected mm_tokens_per_image = "
                                 f"{h * w} ({h}x{w})")
            out.append(ImageLayout.single((h, w), h * w, f.device))
        return out

    def signal_to_features(self, model, inputs, records, reduce, feats):
        proj = self.projector(model)
        sig = torch.cat(records, dim=0)  # [images, P*P, C]: SigLIP's patches, raster order
        n, _, c = sig.shape
        p = int(proj.patches_per_image)
        grid = sig.transpose(1, 2).reshape(n, c, p, p)
        pooled = proj.avg_pool(grid).flatten(2).transpose(1, 2)  # [images, T, C], the projector's own pooling
        if reduce == "sum":
            pooled = pooled * float(proj.kernel_size) ** 2  # attention mass of the patches a token covers
        return list(pooled)


register_adapter(Gemma3Description())
