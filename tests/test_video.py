"""Videos through the projector stage (Qwen2-VL / Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video): spatial
methods act frame by frame.

A video of ``video_grid_thw`` ``(t, h, w)`` reaches the LLM as ``t`` frames of ``(h/2, w/2)`` merged tokens; each
frame is one view of the clip, so a float budget keeps that fraction of every frame and an int budget is tokens
per clip, split evenly over its frames (the earliest frames take the remainder). Kept tokens keep their stock
M-RoPE positions (Qwen2.5-VL's ``second_per_grid_ts`` included).
"""

import pytest
import torch

import vtcompress
from models_util import IMAGE, PAD, tiny_qwen2_5_vl, tiny_qwen2_vl
from vtcompress import VisualTokens
from vtcompress.models.sequence import full_positions

torch.set_num_threads(1)
VIDEO, START, END = 121, 122, 123
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
#: spatial methods that read the features alone (the signal-reading ones are refused for videos)
METHODS = ["random", "uniform", "divprune", "tome", "avg_pool", "max_pool", "bilinear"]
BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return BUILDERS[request.param]()[0]


def _sample(model, items, text: int, seed: int) -> dict:
    """One unpadded sample: ``text`` tokens, then each ``("image" | "video", (t, h, w))`` between vision
    start / end tokens, then 3 more tokens."""
    cfg = model.config.vision_config
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE, (text,), generator=gen).tolist()
    out: dict = {}
    for kind, thw in items:
        token = IMAGE if kind == "image" else VIDEO
        ids += [START] + [token] * (thw[0] * thw[1] * thw[2] // 4) + [END]
        key, grid = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos",
                                                                                  "video_grid_thw")
        # one row per patch of the (t, h, w) grid; a row holds temporal_patch_size frames of a patch (dim)
        pix = torch.randn(thw[0] * thw[1] * thw[2], dim, generator=gen)
        out[key] = torch.cat([out[key], pix]) if key in out else pix
        out[grid] = torch.cat([out.get(grid, torch.zeros(0, 3, dtype=torch.long)), torch.tensor([list(thw)])])
        if kind == "video" and "qwen2_5" in type(model).__name__.lower():
            out["second_per_grid_ts"] = torch.cat([out.get("second_per_grid_ts", torch.zeros(0)),
                                                   torch.tensor([2.0])])
    ids += torch.randint(3, IMAGE, (3,), generator=gen).tolist()
    types = [1 if t == IMAGE else 2 if t == VIDEO else 0 for t in ids]
    out.update(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
               mm_token_type_ids=torch.tensor([types]))
    return out


def _batch(samples: list[dict]) -> dict:
    """Left-pad the samples into one batch (visual inputs concatenated in sample order)."""
    length = max(s["input_ids"].shape[1] for s in samples)
    out = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = torch.stack([torch.nn.functional.pad(s[key][0], (length - s[key].shape[1], 0), value=0)
                                for s in samples])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [s[key] for s in samples if key in s]
        if parts:
            out[key] = torch.cat(parts)
    return out


VIDEO_THW = (3, 4, 4)  # 3 frames (after the temporal merge) of 2 x 2 merged tokens


def test_full_budget_is_the_stock_model_for_every_method(model):
    inputs = _batch([_sample(model, [("video", VIDEO_THW), ("image", (1, 4, 6))], 4, 0),
                     _sample(model, [("image", (1, 4, 4))], 7, 1)])
    with torch.no_grad():
        ref, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        for name in METHODS:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref), name
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids), name


@pytest.mark.parametrize("name", ["divprune", "tome", "avg_pool"])
def test_mixed_batch_equals_one_by_one_and_cached_equals_uncached(model, name):
    """Sample 0 a video, sample 1 an image, sample 2 text only; left-padded, three prompt lengths."""
    samples = [_sample(model, [("video", VIDEO_THW)], 3, 0), _sample(model, [("image", (1, 4, 4))], 6, 1),
               _sample(model, [], 9, 2)]
    method = vtcompress.get(name, budget=0.5)
    with torch.no_grad(), vtcompress.apply(model, method):
        batch_ids = model.generate(**_batch(samples), **GEN)
        uncached = model.generate(**_batch(samples), **GEN, use_cache=False)
        alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in samples]
    assert torch.equal(batch_ids, uncached)
    for b, ids in enumerate(alone):
        assert torch.equal(batch_ids[b, -GEN["max_new_tokens"]:], ids), b


