"""Qwen2-VL and Qwen2.5-VL description: native-resolution tower, 2x2 patch merger, 3-D M-RoPE.

``get_image_features`` returns per image ``[t*h*w/4, D]`` merged tokens (raster order over the merged grid
``(t*h/2, w/2)``). Positions are M-RoPE: each kept token keeps its column of ``get_rope_index`` on the full
sequence. The tower runs one attention call per image (Qwen2-VL) or per window (Qwen2.5-VL, whose tokens are
reordered into windows in groups of 4 and back after the merger); there is no [CLS], so the attention signal
is the mean attention each patch receives within the call (its window for windowed layers), summed over the 4
patches a merged token covers; keys are averaged over them. The merger is the projector: no 1:1 map from its
input to the LLM's tokens, so methods act on the projected tokens. Videos are described; they pass through
uncompressed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .description import Modality, ModelDescription, PositionScheme, TokenLayout
from .layout import ImageLayout
from .registry import register_adapter

__all__ = ["Qwen2VLAdapter"]


class Qwen2VLAdapter(ModelDescription):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    model_types = ("qwen2_vl", "qwen2_5_vl")
    position_scheme = PositionScheme.MROPE
    vision_position_scheme = PositionScheme.ROPE_2D
    vision_tower_path = "visual"
    vision_layers_path = "blocks"
    vision_attention_path = "attn"
    projector_path = "visual.merger"
    runtime_state = ("rope_deltas",)
    video_projector_stage = True
    video_signals = True
    modalities = (
        Modality(name="image", token_id_keys=("image_token_id",), input_keys=("pixel_values", "image_grid_thw"),
                 encode_fn="get_image_features", layout=TokenLayout.NATIVE,
                 encoder_only_keys=("mm_token_type_ids", "image_grid_thw")),
        Modality(name="video", token_id_keys=("video_token_id",), input_keys=("pixel_values_videos", "video_grid_thw"),
                 encode_fn="get_video_features", layout=TokenLayout.FRAMES),
    )

    def num_prefix_tokens(self, model) -> int:
        return 0

    def feature_layer(self, model) -> int:
        return -1

    def merge(self, model) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    def grid(self, model, thw=None) -> tuple[int, int]:
        if thw is None:
            raise ValueError(f"{self.family}: grids differ per image; pass image_grid_thw")
        m = self.merge(model)
        t, h, w = (int(v) for v in thw)
        return (t * h // m, w // m)

    def layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        out = []
        for f, thw in zip(feats, inputs["image_grid_thw"], strict=True):
            grid = self.grid(model, thw)
            if grid[0] * grid[1] != f.shape[0]:
                raise ValueError(f"an image of grid_thw {thw.tolist()} has {f.shape[0]} features; expected "
                                 f"{grid[0] * grid[1]}")
            out.append(ImageLayout.single(grid, int(f.shape[0]), f.device))
        return out

    def video_layouts(self, model, inputs, feats: list[Tensor]) -> list[ImageLayout]:
        """A video of ``video_grid_thw`` ``(t, h, w)`` is ``t`` frames (after the temporal patch merge) of
        ``(h / m, w / m)`` merged tokens, frame after frame in raster order: one view per frame."""
        m = self.merge(model)
        out = []
        for f, thw in zip(feats, inputs["video_grid_thw"], strict=True):
            t, h, w = (int(v) for v in thw)
            grid = (h // m, w // m)
            if t * grid[0] * grid[1] != f.shape[0]:
                raise ValueError(f"a video of grid_thw {thw.tolist()} has {f.shape[0]} features; expected "
                                 f"{t * grid[0] * grid[1]}")
            out.append(ImageLayout.tiles(grid, t, f.device))
        return out

    def signal_to_features(self, model, inputs, records, reduce, feats, modality: str = "image"):
        # a video's frames are blocks of the tower as images are (one attention block per temporal slot)
        grid_thw = inputs["video_grid_thw" if modality == "video" else "image_grid_thw"]
        sig = torch.cat([r[0] for r in records], dim=0)  # [patches, C] in the order the blocks saw them
        unit = self.merge(model) ** 2
        sig = sig.reshape(-1, unit, sig.shape[-1])
        vcfg = model.config.vision_config
        if hasattr(vcfg, "fullatt_block_indexes"):  # Qwen2.5-VL: undo the window order (groups of `unit`)
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=vcfg.spatial_merge_size,
                window_size=vcfg.window_size, patch_size=vcfg.patch_size)
            window_index = window_index.to(sig.device)
            ordered = torch.empty_like(sig)
            ordered[window_index] = sig
            sig = ordered
        sig = sig.sum(1) if reduce == "sum" else sig.mean(1)
        return list(torch.split(sig, [int(f.shape[0]) for f in feats], dim=0))

    def rope_index(self, model, input_ids, mm_token_type_ids, *, attention_mask, **grids):
        pos, _ = self.base(model).get_rope_index(input_ids, mm_token_type_ids, attention_mask=attention_mask,
                                                 **grids)
        return pos


register_adapter(Qwen2VLAdapter())
