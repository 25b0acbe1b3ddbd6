"""The testbed's video model: a tiny stock ``LlavaOnevisionForConditionalGeneration`` built from the image testbed.

Same CLIP vision tower (96 px, 8 px patches, [CLS]; features of layer -2 with [CLS] dropped), same MLP projector,
same Llama LM and word-level tokenizer as :mod:`vtcompress.testbed.model`, plus OneVision's ``image_newline``, a
``<video>`` placeholder and embeddings for the clip words (:data:`clips.NEW_WORDS`). OneVision encodes each frame
like an image (144 patch features), pools the projected grid 2x2 bilinearly (12 x 12 -> 6 x 6 = 36 tokens per
frame) and appends one newline per video, so a clip of ``T`` frames takes ``T * 36 + 1`` ``<video>`` tokens::

    <s> you are a careful visual assistant . look at the video ... <video> x (36 T + 1) question : <q> answer :
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from . import clips as C
from . import data as D
from . import model as M

VIDEO_TOKEN = "<video>"
CLIP_WEIGHTS_DIR = Path(__file__).resolve().parent / "clip_weights"
POOLED_GRID = math.ceil(D.GRID / 2)  # 6
TOKENS_PER_FRAME = POOLED_GRID * POOLED_GRID  # 36


def video_token_count(frames: int) -> int:
    """``<video>`` placeholders of a ``frames``-frame clip: 36 pooled tokens per frame plus one newline."""
    return frames * TOKENS_PER_FRAME + 1


def clip_answer_words() -> list[str]:
    """The answer vocabulary evaluate_clips restricts the argmax to: the image testbed's answers plus directions."""
    return list(dict.fromkeys(D.ANSWER_WORDS + C.CLIP_ANSWER_WORDS))


def build_clip_tokenizer(base_tokenizer):
    """The image testbed's tokenizer (same ids) extended with the clip words and the ``<video>`` special token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = dict(sorted(base_tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("the base tokenizer's ids are not contiguous")
    for w in [*C.clip_vocabulary(), VIDEO_TOKEN]:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([*M.SPECIAL_TOKENS, VIDEO_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", model_max_length=4096)


def build_clip_config(image_config, tokenizer):
    """A ``LlavaOnevisionConfig`` with the image testbed's towers (``image_config``: its LlavaConfig)."""
    from transformers import LlamaConfig, LlavaOnevisionConfig

    text = LlamaConfig(**{k: v for k, v in image_config.text_config.to_dict().items()
                          if k not in ("architectures", "model_type", "transformers_version")})
    text.vocab_size = int(np.ceil(len(tokenizer) / 8) * 8)
    text.max_position_embeddings = 4096
    text.tie_word_embeddings = False
    cfg = LlavaOnevisionConfig(
        vision_config=image_config.vision_config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act=image_config.projector_hidden_act,
        vision_feature_select_strategy=image_config.vision_feature_select_strategy,
        vision_feature_layer=image_config.vision_feature_layer,
        image_grid_pinpoints=[[D.IMAGE_SIZE, D.IMAGE_SIZE]],
        vision_aspect_ratio="anyres_max_9",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


def clip_model_from_testbed(path: str | os.PathLike | None = None, seed: int = 0):
    """The untrained video model: the image testbed's weights in a ``LlavaOnevisionForConditionalGeneration``.

    New token embeddings start at the mean of the old rows plus noise (lm_head rows likewise); ``image_newline``
    starts at the mean input embedding. Returns (model, tokenizer)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    base, base_tok = M.load_testbed(path)
    tok = build_clip_tokenizer(base_tok)
    cfg = build_clip_config(base.config, tok)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    sd = base.state_dict()
    old_v = sd["lm_head.weight"].shape[0]
    n_old = len(base_tok)
    new_sd = model.state_dict()
    for k, v in sd.items():
        if k in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            w = new_sd[k].clone()
            rows = v[:n_old]
            w[:n_old] = rows
            gen = torch.Generator().manual_seed(seed)
            extra = w.shape[0] - n_old
            w[n_old:] = rows.mean(0) + rows.std(0) * 0.5 * torch.randn(extra, w.shape[1], generator=gen)
            new_sd[k] = w
        else:
            if new_sd[k].shape != v.shape:
                raise ValueError(f"{k}: {tuple(v.shape)} vs {tuple(new_sd[k].shape)}")
            new_sd[k] = v
    new_sd["model.image_newline"] = sd["model.language_model.embed_tokens.weight"][:n_old].mean(0).clone()
    missing = set(model.state_dict()) - set(new_sd)
    if missing:
        raise ValueError(f"missing weights {sorted(missing)}")
    model.load_state_dict(new_sd)
    del old_v
    model.eval()
    return model, tok


def load_clip_testbed(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """Load the shipped video testbed and its tokenizer (``model.eval()``); ``path`` defaults to ``clip_weights/``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return M.load_pretrained(LlavaOnevisionForConditionalGeneration, path if path is not None else CLIP_WEIGHTS_DIR,
                             device, dtype)


def build_clip_prompt(question: str, n_video_tokens: int) -> str:
    """BOS, preamble, ``n_video_tokens`` ``<video>`` placeholders, question, 'answer :'."""
    return f"<s> {C.CLIP_PREAMBLE} {' '.join([VIDEO_TOKEN] * n_video_tokens)} question : {question} answer :"


def pixel_values_from_clips(samples: list[C.ClipSample]) -> torch.Tensor:
    """uint8 clips (all of the same length T) -> CLIP-normalised float32 ``pixel_values_videos (B, T, 3, H, W)``."""
    lens = {len(s.frames) for s in samples}
    if len(lens) != 1:
        raise ValueError(f"one batch holds clips of one length; got lengths {sorted(lens)}")
    return torch.stack([M.pixel_values_from_images(s.frames) for s in samples])


def encode_clips(tokenizer, samples: list[C.ClipSample], config=None) -> dict[str, torch.Tensor]:
    """Batch clip questions OneVision style: input_ids (B, L) with ``T * 36 + 1`` ``<video>`` tokens per row, LEFT
    padded; attention_mask (B, L); pixel_values_videos (B, T, 3, 96, 96) float32; answer_ids (B,)."""
    pv = pixel_values_from_clips(samples)
    n_vid = video_token_count(pv.shape[1])
    texts = [build_clip_prompt(s.question, n_vid) for s in samples]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False, padding_side="left")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values_videos": pv,
        "answer_ids": torch.tensor(tokenizer.convert_tokens_to_ids([s.answer for s in samples]), dtype=torch.long),
    }