def test_kept_counts_per_frame_and_per_clip(model):
    inputs = _sample(model, [("video", VIDEO_THW)], 4, 0)  # 3 frames of 4 tokens
    res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=0.5), **inputs)
    assert res.video_num_tokens.tolist() == [[12, 6]]
    assert [int(t.counts[0]) for t in res.video_tokens[0]] == [2, 2, 2]
    res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=5), **inputs)
    assert res.video_num_tokens.tolist() == [[12, 5]]
    assert [int(t.counts[0]) for t in res.video_tokens[0]] == [2, 2, 1]
    assert int((res.inputs["input_ids"] == VIDEO).sum()) == 5
    assert res.tokens == [] and res.num_tokens.shape == (0, 2)  # no image in this call


def test_each_frame_is_compressed_as_an_image_of_its_grid(model):
    """A frame's survivors are the method run on that frame's features alone (the frames go through as a batch
    of views)."""
    inputs = _sample(model, [("video", VIDEO_THW)], 4, 0)
    method = vtcompress.get("divprune", budget=0.5)
    res = vtcompress.compress_inputs(model, method, **inputs)
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                               return_dict=True).pooler_output[0]
    for f, frame in enumerate(feats.reshape(VIDEO_THW[0], 4, -1)):
        alone = method(VisualTokens.from_features(frame[None], (2, 2))).sort_by_pos()
        got = res.video_tokens[0][f]
        assert torch.equal(got.pos[got.mask], alone.pos[alone.mask]), f
        torch.testing.assert_close(got.x[got.mask], alone.x[alone.mask], rtol=0, atol=0)


def test_kept_tokens_keep_their_stock_positions(model):
    inputs = _batch([_sample(model, [("video", VIDEO_THW), ("image", (1, 4, 4))], 4, 0),
                     _sample(model, [("video", (2, 4, 4))], 8, 1)])
    res = vtcompress.compress_inputs(model, vtcompress.get("random", budget=0.5), **inputs)
    desc = vtcompress.models.adapter_for(model)
    full = full_positions(model, desc, inputs, inputs["input_ids"], inputs["attention_mask"], "original", False)
    got = res.inputs["position_ids"][-3:]
    for b in range(2):
        kept = res.keep[b] & inputs["attention_mask"][b].bool()
        real = res.inputs["attention_mask"][b].bool()
        assert torch.equal(got[:, b, real], full[:, b, kept]), b


@pytest.mark.parametrize("name", ["fastervlm", "visionzip", "prumerge"])
def test_signal_methods_compress_each_frame_as_the_same_frame_given_as_an_image(model, name):
    """Vision signals are captured for video frames (Qwen2-VL / Qwen2.5-VL: a temporal slot is one block of the
    tower, as an image is): each frame keeps exactly what the same slot's patches keep as an image of their grid."""
    t, h, w = VIDEO_THW
    video = _sample(model, [("video", VIDEO_THW)], 4, 0)
    images = _sample(model, [("image", (1, h, w))] * t, 4, 0)
    images["pixel_values"] = video["pixel_values_videos"].clone()
    method = vtcompress.get(name, budget=0.5)
    got = vtcompress.compress_inputs(model, method, **video)
    want = vtcompress.compress_inputs(model, method, **images)
    assert got.video_num_tokens[0, 1] == want.num_tokens[:, 1].sum() < 12
    for f in range(t):
        assert torch.equal(got.video_tokens[0][f].pos, want.tokens[f][0].pos), f
        assert torch.equal(got.video_tokens[0][f].x, want.tokens[f][0].x), f


def test_restoration_after_video_compression(model):
    inputs = _sample(model, [("video", VIDEO_THW)], 4, 0)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtcompress.apply(model, vtcompress.get("divprune", budget=0.25)):
            squeezed = model(**inputs).logits
        after = model(**inputs).logits
    assert squeezed.shape[1] < ref.shape[1]
    assert torch.equal(after, ref)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_fastv_composed_with_a_projector_method_on_videos(model):
    samples = [_sample(model, [("video", VIDEO_THW)], 3, 0), _sample(model, [("image", (1, 4, 4))], 6, 1)]
    methods = [vtcompress.get("divprune", budget=0.5), vtcompress.get("fastv", budget=0.5, layer=1)]
    with torch.no_grad(), vtcompress.apply(model, methods):
        batch_ids = model.generate(**_batch(samples), **GEN)
        alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in samples]
    for b, ids in enumerate(alone):
        assert torch.equal(batch_ids[b, -GEN["max_new_tokens"]:], ids), b


