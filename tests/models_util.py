"""Tiny random stock Hugging Face VLMs for tests: one builder per family, CPU, no download.

Each builder returns ``(model, make_inputs)``; ``make_inputs(batch=2, images=None, padding="left", seed=0)``
returns a dict for ``model(**inputs)`` / ``model.generate(**inputs)``: random prompts of different lengths
(padded on ``padding``'s side, with ``attention_mask``), ``images[b]`` images in sample ``b`` (default one
each; 0 gives a text-only sample). The number of placeholder tokens per image is read from the model's own
``get_image_features`` so it always matches what the stock model expects.

Text models have hidden size 32-64 and 2 layers; vision towers 2 layers; everything in eval mode.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

__all__ = [
    "tiny_llava",
    "tiny_llava_next",
    "tiny_onevision",
    "tiny_qwen2_vl",
    "tiny_qwen2_5_vl",
    "tiny_internvl",
    "tiny_qwen3_vl",
    "tiny_gemma3",
    "tiny_llava_next_video",
    "tiny_idefics3",
    "tiny_smolvlm",
    "tiny_mistral3",
    "BUILDERS",
    "tiny_qwen3_vl_moe",
]

VOCAB = 128
PAD = 0
IMAGE = 120  # placeholder id (image_token_id) of every tiny model
SPECIAL = (IMAGE, 121, 122, 123, 124)  # ids never drawn as text
TEXT_HIDDEN = 32


def _llama(hidden: int = TEXT_HIDDEN, attn: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, attn_implementation=attn,
    )


def _qwen2(hidden: int = TEXT_HIDDEN) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2,
    )


def _clip(image_size: int = 16, patch: int = 4) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )


def _finish(model, seed: int, attn: str):
    model.eval()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model


def _text(gen: torch.Generator, n: int) -> list[int]:
    ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
    return [t if t not in SPECIAL else 3 for t in ids]


def _assemble(rows: list[list[int]], padding: str, extra: list[list[int]] | None = None):
    """Pad ``rows`` of ids into ``input_ids``/``attention_mask`` (and ``extra`` rows, e.g. token types)."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right'; got {padding!r}")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    types = torch.zeros((len(rows), length), dtype=torch.long) if extra is not None else None
    for b, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
        if types is not None:
            types[b, sl] = torch.tensor(extra[b])
    return ids, mask, types


def _prompts(gen, batch, images, lens_per_image, image_id=IMAGE, wrap=(None, None)):
    """Random prompts: text, then each image's placeholder run (optionally wrapped), text between images."""
    rows, types, k = [], [], 0
    for b in range(batch):
        row = _text(gen, 2 + (3 * b) % 5)
        typ = [0] * len(row)
        for _ in range(images[b]):
            run = [image_id] * lens_per_image[k]
            k += 1
            pre = [wrap[0]] if wrap[0] is not None else []
            post = [wrap[1]] if wrap[1] is not None else []
            row += pre + run + post
            typ += [0] * len(pre) + [1] * len(run) + [0] * len(post)
            t = _text(gen, 1 + b % 3)
            row += t
            typ += [0] * len(t)
        rows.append(row)
        types.append(typ)
    return rows, types


def _norm_images(batch, images):
    images = [1] * batch if images is None else list(images)
    if len(images) != batch:
        raise ValueError(f"images must list one count per sample ({batch}); got {images}")
    return images


