"""Qwen2-VL in vLLM with per-request projector-stage compression: ``VtcompressQwen2VLForConditionalGeneration``.

A subclass of vLLM's own ``Qwen2VLForConditionalGeneration``. Its image path runs the stock vision tower (a
pre-hook on the last block's attention records the mean attention each patch receives and the keys, recomputed
from that block's input with the module's own ``qkv`` / rotary embedding), then compresses the merged tokens (the
patch merger is the projector, as on the Hugging Face path) with the same mechanics as ``vtcompress.apply``.

Positions: every kept token keeps its 3-D M-RoPE grid position, and the text after the image continues from the
full grid's extent, as the Hugging Face path (and stock M-RoPE) does. The positions of the kept tokens travel as 4
extra channels of the image embeddings ``[t, h, w, max(h_grid, w_grid)]`` -- relative to the image start, the
layout vLLM's Efficient Video Sampling uses -- and vLLM's hook for pruned multimodal inputs
(``recompute_mrope_positions``, :class:`~vllm.model_executor.models.interfaces.SupportsMultiModalPruning`) writes
them into the request's positions before the LLM runs. vLLM 0.32 calls that hook only when its runner enables it:
on CPU serve with ``worker_cls`` :data:`vtcompress.integrations.vllm.worker.WORKER_CLS` (checked at start-up); on
GPU the runner enables it when a video pruning rate is configured, which this class sets (to a value no code of this
class reads: videos are served uncompressed).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import compute_mrope_for_media, recompute_mrope_positions

from ...models.apply import ImageLayout, compress_features
from .host import CompressingModelMixin, CompressingProcessorMixin, check_count, spec_rows
from .signals import capture_qwen2_vl, check_parallel
from .spec import SPEC_FIELD, RequestSpec, kept_count

__all__ = ["VtcompressQwen2VLForConditionalGeneration", "VtcompressQwen2VLProcessor"]

_POSITION_CHANNELS = 4


def _llm_grid(thw, merge: int) -> tuple[int, int]:
    t, h, w = (int(v) for v in thw)
    return (t * h // merge, w // merge)


class VtcompressQwen2VLProcessor(CompressingProcessorMixin, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor whose image placeholder runs hold the tokens each request's method keeps."""

    def _vtc_num_images(self, out) -> int:
        thw = out.get("image_grid_thw")
        return 0 if thw is None else len(thw)

    def _vtc_image_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_id)

    def placeholder_count(self, full: int, spec: RequestSpec, item_idx: int, items) -> int:
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)
        grid = _llm_grid(items[item_idx]["image_grid_thw"].data, merge)
        if full != grid[0] * grid[1]:
            raise ValueError(f"an image of {full} placeholder tokens; its grid gives {grid[0] * grid[1]}")
        return kept_count(spec, grid)


def _check_runner_hook(vllm_config) -> None:
    """vLLM must call ``recompute_mrope_positions`` for this model (see the module docstring)."""
    from vllm.platforms import current_platform

    from .worker import WORKER_CLS

    if current_platform.is_cpu():
        if vllm_config.parallel_config.worker_cls != WORKER_CLS:
            raise ValueError(
                "the vtcompress Qwen2-VL classes need vLLM to recompute the M-RoPE positions of the kept image tokens, "
                "which vLLM 0.32's CPU runner never enables; serve with "
                f"worker_cls={WORKER_CLS!r} (vllm serve ... --worker-cls {WORKER_CLS})")
        return
    mm = vllm_config.model_config.multimodal_config
    if not mm.is_multimodal_pruning_enabled():
        # the GPU runner calls the hook only while a video pruning rate is set; videos pass this class unpruned
        mm.video_pruning_rate = 1e-6


@MULTIMODAL_REGISTRY.register_processor(
    VtcompressQwen2VLProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder)