def qwen3_sample(model, items, text: int, seed: int) -> dict:
    """A Qwen3-VL sample: as :func:`_sample`, but a video is one vision block per frame, each after a timestamp
    token (Qwen3-VL's prompts; its M-RoPE splits ``video_grid_thw`` per frame)."""
    cfg = model.config.vision_config
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE, (text,), generator=gen).tolist()
    out: dict = {}
    for kind, (t, h, w) in items:
        if kind == "image":
            ids += [START] + [IMAGE] * (h * w // 4) + [END]
            key, grid = "pixel_values", "image_grid_thw"
        else:
            for _ in range(t):
                ids += [int(torch.randint(3, IMAGE, (1,), generator=gen))] + [START] + [VIDEO] * (h * w // 4) + [END]
            key, grid = "pixel_values_videos", "video_grid_thw"
        pix = torch.randn(t * h * w, dim, generator=gen)
        out[key] = torch.cat([out[key], pix]) if key in out else pix
        out[grid] = torch.cat([out.get(grid, torch.zeros(0, 3, dtype=torch.long)), torch.tensor([[t, h, w]])])
    ids += torch.randint(3, IMAGE, (3,), generator=gen).tolist()
    types = [1 if x == IMAGE else 2 if x == VIDEO else 0 for x in ids]
    out.update(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
               mm_token_type_ids=torch.tensor([types]))
    return out


def qwen3_holes_reference(model, inputs, keep):
    """The stock Qwen3-VL on the FULL sequence with the dropped placeholders hidden from attention and the
    full-sequence M-RoPE positions: what a selection at the projector stage must give every kept token (each
    kept video token with its own DeepStack levels)."""
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs.get("image_grid_thw"),
                                        video_grid_thw=inputs.get("video_grid_thw"),
                                        attention_mask=inputs["attention_mask"])
    hidden = inputs["attention_mask"] * keep.long()
    with torch.no_grad():
        return model(**(inputs | {"attention_mask": hidden, "position_ids": pos})).logits


def assert_matches_stock_with_holes(model, inputs, res) -> None:
    """Every kept real token of the compressed run (``res`` from ``compress_inputs``) has the logits of
    :func:`qwen3_holes_reference` at its original column."""
    with torch.no_grad():
        out = model(**res.inputs).logits
    want = qwen3_holes_reference(model, inputs, res.keep)
    for r in range(inputs["input_ids"].shape[0]):
        kept = (res.keep[r] & inputs["attention_mask"][r].bool()).nonzero().squeeze(1)
        real = res.inputs["attention_mask"][r].bool().nonzero().squeeze(1)
        torch.testing.assert_close(out[r, real], want[r, kept], rtol=1e-5, atol=1e-5)


def assert_full_budget_is_stock(model, inputs, names) -> None:
    """Each method of ``names`` at budget 1.0: the stock logits and greedy ids, bit for bit."""
    with torch.no_grad():
        ref, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        for name in names:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref), name
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids), name


def next_video_sample(frames: int, seed: int = 0) -> dict:
    """A LLaVA-NeXT-Video sample: a video of ``frames`` 16 px frames (4 x 4 patches pooled to 2 x 2 by the model's
    vision_resampler) between a few text tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = [5, 6, 7] + [VIDEO] * (frames * 4) + [8, 9]
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pixel_values_videos=torch.randn(1, frames, 3, 16, 16, generator=gen))


def test_qwen3_vl_videos_frame_by_frame_with_their_deepstack_levels():
    """Qwen3-VL: the videos' DeepStack levels follow the kept tokens as the images' do. A selection per frame gives
    every kept token the stock model's logits with the dropped tokens hidden; budget 1.0 is the stock model; a
    mixed batch equals one by one."""
    from models_util import tiny_qwen3_vl

    model = tiny_qwen3_vl()[0]
    samples = [qwen3_sample(model, [("video", (3, 4, 4)), ("image", (1, 4, 4))], 4, 0),
               qwen3_sample(model, [("image", (1, 4, 6))], 6, 1), qwen3_sample(model, [("video", (2, 4, 4))], 2, 2)]
    inputs = _batch(samples)
    with torch.no_grad():
        ref = model(**inputs).logits
        for name in METHODS:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref), name
        res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=0.5), **inputs)
        assert res.video_num_tokens.tolist() == [[12, 6], [8, 4]]
    assert_matches_stock_with_holes(model, inputs, res)
    gen = dict(GEN, min_new_tokens=GEN["max_new_tokens"])  # no early end of sequence: the last columns compare
    with torch.no_grad(), vtcompress.apply(model, vtcompress.get("tome", budget=0.5)):
        batch_ids = model.generate(**inputs, **gen)
        assert torch.equal(batch_ids, model.generate(**inputs, **gen, use_cache=False))
        alone = [model.generate(**s, **gen)[0, -gen["max_new_tokens"]:] for s in samples]
    for b, ids in enumerate(alone):
        assert torch.equal(batch_ids[b, -gen["max_new_tokens"]:], ids), b


# ------------------------------------------------------------------------------------------- LLaVA-OneVision
def _ov_video(frames: int, text: int, seed: int) -> dict:
    """One OneVision sample with a video of ``frames`` 16 px frames: 4 x 4 patches pooled 2 x 2 per frame by the
    model, plus the video's newline."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE, (text,), generator=gen).tolist() + [VIDEO] * (frames * 4 + 1) + [8, 9, 10]
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pixel_values_videos=torch.randn(1, frames, 3, 16, 16, generator=gen))