# ----------------------------------------------------------------------------------------- LLaVA-1.5
def tiny_llava(seed: int = 0, attn: str = "sdpa"):
    """LLaVA-1.5: CLIP (16x16 px, 4 px patches -> 4x4 grid + CLS, 3 layers) + LLaMA (hidden 32, 2 layers)."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=_clip(), text_config=_llama(attn=attn), image_token_id=IMAGE, image_seq_length=16,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = _finish(LlavaForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        images = _norm_images(batch, images)
        n = sum(images)
        rows, _ = _prompts(gen, batch, images, [16] * n)
        ids, mask, _ = _assemble(rows, padding)
        out = {"input_ids": ids, "attention_mask": mask}
        if n:
            out["pixel_values"] = torch.randn(n, 3, 16, 16, generator=gen)
        return out

    return model, make_inputs


# ----------------------------------------------------------------------------------------- LLaVA-NeXT
_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
_SIZES = [(20, 30), (30, 14), (16, 16), (28, 28)]  # original image sizes (H, W), cycled


def _anyres_inputs(model, gen, batch, images, padding, extra_keys=()):
    images = _norm_images(batch, images)
    n = sum(images)
    out = {}
    if n:
        sizes = torch.tensor([_SIZES[i % len(_SIZES)] for i in range(n)], dtype=torch.long)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        pinpoints = model.config.image_grid_pinpoints
        crops = [image_size_to_num_patches(s.tolist(), pinpoints, 16) for s in sizes]
        pix = torch.zeros(n, max(crops), 3, 16, 16)
        for i, c in enumerate(crops):
            pix[i, :c] = torch.randn(c, 3, 16, 16, generator=gen)
        kw = {"pixel_values": pix, "image_sizes": sizes}
        if "batch_num_images" in extra_keys:
            kw["batch_num_images"] = torch.tensor([k for k in images if k], dtype=torch.long)
        with torch.no_grad():
            feats = model.model.get_image_features(**kw).pooler_output
        lens = [f.shape[0] for f in feats]
        out.update(kw)
    else:
        lens = []
    rows, _ = _prompts(gen, batch, images, lens)
    ids, mask, _ = _assemble(rows, padding)
    return {"input_ids": ids, "attention_mask": mask, **out}


def tiny_llava_next(seed: int = 0, attn: str = "sdpa"):
    """LLaVA-NeXT (anyres): CLIP crops of 16x16 px (4x4 patches), pinpoints 16x32 / 32x16 / 32x32, LLaMA text."""
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=_clip(), text_config=_llama(attn=attn), image_token_index=IMAGE,
        image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    model = _finish(LlavaNextForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        return _anyres_inputs(model, torch.Generator().manual_seed(seed), batch, images, padding)

    return model, make_inputs


# ----------------------------------------------------------------------------------------- OneVision
def tiny_onevision(seed: int = 0, attn: str = "sdpa", pinpoints=None):
    """LLaVA-OneVision: SigLIP (no CLS) crops of 16x16 px, anyres_max_9 packing, Qwen2 text (hidden 32).

    ``pinpoints=[[64, 64]]`` gives 16 crops per image, whose unpadded grid exceeds 9 crops' worth of patches,
    so the stock packer down-sizes it bilinearly (anyres_max_9)."""
    torch.manual_seed(seed)
    vis = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
        patch_size=4,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vis, text_config=_qwen2(), image_token_index=IMAGE, video_token_index=121,
        image_grid_pinpoints=pinpoints or _PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    model = _finish(LlavaOnevisionForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        return _anyres_inputs(model, torch.Generator().manual_seed(seed), batch, images, padding,
                              extra_keys=("batch_num_images",))

    return model, make_inputs


# ----------------------------------------------------------------------------------------- Qwen2-VL
_GRIDS = [(1, 4, 6), (1, 6, 4), (1, 4, 4), (1, 8, 4)]  # (t, h, w) patch grids, cycled


def _qwen_inputs(model, gen, batch, images, padding, vision_cfg):
    images = _norm_images(batch, images)
    n = sum(images)
    grids = torch.tensor([_GRIDS[i % len(_GRIDS)] for i in range(n)], dtype=torch.long).reshape(n, 3)
    lens = (grids.prod(-1) // 4).tolist()
    rows, types = _prompts(gen, batch, images, lens, image_id=IMAGE, wrap=(122, 123))
    ids, mask, tt = _assemble(rows, padding, extra=types)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": tt}
    if n:
        dim = vision_cfg.in_channels * vision_cfg.temporal_patch_size * vision_cfg.patch_size**2
        out["pixel_values"] = torch.randn(int(grids.prod(-1).sum()), dim, generator=gen)
        out["image_grid_thw"] = grids
    return out


def _qwen_text(cls_cfg_kwargs):
    return dict(
        vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        **cls_cfg_kwargs,
    )


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa"):
    """Qwen2-VL: vision tower (2 px patches, 2x2 merger, 2 blocks, dim 32), M-RoPE text (hidden 32, 2 layers)."""
    torch.manual_seed(seed)
    vis = dict(depth=2, embed_dim=32, hidden_size=TEXT_HIDDEN, num_heads=4, mlp_ratio=2, patch_size=2,
               temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    cfg = Qwen2VLConfig(vision_config=vis, text_config=_qwen_text({}), image_token_id=IMAGE, video_token_id=121,
                        vision_start_token_id=122, vision_end_token_id=123)
    model = _finish(Qwen2VLForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        return _qwen_inputs(model, gen, batch, images, padding, model.config.vision_config)

    return model, make_inputs


def tiny_qwen2_5_vl(seed: int = 0, attn: str = "sdpa"):
    """Qwen2.5-VL: windowed vision tower (window 8 px = 2x2 merged tokens, full attention in block 1)."""
    torch.manual_seed(seed)
    vis = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, num_heads=4,
               patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=8,
               fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(vision_config=vis, text_config=_qwen_text({}), image_token_id=IMAGE,
                           video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    model = _finish(Qwen2_5_VLForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        return _qwen_inputs(model, gen, batch, images, padding, model.config.vision_config)

    return model, make_inputs


# ----------------------------------------------------------------------------------------- Qwen3-VL
def tiny_qwen3_vl(seed: int = 0, attn: str = "sdpa", text_layers: int = 3, deepstack=(0, 1), moe: bool = False):
    """Qwen3-VL: vision tower (2 px patches, 2x2 merger, 3 blocks, dim 32, learned 4x4 position grid) with
    DeepStack levels from blocks ``deepstack`` (added after LLM layers 0, 1, ...), interleaved M-RoPE text
    (Qwen3 attention with q/k norms, hidden 32, ``text_layers`` layers: 3, so that a level injected after layer 1
    still reaches the last token through layer 2's attention). ``moe=True``: Qwen3-VL-MoE (4 experts, top 2)."""
    torch.manual_seed(seed)
    vis = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, num_heads=4, patch_size=2,
               temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_position_embeddings=16,
               deepstack_visual_indexes=list(deepstack))
    text = dict(
        vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                         "rope_theta": 10000.0},
    )
    config_cls, model_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    if moe:
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

        config_cls, model_cls = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
    cfg = config_cls(vision_config=vis, text_config=text, image_token_id=IMAGE, video_token_id=121,
                     vision_start_token_id=122, vision_end_token_id=123)
    model = _finish(model_cls(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        return _qwen_inputs(model, gen, batch, images, padding, model.config.vision_config)

    return model, make_inputs


# ----------------------------------------------------------------------------------------- InternVL
def tiny_internvl(seed: int = 0, attn: str = "sdpa"):
    """InternVL: InternViT (16x16 px tiles, 4x4 patches + CLS, 3 layers), pixel shuffle -> 2x2 tokens per tile,
    Qwen2 text (hidden 32). Image ``k`` has ``1 + k % 3`` tiles."""
    torch.manual_seed(seed)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
               patch_size=4)
    cfg = InternVLConfig(vision_config=vis, text_config=_qwen2(), image_token_id=IMAGE, image_seq_length=4,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _finish(InternVLForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        images = _norm_images(batch, images)
        n = sum(images)
        tiles = [1 + k % 3 for k in range(n)]
        rows, _ = _prompts(gen, batch, images, [4 * t for t in tiles], wrap=(122, 123))
        ids, mask, _ = _assemble(rows, padding)
        out = {"input_ids": ids, "attention_mask": mask}
        if n:
            out["pixel_values"] = torch.randn(sum(tiles), 3, 16, 16, generator=gen)
        return out

    return model, make_inputs


# ----------------------------------------------------------------------------------------- Gemma 3
GEMMA3_BOI, GEMMA3_EOI = 121, 122  # <start_of_image> / <end_of_image>
GEMMA3_WINDOW = 8  # sliding window of the tiny Gemma 3 text model (shorter than most test prompts)


def tiny_gemma3(seed: int = 0, attn: str = "sdpa", window: int = GEMMA3_WINDOW):
    """Gemma 3: SigLIP (32x32 px, 4 px patches -> 8x8 grid, no CLS, 2 layers), avg-pool projector to 16 tokens
    (4x4), Gemma 3 text (hidden 32, 3 layers: sliding, sliding, full; window ``window``). Each image's 16
    placeholders sit between <start_of_image> / <end_of_image>; ``token_type_ids`` mark them (1) as the processor
    does, so each image attends bidirectionally within itself."""
    torch.manual_seed(seed)
    vis = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=4)
    text = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=512,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    cfg = Gemma3Config(text_config=text, vision_config=vis, mm_tokens_per_image=16, image_token_id=IMAGE,
                       boi_token_id=GEMMA3_BOI, eoi_token_id=GEMMA3_EOI, pad_token_id=PAD)
    model = _finish(Gemma3ForConditionalGeneration(cfg), seed, attn)
    with torch.no_grad():  # the stock init leaves the projection at zero (all image features equal): randomise it
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        images = _norm_images(batch, images)
        n = sum(images)
        rows, types = _prompts(gen, batch, images, [16] * n, wrap=(GEMMA3_BOI, GEMMA3_EOI))
        ids, mask, tt = _assemble(rows, padding, extra=types)
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
        if n:
            out["pixel_values"] = torch.randn(n, 3, 32, 32, generator=gen)
        return out

    return model, make_inputs


# ----------------------------------------------------------------------------------------- LLaVA-NeXT-Video
VIDEO = 121  # video_token_id of the tiny LLaVA-NeXT-Video


def tiny_llava_next_video(seed: int = 0, attn: str = "sdpa"):
    """LLaVA-NeXT-Video: LLaVA-NeXT's anyres images (CLIP crops of 16x16 px, 4x4 patches) and videos whose frames
    are pooled 4x4 -> 2x2 (``spatial_pool_stride=2``); LLaMA text. ``make_inputs`` gives images only."""
    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(
        vision_config=_clip(), text_config=_llama(attn=attn), image_token_index=IMAGE, video_token_index=VIDEO,
        image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=16, spatial_pool_stride=2, video_seq_length=4,
    )
    model = _finish(LlavaNextVideoForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        return _anyres_inputs(model, torch.Generator().manual_seed(seed), batch, images, padding)

    return model, make_inputs


# ----------------------------------------------------------------------------------------- Idefics3 / SmolVLM
FAKE = 121  # <fake_token_around_image>
GLOBAL = 122  # <global-img>
NEWLINE = 11  # "\n", an ordinary text token
_ROW_COL = 100  # <row_i_col_j> = 100 + 3 * (i - 1) + (j - 1), i, j <= 3
_SPLITS = [(0, 0), (1, 2), (2, 1), (1, 1)]  # (rows, cols) of the tiles of image k, cycled; (0, 0): not split


def idefics3_prompt(rows: int, cols: int, n: int) -> list[int]:
    """An image's tokens as the Idefics3 / SmolVLM processors write them (``n`` placeholders per tile)."""
    if rows == 0:
        return [FAKE, GLOBAL] + [IMAGE] * n + [FAKE]
    out = []
    for i in range(rows):
        for j in range(cols):
            out += [FAKE, _ROW_COL + 3 * i + j] + [IMAGE] * n
        out.append(NEWLINE)
    return out + [NEWLINE, FAKE, GLOBAL] + [IMAGE] * n + [FAKE]


def _idefics3(config_cls, model_cls, seed: int, attn: str):
    torch.manual_seed(seed)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
               patch_size=4)
    text = _llama(attn=attn)
    cfg = config_cls(vision_config=vis, text_config=text, image_token_id=IMAGE, scale_factor=2)
    model = _finish(model_cls(cfg), seed, attn)
    markers = {FAKE, GLOBAL, *range(_ROW_COL, _ROW_COL + 9)}

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        images = _norm_images(batch, images)
        rows, tiles, k = [], [], []
        for b in range(batch):
            row = [t if t not in markers else 3 for t in _text(gen, 2 + (3 * b) % 5)]
            k.append(0)
            for _ in range(images[b]):
                r, c = _SPLITS[len(tiles) % len(_SPLITS)]
                tiles.append(r * c + 1)
                k[-1] += r * c + 1
                row += idefics3_prompt(r, c, 4)
                row += [t if t not in markers else 3 for t in _text(gen, 1 + b % 3)]
            rows.append(row)
        ids, mask, _ = _assemble(rows, padding)
        out = {"input_ids": ids, "attention_mask": mask}
        if tiles:
            pix = torch.zeros(batch, max(k), 3, 16, 16)
            for b in range(batch):
                pix[b, : k[b]] = torch.randn(k[b], 3, 16, 16, generator=gen)
            out["pixel_values"] = pix
        return out

    return model, make_inputs


def tiny_idefics3(seed: int = 0, attn: str = "sdpa"):
    """Idefics3: SigLIP-style tower (16x16 px tiles, 4x4 patches, no CLS, 3 layers), pixel shuffle 2 -> 2x2
    tokens per tile, LLaMA text (hidden 32). Image ``k`` is split as ``_SPLITS[k % 4]`` plus its global tile."""
    return _idefics3(Idefics3Config, Idefics3ForConditionalGeneration, seed, attn)


def tiny_smolvlm(seed: int = 0, attn: str = "sdpa"):
    """SmolVLM: the same geometry as :func:`tiny_idefics3` through the SmolVLM classes."""
    return _idefics3(SmolVLMConfig, SmolVLMForConditionalGeneration, seed, attn)


# ----------------------------------------------------------------------------------------- Mistral 3 / Pixtral
IMG_BREAK = 121
IMG_END = 122
_PIXTRAL_SIZES = [(16, 24), (24, 16), (16, 16), (32, 8)]  # image sizes (H, W) in pixels, cycled: 8 px per token


def pixtral_prompt(rows: int, cols: int) -> list[int]:
    """An image's tokens as the Pixtral processor writes them: each row of the merged grid, then a break."""
    out = []
    for r in range(rows):
        out += [IMAGE] * cols + [IMG_END if r == rows - 1 else IMG_BREAK]
    return out


def tiny_mistral3(seed: int = 0, attn: str = "sdpa"):
    """Mistral 3: Pixtral tower (4 px patches, axial 2-D RoPE, 3 layers, hidden 32), 2x2 patch merger, Mistral
    text (hidden 32, no sliding window, as the released checkpoints). Image ``k`` is ``_PIXTRAL_SIZES[k % 4]``."""
    torch.manual_seed(seed)
    vis = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=4, head_dim=8)
    text = MistralConfig(
        vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, sliding_window=None, attn_implementation=attn,
    )
    cfg = Mistral3Config(vision_config=vis, text_config=text, image_token_index=IMAGE, spatial_merge_size=2,
                         vision_feature_layer=-1)
    model = _finish(Mistral3ForConditionalGeneration(cfg), seed, attn)

    def make_inputs(batch: int = 2, images=None, padding: str = "left", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        images = _norm_images(batch, images)
        rows, sizes = [], []
        for b in range(batch):
            row = _text(gen, 2 + (3 * b) % 5)
            for _ in range(images[b]):
                h, w = _PIXTRAL_SIZES[len(sizes) % len(_PIXTRAL_SIZES)]
                sizes.append((h, w))
                row += pixtral_prompt(h // 8, w // 8) + _text(gen, 1 + b % 3)
            rows.append(row)
        ids, mask, _ = _assemble(rows, padding)
        out = {"input_ids": ids, "attention_mask": mask}
        if sizes:
            pix = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
            for i, (h, w) in enumerate(sizes):
                pix[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
            out["pixel_values"] = pix
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return out

    return model, make_inputs


def tiny_qwen3_vl_moe(seed: int = 0, attn: str = "sdpa"):
    """Qwen3-VL-MoE: :func:`tiny_qwen3_vl` with a mixture-of-experts LLM."""
    return tiny_qwen3_vl(seed, attn, moe=True)


BUILDERS = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "onevision": tiny_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "internvl": tiny_internvl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": tiny_qwen3_vl_moe,
    "gemma3": tiny_gemma3,
    "llava_next_video": tiny_llava_next_video,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "mistral3": tiny_mistral3,
}


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of placeholder tokens in one row (the builders separate images by text)."""
    is_img = (row == IMAGE).long()
    starts = (is_img[1:] > is_img[:-1]).nonzero().squeeze(1) + 1
    starts = torch.cat([torch.tensor([0]) if bool(is_img[0]) else torch.tensor([], dtype=torch.long), starts])
    ends = (is_img[:-1] > is_img[1:]).nonzero().squeeze(1) + 1
    if bool(is_img[-1]):
        ends = torch.cat([ends, torch.tensor([len(row)])])
    return (ends - starts).tolist()


def split_samples(inputs: dict) -> list[dict]:
    """The batch ``inputs`` of any builder as one unpadded input dict per sample (with its own images)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    runs = [_runs(r) for r in ids]
    counts = [len(r) for r in runs]
    pv = inputs.get("pixel_values")
    if pv is not None and pv.dim() == 5 and "image_sizes" not in inputs:  # Idefics3 / SmolVLM: tiles per sample
        out = []
        for b in range(ids.shape[0]):
            keep = mask[b].bool()
            one = {key: inputs[key][b : b + 1, keep] for key in ("input_ids", "attention_mask")}
            if counts[b]:
                one["pixel_values"] = pv[b : b + 1, : counts[b]]
            out.append(one)
        return out
    if pv is not None and pv.dim() == 4 and "image_sizes" in inputs:  # Mistral 3: a run per row, one [IMG_END]
        counts = (ids == IMG_END).sum(1).tolist()
    if "image_grid_thw" in inputs:
        rows = inputs["image_grid_thw"].prod(-1).tolist()
    elif "image_sizes" in inputs:
        rows = [1] * sum(counts)
    else:  # LLaVA: one image per row of pixel_values; InternVL: one row per tile of 4 tokens
        per = [n for r in runs for n in r]
        rows = [1] * len(per) if ids.shape[0] and inputs.get("pixel_values") is not None and \
            inputs["pixel_values"].shape[0] == len(per) else [n // 4 for n in per]
    out = []
    k = 0
    r0 = 0
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        one = {key: inputs[key][b : b + 1, keep] for key in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                              "token_type_ids") if key in inputs}
        n = counts[b]
        nrows = sum(rows[k : k + n])
        if n:
            one["pixel_values"] = inputs["pixel_values"][r0 : r0 + nrows]
            for key in ("image_sizes", "image_grid_thw"):
                if key in inputs:
                    one[key] = inputs[key][k : k + n]
            if "batch_num_images" in inputs:
                one["batch_num_images"] = torch.tensor([n])
        k += n
        r0 += nrows
        out.append(one)
    return out
