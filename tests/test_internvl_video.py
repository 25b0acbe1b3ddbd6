"""InternVL videos under temporal methods: ``InternVLProcessor`` gives a video's frames to the model as one-tile
images after frame prompts (``Frame1: <img>...</img>\\nFrame2: <img>...``, written here by the processor's own
``replace_video_token``); with ``apply(..., processor=)`` the frames of each video go through the methods as one
clip, the other images through the spatial ones.

The tokenizer is a character-level one whose ids match the tiny InternVL (``<IMG_CONTEXT>`` = 120, ``<img>`` =
122, ``</img>`` = 123): the prompts are text, tokenized and decoded for real.
"""

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import InternVLProcessor, PreTrainedTokenizerFast

import vtcompress
from family_checks import _hook_count
from models_util import tiny_internvl
from test_video import GEN
from vtcompress import VisualTokens
from vtcompress.models.registry import adapter_for

torch.set_num_threads(1)
GEN = dict(GEN, min_new_tokens=GEN["max_new_tokens"])
TEMPORAL = vtcompress.list_methods(family="temporal")
TOKENS_PER_TILE = 4  # 16 px tiles of 4 x 4 patches, pixel-shuffled to 2 x 2
MARKS = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                        image_seq_length=TOKENS_PER_TILE)


def _tokenizer() -> PreTrainedTokenizerFast:
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:.,?!-' \n"
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    vocab.update({"<IMG_CONTEXT>": 120, "<video>": 121, "<img>": 122, "</img>": 123})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", padding_side="left",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


TOK = _tokenizer()


def video(frames: int) -> str:
    """The processor's prompt for a video of ``frames`` frames (``InternVLProcessor.replace_video_token``)."""
    return InternVLProcessor.replace_video_token(MARKS, {"pixel_values_videos": [torch.zeros(frames, 3, 16, 16)]},
                                                 0)


def image(tiles: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>"


def sample(parts: list, seed: int) -> tuple[str, int]:
    """A prompt of text pieces and ``("video", T)`` / ``("image", tiles)``; returns it and its tile rows."""
    text, rows = "", 0
    for p in parts:
        if isinstance(p, str):
            text += p
        else:
            kind, n = p
            text += video(n) if kind == "video" else image(n)
            rows += n
    return text, rows


SAMPLES = [
    ["look ", ("video", 4), " and ", ("image", 2), " ok?"],
    [("image", 1), " what"],
    ["hm ", ("video", 6), " x"],
    ["just text here"],
    # a multi-tile image after "Frame1:" is an image; a frame prompt that skips a number ends the video (and
    # starts none: its image is an image)
    ["Frame1: ", ("image", 2), " then Frame1: ", ("image", 1), "\nFrame3: ", ("image", 1)],
]
CLIPS = [[0, 1, 2, 3], [6, 7, 8, 9, 10, 11], [13]]  # image indices (placeholder order) of each video


def batch(samples: list[list], seed: int = 0) -> dict:
    texts, rows = zip(*(sample(s, seed) for s in samples), strict=True)
    enc = TOK(list(texts), padding=True, return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if sum(rows):
        gen = torch.Generator().manual_seed(seed)
        out["pixel_values"] = torch.randn(sum(rows), 3, 16, 16, generator=gen)
    return out


def one_by_one(samples: list[list], seed: int = 0) -> list[dict]:
    """The samples of :func:`batch` alone (each with its own rows of the batch's pixel values)."""
    full = batch(samples, seed)
    out, r = [], 0
    for s in samples:
        one = batch([s], seed)
        n = sample(s, seed)[1]
        if n:
            one["pixel_values"] = full["pixel_values"][r : r + n]
        r += n
        out.append(one)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()[0]


def test_the_frame_prompts_give_the_videos(model):
    assert adapter_for(model).image_clips(model, batch(SAMPLES), TOK) == CLIPS
    assert adapter_for(model).image_clips(model, batch(SAMPLES), SimpleNamespace(tokenizer=TOK)) == CLIPS


def test_full_budget_is_the_stock_model(model):
    inputs = batch(SAMPLES)
    with torch.no_grad():
        ref, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        for name in TEMPORAL:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0), processor=TOK):
                assert torch.equal(model(**inputs).logits, ref), name
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids), name