@pytest.fixture(scope="module")
def onevision():
    from models_util import tiny_onevision

    return tiny_onevision()


def test_onevision_full_budget_and_kept_counts(onevision):
    model, _ = onevision
    inputs = _ov_video(3, 4, 0)
    with torch.no_grad():
        ref, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        for name in METHODS:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref), name
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids), name
    res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=0.5), **inputs)
    assert res.video_num_tokens.tolist() == [[13, 7]]  # 2 of 4 per frame, and the newline
    assert [int(t.counts[0]) for t in res.video_tokens[0]] == [2, 2, 2]
    res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=4), **inputs)
    assert res.video_num_tokens.tolist() == [[13, 5]]  # 4 tokens for the clip (2, 1, 1) and the newline


def test_onevision_video_batch_equals_one_by_one(onevision):
    """Sample 0 a video of 3 frames, sample 1 text only; left-padded, different prompt lengths."""
    model, _ = onevision
    video, text = _ov_video(3, 3, 0), _ov_video(1, 8, 1)
    text = {k: text[k][:, :8] for k in ("input_ids", "attention_mask")}
    length = video["input_ids"].shape[1]
    batch = {k: torch.cat([video[k], torch.nn.functional.pad(text[k], (length - 8, 0))])
             for k in ("input_ids", "attention_mask")}
    batch["pixel_values_videos"] = video["pixel_values_videos"]
    with torch.no_grad(), vtcompress.apply(model, vtcompress.get("tome", budget=0.5)):
        got = model.generate(**batch, **GEN)
        alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in (video, text)]
        assert torch.equal(got, model.generate(**batch, **GEN, use_cache=False))
    for b, ids in enumerate(alone):
        assert torch.equal(got[b, -GEN["max_new_tokens"]:], ids), b


def test_summary_counts_videos(model):
    inputs = _batch([_sample(model, [("video", VIDEO_THW), ("image", (1, 4, 4))], 4, 0),
                     _sample(model, [], 8, 1)])
    with torch.no_grad(), vtcompress.apply(model, vtcompress.get("divprune", budget=0.5)) as handle:
        model(**inputs)
    got = handle.summary()
    per = {s.per: s for s in got.stages}
    assert per["image"].tokens_in == (4,) and per["image"].tokens_out == (2,)
    assert per["video"].tokens_in == (12,) and per["video"].tokens_out == (6,)
    assert got.visual_full == (16, 0) and got.visual_kept == (8, 0)
    assert "12 -> 6 video tokens" in str(got)


