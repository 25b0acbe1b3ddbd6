"""The embedded testbed VLM: a tiny stock ``LlavaForConditionalGeneration`` plus its word-level tokenizer.

Architecture (all stock Hugging Face classes, nothing custom at inference):

- vision tower: ``CLIPVisionModel`` (96x96 px, patch 8 -> 12x12 = 144 patches + [CLS]);
- features: hidden states of vision layer ``vision_feature_layer=-2`` with [CLS] dropped
  (``vision_feature_select_strategy="default"``), as in LLaVA-1.5;
- projector: LLaVA's 2-layer GELU MLP;
- language model: ``LlamaForCausalLM`` over a word-level vocabulary where every answer is one token.

Prompt layout (one sample, before left padding)::

    <s> you are a careful visual assistant . ... one word . <image> x 144 question : <q> answer :

and the answer is the next token.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import data as D

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_TOKEN = "<image>"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# CLIP's pixel normalisation constants (we normalise ourselves: no image processor download).
PIXEL_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
PIXEL_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


# ----------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` (left padding); ids 0-4 are the special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in D.vocabulary():
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=512,
    )
    return fast


def build_prompt(question: str, n_image_tokens: int = D.N_PATCHES) -> str:
    """Prompt text for one question: BOS, preamble, ``n_image_tokens`` placeholders, question, 'answer :'."""
    image = " ".join([IMAGE_TOKEN] * n_image_tokens)
    return f"<s> {D.PREAMBLE} {image} question : {question} answer :"


def answer_token_ids(tokenizer) -> list[int]:
    """Ids of every answer word, in ``data.ANSWER_WORDS`` order."""
    return tokenizer.convert_tokens_to_ids(D.ANSWER_WORDS)


# ----------------------------------------------------------------------------------------------- model


def build_config(tokenizer, vision_hidden: int = 128, text_hidden: int = 128, vision_layers: int = 4,
                 text_layers: int = 4):
    """A tiny ``LlavaConfig``: CLIP vision tower (with [CLS]) + Llama text model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab_size = int(np.ceil(len(tokenizer) / 8) * 8)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=D.IMAGE_SIZE,
        patch_size=D.PATCH,
        num_channels=3,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=3 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=D.N_PATCHES,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


def build_model(tokenizer, seed: int = 0, **kw):
    """A freshly initialised testbed ``LlavaForConditionalGeneration`` (float32)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(build_config(tokenizer, **kw))


def load_testbed(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """Load the shipped testbed VLM and tokenizer (``model.eval()``); ``path`` defaults to the packaged weights."""
    from transformers import LlavaForConditionalGeneration

    return load_pretrained(LlavaForConditionalGeneration, path if path is not None else WEIGHTS_DIR, device, dtype)


def load_pretrained(model_cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32):
    """``model_cls`` and its tokenizer (left padding) from the directory ``path``, moved to ``device``, in eval mode:
    the one loader of the shipped testbeds (images and clips)."""
    from transformers import PreTrainedTokenizerFast

    model = model_cls.from_pretrained(str(path), dtype=dtype)
    model.to(device)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- encode


def pixel_values_from_images(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 images (H, W, 3) -> CLIP-normalised float32 pixel_values (B, 3, H, W)."""
    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def encode(tokenizer, samples: list[D.Sample], config=None) -> dict[str, torch.Tensor]:
    """Batch ``samples`` LLaVA style.

    Returns input_ids (B, L) with ``config.image_seq_length`` (144) ``<image>`` tokens per row, LEFT padded;
    attention_mask (B, L) with 0 on padding; pixel_values (B, 3, 96, 96) float32; answer_ids (B,) the id of
    each sample's one-token answer.
    """
    n_img = int(getattr(config, "image_seq_length", D.N_PATCHES) or D.N_PATCHES) if config is not None else D.N_PATCHES
    texts = [build_prompt(s.question, n_img) for s in samples]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False, padding_side="left")
    answer_ids = torch.tensor(tokenizer.convert_tokens_to_ids([s.answer for s in samples]), dtype=torch.long)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": pixel_values_from_images([s.image for s in samples]),
        "answer_ids": answer_ids,
    }


# ----------------------------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate(model, tokenizer, samples: list[D.Sample], batch_size: int = 64,
             restrict_to_answers: bool = True) -> dict:
    """Accuracy of the model on ``samples``.

    One ``model(input_ids=..., attention_mask=..., pixel_values=...)`` call per batch (nothing else touches the
    model, so a compression context manager may shorten the image tokens inside); the prediction is the argmax
    of the last position's logits (B, V), restricted to the answer vocabulary by default.

    Returns dict(accuracy=float, per_skill={skill: acc}, correct=list[bool], predictions=list[str]).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ans_ids = torch.tensor(answer_token_ids(tokenizer), device=device)
    correct: list[bool] = []
    preds: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        enc = encode(tokenizer, chunk, model.config)
        out = model(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            pixel_values=enc["pixel_values"].to(device=device, dtype=dtype),
        )
        last = out.logits[:, -1, :].float()  # (B, V): left padding puts every prompt's end at -1
        if restrict_to_answers:
            pred_ids = ans_ids[last[:, ans_ids].argmax(-1)]
        else:
            pred_ids = last.argmax(-1)
        pred_ids = pred_ids.cpu()
        correct += (pred_ids == enc["answer_ids"]).tolist()
        preds += tokenizer.convert_ids_to_tokens(pred_ids.tolist())
    per_skill: dict[str, float] = {}
    for sk in D.SKILLS:
        m = [c for c, s in zip(correct, samples, strict=False) if s.skill == sk]
        if m:
            per_skill[sk] = float(np.mean(m))
    return {
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "per_skill": per_skill,
        "correct": correct,
        "predictions": preds,
    }


@torch.no_grad()
def generate_answer(model, tokenizer, samples: list[D.Sample]) -> list[str]:
    """Answers via ``model.generate(max_new_tokens=1)`` (greedy, unrestricted vocabulary)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    enc = encode(tokenizer, samples, model.config)
    out = model.generate(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        pixel_values=enc["pixel_values"].to(device=device, dtype=dtype),
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.convert_ids_to_tokens(out[:, -1].tolist())