class VtcompressQwen2VLForConditionalGeneration(CompressingModelMixin, Qwen2VLForConditionalGeneration):
    """vLLM's ``Qwen2VLForConditionalGeneration`` with vtcompress's projector-stage methods on its images."""

    supports_multimodal_pruning = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        check_parallel(vllm_config)
        _check_runner_hook(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    # --- the images --------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        rows = kwargs.pop(SPEC_FIELD, None)
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[Tensor, ...] = ()
        for modality, given in modalities.items():
            if modality == "images" and given["type"] == "pixel_values":
                thw = given["image_grid_thw"]
                specs = spec_rows(rows, int(thw.shape[0]))
                out += tuple(self._vtc_embed(given, specs))
                continue
            embeds = self._process_image_input(given) if modality == "images" else self._process_video_input(given)
            thw = given["image_grid_thw" if modality == "images" else "video_grid_thw"]
            out += tuple(self._with_positions(e, t, None) for e, t in zip(embeds, thw.tolist(), strict=True))
        return out

    def _with_positions(self, emb: Tensor, thw, kept: Tensor | None) -> Tensor:
        """``[M, D + 4]``: the embeddings and the grid positions of their tokens, channel 3 = the grid's extent."""
        merge = self.visual.spatial_merge_size
        pos = compute_mrope_for_media(torch.tensor(thw), merge).to(emb.device)
        pos[:, 3] = max(int(thw[0]), int(thw[1]) // merge, int(thw[2]) // merge)
        if kept is not None:
            pos = pos[kept.to(pos.device)]
        return torch.cat([emb, pos.to(emb.dtype)], dim=1)

    def compress_images(self, image_input, index: list[int], spec: RequestSpec) -> list[Tensor]:
        """Embeddings with position channels ``[M_i, D + 4]`` of images ``index`` of ``image_input``."""
        merge = self.visual.spatial_merge_size
        thw_all = image_input["image_grid_thw"]
        sizes = (thw_all.prod(-1)).tolist()
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        pv = image_input["pixel_values"]
        pixels = torch.cat([pv[starts[i]:starts[i + 1]] for i in index])
        thw = thw_all[index]
        if spec.method is None:
            embeds = self.visual(pixels, grid_thw=thw).split((thw.prod(-1) // merge**2).tolist())
            return [self._with_positions(e, t, None) for e, t in zip(embeds, thw.tolist(), strict=True)]
        method = spec.build()
        needs = set(method.needs)
        capture = contextlib.nullcontext(None)
        if needs & {"cls_attn", "keys"}:
            layer = getattr(method, "signal_layer", None)
            blocks = self.visual.blocks
            layer = len(blocks) - 1 if layer is None else int(layer) % len(blocks)
            capture = capture_qwen2_vl(blocks[layer].attn, attn="cls_attn" in needs, keys="keys" in needs,
                                       heads=getattr(method, "signal_heads", "mean"))
        with torch.no_grad(), capture as rec:
            merged = self.visual(pixels, grid_thw=thw)
        counts = (thw.prod(-1) // merge**2).tolist()
        feats = list(merged.split(counts))
        grids = [_llm_grid(t, merge) for t in thw.tolist()]
        attn = keys = None
        unit = merge**2
        if rec is not None:
            def pool(frames: list[Tensor], reduce: str) -> list[Tensor]:
                # one record per frame (cu_seqlens segment), patches in groups of `unit` per merged token
                sig = torch.cat([f if f.dim() == 2 else f[:, None] for f in frames])
                sig = sig.reshape(-1, unit, sig.shape[-1])
                sig = sig.sum(1) if reduce == "sum" else sig.mean(1)
                return list(sig.split(counts))
            attn = pool(rec.attn, "sum") if rec.attn else None
            keys = pool(rec.keys, "mean") if rec.keys else None
        layouts = [ImageLayout.single(g, int(f.shape[0]), f.device) for g, f in zip(grids, feats, strict=True)]
        new, kept, _tokens = compress_features(self, layouts, feats, [method], attn=attn, keys=keys,
                                               positions="original")
        out = []
        for x, k, g, t in zip(new, kept, grids, thw.tolist(), strict=True):
            check_count(int(x.shape[0]), kept_count(spec, g), spec)
            out.append(self._with_positions(x, t, k))
        return out

    # --- positions ----------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Stock M-RoPE positions, with a compressed image's run laid out by its placeholder count: sequential
        positions that :meth:`recompute_mrope_positions` overwrites once the image's kept tokens are known (a run of
        the full grid count gets the stock grid positions)."""
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        pieces: list[np.ndarray] = []
        st = nxt = 0
        for f, (offset, t, h, w, t_factor) in zip(feats, self.iter_mm_grid_thw(mm_features), strict=True):
            length = int(f.mm_position.length)
            pieces.append(np.broadcast_to(np.arange(offset - st), (3, offset - st)) + nxt)
            nxt += offset - st
            if length == t * h * w:
                grid = np.indices((t, h, w))
                if t_factor != 1.0:
                    grid[0] = (grid[0] * t_factor).astype(np.int64)
                pieces.append(grid.reshape(3, -1) + nxt)
            else:
                pieces.append(np.broadcast_to(np.arange(length), (3, length)) + nxt)
            nxt = int(pieces[-1].max()) + 1 if pieces[-1].size else nxt
            st = offset + length
        rest = len(input_tokens) - st
        pieces.append(np.broadcast_to(np.arange(rest), (3, rest)) + nxt)
        positions = np.concatenate(pieces, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    # --- vLLM's hook for pruned multimodal inputs ----------------------------------------------------------------
    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Split the position channels off the embeddings and write the kept tokens' positions (vLLM's EVS code)."""
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = input_ids.to(torch.long) if isinstance(input_ids, Tensor) else torch.tensor(input_ids, dtype=torch.long,
                                                                                           device=device)
        embeds = [mm[:, :-_POSITION_CHANNELS] for mm in multimodal_embeddings]
        pos = [mm[:, -_POSITION_CHANNELS:].permute(1, 0).long() for mm in multimodal_embeddings]
        positions, delta = recompute_mrope_positions(
            ids, pos, mrope_positions, num_computed_tokens, self.config.vision_start_token_id,
            self.config.image_token_id, self.config.video_token_id)
        return embeds, positions, delta