# ------------------------------------------------------------------------------------------- LLaVA-NeXT-Video
def test_llava_next_video_clips(onevision):
    """Frames pooled 4x4 -> 2x2 by the model's vision_resampler, one view each: budget 1.0 is the stock model for
    every feature-only method, counts per frame / per clip, and a video + text batch equals one by one."""
    from models_util import tiny_llava_next_video

    model, _ = tiny_llava_next_video()
    video = next_video_sample(3)  # 3 frames of 2 x 2 pooled tokens
    assert_full_budget_is_stock(model, video, METHODS)
    res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=0.5), **video)
    assert res.video_num_tokens.tolist() == [[12, 6]]
    res = vtcompress.compress_inputs(model, vtcompress.get("divprune", budget=4), **video)
    assert [int(t.counts[0]) for t in res.video_tokens[0]] == [2, 1, 1]
    text = dict(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), attention_mask=torch.ones(1, 5, dtype=torch.long))
    batch = {k: torch.cat([video[k], torch.nn.functional.pad(text[k], (video["input_ids"].shape[1] - 5, 0))])
             for k in ("input_ids", "attention_mask")}
    batch["pixel_values_videos"] = video["pixel_values_videos"]
    with torch.no_grad(), vtcompress.apply(model, vtcompress.get("tome", budget=0.5)):
        got = model.generate(**batch, **GEN)
        alone = [model.generate(**video, **GEN), model.generate(**text, **GEN)]
    for b, one in enumerate(alone):
        assert torch.equal(got[b, -GEN["max_new_tokens"]:], one[0, -GEN["max_new_tokens"]:]), b


def test_videos_pass_signal_methods_untouched_where_frames_carry_no_signal(onevision, monkeypatch):
    """A family whose video frames carry no captured signal (``video_signals`` off, as a third-party description
    may have it): under FasterVLM its videos pass through as the stock model encodes them (no video stage in the
    result), never compressed with a missing signal."""
    from vtcompress.models.registry import adapter_for

    model, _ = onevision
    monkeypatch.setattr(adapter_for(model), "video_signals", False)
    inputs = _ov_video(3, 4, 0)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtcompress.apply(model, vtcompress.get("fastervlm", budget=0.5)):
            assert torch.equal(model(**inputs).logits, ref)
    res = vtcompress.compress_inputs(model, vtcompress.get("fastervlm", budget=0.5), **inputs)
    assert res.video_tokens == [] and torch.equal(res.inputs["input_ids"], inputs["input_ids"])


@pytest.mark.parametrize("family", ["onevision", "llava_next_video"])
def test_signal_methods_on_pooled_video_frames(family):
    """OneVision / LLaVA-NeXT-Video: the attention signal of each frame's tower pass, pooled as the model pools the
    frame (OneVision's bilinear ``apply_pooling``, NeXT-Video's stride windows), picks FasterVLM's tokens in each
    frame; reference: the eager attentions of the tower (SigLIP: mean attention received; CLIP: the [CLS] row).
    Two videos in one batch equal each alone."""
    from models_util import tiny_llava_next_video, tiny_onevision
    from vtcompress.models.pipeline import _signal_layer
    from vtcompress.models.registry import adapter_for

    model = (tiny_onevision if family == "onevision" else tiny_llava_next_video)(attn="eager")[0]
    samples = [_ov_video(3, 4, s) if family == "onevision" else next_video_sample(3, s) for s in (0, 1)]
    method = vtcompress.get("fastervlm", budget=0.5)
    desc = adapter_for(model)
    layer, _ = _signal_layer([method], len(desc.vision_layers(model)), desc.feature_layer(model))
    for inputs in samples:
        res = vtcompress.compress_inputs(model, method, **inputs)
        with torch.no_grad():
            att = model.model.vision_tower(inputs["pixel_values_videos"].flatten(0, 1),
                                           output_attentions=True).attentions[layer]  # [T, heads, L, L]
        if family == "onevision":  # no [CLS]: the mean attention each patch receives, then the model's pooling
            sig = model.model.apply_pooling(att.mean(2).mean(1)[..., None])[..., 0]
        else:  # the [CLS] row, then the 2 x 2 windows of the pooled grid
            sig = torch.nn.functional.avg_pool2d(att[:, :, 0, 1:].mean(1).reshape(-1, 1, 4, 4), 2)[:, 0].flatten(1)
        expected = sig.topk(2, dim=-1).indices.sort(-1).values
        got = torch.stack([t.pos[0].sort().values for t in res.video_tokens[0]])
        assert torch.equal(got, expected), family
    length = max(s["input_ids"].shape[1] for s in samples)
    batch = {k: torch.cat([torch.nn.functional.pad(s[k], (length - s[k].shape[1], 0)) for s in samples])
             for k in ("input_ids", "attention_mask")}
    batch["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in samples])
    one = [vtcompress.compress_inputs(model, method, **s) for s in samples]
    res = vtcompress.compress_inputs(model, method, **batch)
    for v, r in enumerate(one):
        for a, b in zip(res.video_tokens[v], r.video_tokens[0], strict=True):
            assert torch.equal(a.pos, b.pos), (family, v)
