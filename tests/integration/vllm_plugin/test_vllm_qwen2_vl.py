"""Qwen2-VL under vLLM + the vtcompress plugin == the Hugging Face path (``vtcompress.apply``), on one checkpoint.

A tiny random ``Qwen2VLForConditionalGeneration`` (head size 32 in the LLM and the vision tower; 4 px patches, 2x2
merger) saved with a real ``Qwen2VLProcessor`` built offline (a word-level tokenizer holding Qwen's special tokens).
Images of 48 x 64 px give a 6 x 8 grid of merged tokens (non-square, so the M-RoPE extent after the image is the
larger side). The kept tokens keep their 3-D grid positions through vLLM's hook for pruned multimodal inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtcompress
from vtcompress.integrations.vllm import hf_overrides
from vtcompress.integrations.vllm.worker import WORKER_CLS

N_NEW = 4
GRID = (6, 8)  # merged tokens of a 48 x 64 image
FULL = GRID[0] * GRID[1]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = "user assistant what is in the picture colour shape left right top bottom a an the of".split()


def save_tiny_qwen2_vl(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + ["?", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]")
    images = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                   max_pixels=64 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    videos = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                   max_pixels=64 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Qwen2VLProcessor(image_processor=images, video_processor=videos, tokenizer=tokenizer).save_pretrained(path)
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
                pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"])
    vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, initializer_range=0.2)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=vocab["<|image_pad|>"],
                        video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                        vision_end_token_id=vocab["<|vision_end|>"], tie_word_embeddings=False)
    Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_vl")
    save_tiny_qwen2_vl(path)
    return path


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    out = []
    for i, question in enumerate(["what is in the picture ?", "what colour is the left shape ?",
                                  "what shape is top right ?"]):
        img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        img[8 * i : 8 * i + 16, 8:40] = rng.integers(0, 256, 3)  # a block of one colour somewhere
        out.append((Image.fromarray(img), question))
    return out


@pytest.fixture(scope="module")
def engines(checkpoint):
    from vllm import LLM

    common = dict(model=str(checkpoint), dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=4,
                  limit_mm_per_prompt={"image": 1}, seed=0)
    stock = LLM(**common)
    plugin = LLM(**common, worker_cls=WORKER_CLS, hf_overrides=hf_overrides("Qwen2VLForConditionalGeneration"))
    return stock, plugin


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos
    return processor, model


def _prompt(question: str) -> str:
    return f"<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> {question} <|im_end|> <|im_start|> assistant"


def _request(scene, method=None, budget=None) -> dict:
    req = {"prompt": _prompt(scene[1]), "multi_modal_data": {"image": scene[0]}}
    if method is not None:
        req["mm_processor_kwargs"] = {"vtcompress_method": method, "vtcompress_budget": budget}
    return req


def _run(llm, requests) -> list[tuple[int, list[int]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    return [(len(o.prompt_token_ids), list(o.outputs[0].token_ids))
            for o in llm.generate(requests, params, use_tqdm=False)]


def _hf(hf, scene, method=None, budget=None, kept=FULL) -> tuple[int, list[int]]:
    processor, model = hf
    inputs = processor(images=scene[0], text=_prompt(scene[1]), return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == FULL
    with torch.no_grad():
        if method is None:
            ids = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
        else:
            with vtcompress.apply(model, vtcompress.get(method, budget=budget)):
                ids = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    return n - FULL + kept, ids[0, n:].tolist()


def test_stock_vllm_matches_hf(engines, hf, scenes):
    stock, _ = engines
    assert _run(stock, [_request(s) for s in scenes]) == [_hf(hf, s) for s in scenes]


@pytest.mark.parametrize("method", [None, "divprune", "tome", "fastervlm"])
def test_budget_one_is_stock_vllm(engines, hf, scenes, method):
    stock, plugin = engines
    ref = _run(stock, [_request(s) for s in scenes])
    assert _run(plugin, [_request(s, method, 1.0 if method else None) for s in scenes]) == ref


@pytest.mark.parametrize(("method", "budget", "kept"), [
    ("divprune", 0.25, 12), ("fastervlm", 0.25, 12), ("visionzip", 0.25, 12), ("tome", 0.25, 12),
    ("random", 20, 20)])
def test_plugin_matches_hf_path(engines, hf, scenes, method, budget, kept):
    _, plugin = engines
    got = _run(plugin, [_request(s, method, budget) for s in scenes])
    assert got == [_hf(hf, s, method, budget, kept) for s in scenes]


def test_concurrent_requests_with_different_budgets(engines, hf, scenes):
    _, plugin = engines
    asks = [(scenes[0], "divprune", 0.11, 5), (scenes[0], "divprune", 1.0, FULL), (scenes[1], "tome", 0.5, 24)]
    got = _run(plugin, [_request(s, m, b) for s, m, b, _ in asks])
    assert got == [_hf(hf, s, m, b, k) for s, m, b, k in asks]


def test_plugin_needs_its_cpu_worker(checkpoint):
    from vllm import LLM

    with pytest.raises(Exception, match="worker_cls"):
        LLM(model=str(checkpoint), dtype="float32", max_model_len=512, enforce_eager=True,
            hf_overrides=hf_overrides("Qwen2VLForConditionalGeneration"))