def test_the_clip_gets_what_the_method_gives_its_frames(model):
    """Sample 0: the 4 frames are one clip of the model's own frame features; the 2-tile image passes the temporal
    method; each frame keeps the clip's tokens whose slot is in it."""
    inputs = batch(SAMPLES[:1])
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    clip = VisualTokens.from_features(feats[:4].reshape(1, 4 * TOKENS_PER_TILE, -1), (2, 2), frames=4)
    for name in TEMPORAL:
        method = vtcompress.get(name, budget=0.5)
        res = vtcompress.compress_inputs(model, method, processor=TOK, **inputs)
        alone = method(clip).sort_by_pos()
        got = res.tokens_of(0)
        assert got.frames == 4 and torch.equal(got.pos, alone.pos), name
        torch.testing.assert_close(got.x, alone.x, rtol=0, atol=0)
        per_frame = torch.bincount(alone.pos[0] // TOKENS_PER_TILE, minlength=4).tolist()
        assert res.num_tokens.tolist() == [[4, k] for k in per_frame] + [[8, 8]], name
        assert int((res.inputs["input_ids"] == 120).sum()) == sum(per_frame) + 8
        # the LLM receives the clip's features, frame after frame, then the image's own
        emb = res.inputs["mm_encoder_outputs"]["image"].pooler_output[:, 0]
        torch.testing.assert_close(emb[: sum(per_frame)], alone.x[0], rtol=0, atol=0)
        torch.testing.assert_close(emb[sum(per_frame):], feats[4:].reshape(8, -1), rtol=0, atol=0)


@pytest.mark.parametrize("name", TEMPORAL + ["avg_pool+evs"])
def test_mixed_batch_equals_one_by_one_and_cached_equals_uncached(model, name):
    """Videos, images and text in one left-padded batch; the last case pools every frame and image first."""
    method = ([vtcompress.get("avg_pool", budget=0.25), vtcompress.get("evs", budget=0.5)] if "+" in name
              else vtcompress.get(name, budget=0.5))
    with torch.no_grad(), vtcompress.apply(model, method, processor=TOK):
        got = model.generate(**batch(SAMPLES), **GEN)
        assert torch.equal(got, model.generate(**batch(SAMPLES), **GEN, use_cache=False))
        alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in one_by_one(SAMPLES)]
    for b, ids in enumerate(alone):
        assert torch.equal(got[b, -GEN["max_new_tokens"]:], ids), (name, b)


def test_vision_signals_reach_the_frames(model):
    """EVS at 1.0 (the clip path) then FasterVLM on every frame of the clip keeps what FasterVLM keeps of the same
    frames given as images ([CLS] attention of each frame's own tower pass); FastVID reading that attention: a
    batch equals one by one."""
    inputs = batch(SAMPLES[:1])
    fv = vtcompress.get("fastervlm", budget=0.5)
    clip = vtcompress.compress_inputs(model, [vtcompress.get("evs", budget=1.0), fv], processor=TOK, **inputs)
    frames = vtcompress.compress_inputs(model, fv, **inputs)
    assert clip.tokens_of(0).frames == 4
    assert torch.equal(clip.keep, frames.keep) and clip.num_tokens.tolist() == frames.num_tokens.tolist()
    fastvid = vtcompress.get("fastvid", budget=0.5, saliency="cls_attn")
    one = [vtcompress.compress_inputs(model, fastvid, processor=TOK, **s) for s in one_by_one(SAMPLES)]
    res = vtcompress.compress_inputs(model, fastvid, processor=TOK, **batch(SAMPLES))
    assert res.num_tokens.tolist() == [c for r in one if r.num_tokens is not None for c in r.num_tokens.tolist()]


def test_a_temporal_method_needs_the_processor(model):
    inputs = batch(SAMPLES[:2])
    with pytest.raises(ValueError, match="processor="), vtcompress.apply(model, "evs"):
        model(**inputs)
    with pytest.raises(ValueError, match="no tokenizer with decode"):
        vtcompress.compress_inputs(model, "evs", processor=object(), **inputs)
    # spatial methods compress the frames as the images they are, without it
    res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=0.5), **inputs)
    assert res.num_tokens[:, 1].tolist() == [2, 2, 2, 2, 4, 2]


def test_restoration(model):
    inputs = batch(SAMPLES[:3])
    hooks = _hook_count(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, **GEN)
        with vtcompress.apply(model, vtcompress.get("holitom", budget=0.25), processor=TOK) as handle:
            assert model.generate(**inputs, **GEN).shape == ref_ids.shape
            assert int(handle.last.keep.sum()) < handle.last.keep.numel()
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
    assert _hook_count(model) == hooks


def test_an_encoder_stage_method_beside_a_temporal_one_is_refused(model):
    """The frames of a video go through the projector stage as one clip: an encoder-stage method (it acts inside
    each frame's tower pass, before there is a clip) beside a temporal method is refused by name."""
    with pytest.raises(ValueError, match=r"got encoder-stage \['folder'\]"):
        vtcompress.compress_inputs(model, [vtcompress.get("folder", budget=0.5), vtcompress.get("evs", budget=0.5)],
                                   processor=TOK, **batch(SAMPLES[:1]))