@torch.no_grad()
def evaluate_clips(model, tokenizer, samples: list[C.ClipSample], batch_size: int = 16,
                   restrict_to_answers: bool = True) -> dict:
    """Accuracy on clip questions, like :func:`vtcompress.testbed.model.evaluate`: one
    ``model(input_ids=..., attention_mask=..., pixel_values_videos=...)`` call per batch (so a compression context
    may shorten the video tokens inside), prediction = argmax of the last position's logits over the answer words.

    Clips of different lengths are batched separately. Returns dict(accuracy, per_skill, n, correct, predictions).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ans_ids = torch.tensor(tokenizer.convert_tokens_to_ids(clip_answer_words()), device=device)
    correct: list[bool | None] = [None] * len(samples)
    preds: list[str | None] = [None] * len(samples)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_len.setdefault(len(s.frames), []).append(i)
    for idx in by_len.values():
        for j in range(0, len(idx), batch_size):
            part = idx[j:j + batch_size]
            enc = encode_clips(tokenizer, [samples[i] for i in part], model.config)
            out = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                        pixel_values_videos=enc["pixel_values_videos"].to(device=device, dtype=dtype))
            last = out.logits[:, -1, :].float()
            pred = ans_ids[last[:, ans_ids].argmax(-1)] if restrict_to_answers else last.argmax(-1)
            pred = pred.cpu()
            for k, i in enumerate(part):
                correct[i] = bool(pred[k] == enc["answer_ids"][k])
                preds[i] = tokenizer.convert_ids_to_tokens(int(pred[k]))
    per_skill: dict[str, float] = {}
    for sk in C.CLIP_SKILLS:
        m = [c for c, s in zip(correct, samples, strict=True) if s.skill == sk]
        if m:
            per_skill[sk] = float(np.mean(m))
    return {"accuracy": float(np.mean(correct)) if correct else float("nan"), "per_skill": per_skill,
            "n": len(samples), "correct": correct, "predictions": preds}
