"""Temporal methods on clips (:mod:`vtcompress.methods.temporal`): the time axis of :class:`VisualTokens`, spatial
methods frame by frame on a clip, and every temporal method through the projector stage of the stock video
families (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video).

Under a temporal method a video is ONE clip (``frames = T``): budgets count per clip (an int: tokens of the clip;
a float: the fraction of its tokens), images (no time axis) pass the temporal method untouched, and the kept tokens
keep their stock positions (M-RoPE: their frame's temporal index).
"""

import dataclasses

import pytest
import torch

import vtcompress
from methods_util import check_invariants
from models_util import tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl
from test_video import (
    GEN,
    VIDEO,
    _batch,
    _ov_video,
    _sample,
    assert_full_budget_is_stock,
    assert_matches_stock_with_holes,
    next_video_sample,
    qwen3_sample,
)
from vtcompress import VisualTokens
from vtcompress.methods.temporal import EVS
from vtcompress.models.sequence import full_positions

torch.set_num_threads(1)
GEN = dict(GEN, min_new_tokens=GEN["max_new_tokens"])  # no early end of sequence: the last columns compare
TEMPORAL = vtcompress.list_methods(family="temporal")
BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}
CLIP = (4, 4, 4)  # 4 frames (after the temporal merge) of 2 x 2 merged tokens


def _clip(b=2, t=4, grid=(3, 3), d=8, seed=0, moving=2):
    """Clips over a static background: each frame repeats the background plus small noise, and ``moving`` tokens
    per frame are replaced by new content (something temporal to find)."""
    g = torch.Generator().manual_seed(seed)
    hw = grid[0] * grid[1]
    x = torch.randn(b, 1, hw, d, generator=g).expand(b, t, hw, d) + 0.01 * torch.randn(b, t, hw, d, generator=g)
    x = x.clone()
    for f in range(1, t):
        idx = torch.randint(0, hw, (b, moving), generator=g)
        x[torch.arange(b)[:, None], f, idx] = torch.randn(b, moving, d, generator=g)
    return VisualTokens.from_features(x.reshape(b, t * hw, d), grid, frames=t)


# ------------------------------------------------------------------------------------------- the time axis
def test_split_and_join_frames_round_trip():
    clip = _clip(b=3, t=5, grid=(2, 3))
    frames = clip.split_frames()
    assert frames.batch_size == 15 and frames.frames == 1 and frames.layout == (2, 3)
    assert torch.equal(frames.x.reshape(3, 30, -1), clip.x)
    back = VisualTokens.join_frames(frames, 5)
    for f in ("x", "mask", "pos", "size", "assign"):
        assert torch.equal(getattr(back, f), getattr(clip, f)), f
    assert back.layout == clip.layout and back.frames == 5
    pruned = EVS(budget=0.5)(clip)  # ragged frames: each keeps its own count
    again = VisualTokens.join_frames(pruned.split_frames(), 5)
    for f in ("x", "mask", "pos", "size", "assign"):
        assert torch.equal(getattr(again, f), getattr(pruned, f)), f
    again.validate()


def test_a_spatial_method_on_a_clip_acts_frame_by_frame():
    clip = _clip(b=2, t=3, grid=(3, 3))
    for name, budget in (("divprune", 0.5), ("divprune", 7), ("tome", 4), ("avg_pool", 0.25), ("uniform", 0.34)):
        method = vtcompress.get(name, budget=budget)
        got = method(clip)
        got.validate()
        assert got.frames == 3
        per = [budget // 3 + (f < budget % 3) for f in range(3)] if isinstance(budget, int) else [budget] * 3
        for b in range(2):
            for f in range(3):
                frame = VisualTokens.from_features(clip.x[b : b + 1, f * 9 : (f + 1) * 9], (3, 3))
                alone = dataclasses.replace(method, budget=per[f])(frame).sort_by_pos()
                mine = got.row(b)
                sel = mine.frame_of()[0] == f
                assert torch.equal(mine.pos[0, sel] - 9 * f, alone.pos[0]), (name, b, f)
                torch.testing.assert_close(mine.x[0, sel], alone.x[0], rtol=0, atol=0)
        if isinstance(budget, int):
            assert got.counts.tolist() == [budget] * 2


def test_spatial_after_temporal_merging_across_frames_is_refused():
    clip = _clip(b=1, t=2, grid=(2, 2))
    # merge patch 0 of frame 1 into the token of patch 0 of frame 0
    dest = torch.arange(8)[None].clone()
    dest[0, 4:] -= 1
    dest[0, 4] = 0
    merged = clip.merge(dest, torch.tensor([[0, 1, 2, 3, 5, 6, 7]]))
    with pytest.raises(ValueError, match="run it before the temporal method"):
        vtcompress.get("divprune", budget=0.5)(merged)


def test_clip_budget_below_one_token_per_frame_is_refused():
    with pytest.raises(ValueError, match="below one token per frame"):
        vtcompress.get("divprune", budget=2)(_clip(t=3))


# ------------------------------------------------------------------------------------------- EVS on tokens
def test_evs_keeps_the_first_frame_and_the_budget():
    clip = _clip(b=2, t=4, grid=(3, 3), moving=2)
    out = EVS(budget=0.5)(clip)
    check_invariants(clip, out)
    assert out.counts.tolist() == [max(9, int(36 * 0.5))] * 2
    assert bool((out.frame_of()[:, :9] == 0).all())  # the whole first frame, first
    assert EVS(budget=3)(clip).counts.tolist() == [9, 9]  # never below one frame
    assert EVS(budget=20)(clip).counts.tolist() == [20, 20]
    full = EVS(budget=1.0)(clip)
    assert torch.equal(full.x, clip.x) and torch.equal(full.assign, clip.assign)


def test_evs_batch_equals_one_by_one():
    clip = _clip(b=3, t=4, grid=(3, 5), moving=3, seed=2)
    out = EVS(budget=0.3)(clip)
    for b in range(3):
        alone = EVS(budget=0.3)(clip.row(b))
        assert torch.equal(out.row(b).pos, alone.pos) and torch.equal(out.row(b).x, alone.x)


def test_evs_needs_the_full_grid_of_every_frame():
    pruned = vtcompress.get("random", budget=0.5)(_clip(t=3))
    with pytest.raises(ValueError, match="full grid"):
        EVS(budget=0.5)(pruned)
    pooled = vtcompress.get("avg_pool", budget=0.25)(_clip(t=3, grid=(4, 4)))
    assert pooled.layout == (2, 2) and EVS(budget=0.5)(pooled).counts.tolist() == [6, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_temporal_method_runs_in_each_dtype(dtype):
    clip = _clip(b=2, t=4, grid=(4, 4)).to(dtype)
    for name in TEMPORAL:
        out = vtcompress.get(name, budget=0.25)(clip)
        out.validate()
        assert out.x.dtype == dtype and bool((out.counts < clip.counts).all()), name


# ------------------------------------------------------------------------------------------- through the models
@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return BUILDERS[request.param]()[0]


def test_full_budget_is_the_stock_model(model):
    inputs = _batch([_sample(model, [("video", CLIP), ("image", (1, 4, 6))], 4, 0),
                     _sample(model, [("image", (1, 4, 4))], 7, 1)])
    with torch.no_grad():
        ref, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        for name in TEMPORAL:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref), name
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids), name


@pytest.mark.parametrize("name", TEMPORAL)
def test_mixed_batch_equals_one_by_one_and_cached_equals_uncached(model, name):
    """Sample 0 a video and an image, sample 1 an image, sample 2 a longer video, sample 3 text only."""
    samples = [_sample(model, [("video", CLIP), ("image", (1, 4, 4))], 3, 0), _sample(model, [("image", (1, 4, 4))],
                                                                                     6, 1),
               _sample(model, [("video", (6, 4, 4))], 2, 2), _sample(model, [], 9, 3)]
    method = vtcompress.get(name, budget=0.5)
    with torch.no_grad(), vtcompress.apply(model, method):
        batch_ids = model.generate(**_batch(samples), **GEN)
        uncached = model.generate(**_batch(samples), **GEN, use_cache=False)
        alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in samples]
    assert torch.equal(batch_ids, uncached)
    for b, ids in enumerate(alone):
        assert torch.equal(batch_ids[b, -GEN["max_new_tokens"]:], ids), (name, b)


def test_the_clip_gets_what_the_method_gives_its_features(model):
    """The kept video tokens are the method run on the clip of the model's own video features; the image of the
    call passes through; counts as the budget says."""
    inputs = _sample(model, [("video", CLIP), ("image", (1, 4, 4))], 4, 0)
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                               return_dict=True).pooler_output[0]
    clip = VisualTokens.from_features(feats[None], (2, 2), frames=CLIP[0])
    for name in TEMPORAL:
        method = vtcompress.get(name, budget=0.5)
        res = vtcompress.compress_inputs(model, method, **inputs)
        alone = method(clip).sort_by_pos()
        (got,) = res.video_tokens[0]
        assert got.frames == CLIP[0] and torch.equal(got.pos, alone.pos), name
        torch.testing.assert_close(got.x, alone.x, rtol=0, atol=0)
        assert res.video_num_tokens.tolist() == [[16, int(alone.counts[0])]]
        assert res.num_tokens.tolist() == [[4, 4]]  # the image: no time axis, untouched
        assert int((res.inputs["input_ids"] == VIDEO).sum()) == int(alone.counts[0])
    res = vtcompress.compress_inputs(model, EVS(budget=0.5), **inputs)
    assert res.video_num_tokens.tolist() == [[16, 8]]


def test_spatial_and_temporal_methods_compose(model):
    """EVS then DivPrune (per frame): counts per clip; the image gets DivPrune alone."""
    inputs = _sample(model, [("video", CLIP), ("image", (1, 4, 4))], 4, 0)
    res = vtcompress.compress_inputs(model, [EVS(budget=0.5), vtcompress.get("divprune", budget=0.5)], **inputs)
    (clip,) = res.video_tokens[0]
    evs = EVS(budget=0.5)(VisualTokens.from_features(
        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                       return_dict=True).pooler_output[0][None].detach(), (2, 2), frames=4))
    per_frame = torch.bincount(evs.frame_of()[0], minlength=4)
    expect = torch.minimum(torch.round(per_frame.double() * 0.5).long().clamp(min=1), per_frame)  # empty frames stay
    assert torch.equal(torch.bincount(clip.frame_of()[0], minlength=4), expect)
    assert res.num_tokens.tolist() == [[4, 2]]


def test_kept_tokens_keep_their_stock_positions(model):
    inputs = _batch([_sample(model, [("video", CLIP), ("image", (1, 4, 4))], 4, 0),
                     _sample(model, [("video", (3, 4, 4))], 8, 1)])
    desc = vtcompress.models.adapter_for(model)
    full = full_positions(model, desc, inputs, inputs["input_ids"], inputs["attention_mask"], "original", False)
    for name in TEMPORAL:
        res = vtcompress.compress_inputs(model, vtcompress.get(name, budget=0.4), **inputs)
        got = res.inputs["position_ids"][-3:]
        for b in range(2):
            kept = res.keep[b] & inputs["attention_mask"][b].bool()
            real = res.inputs["attention_mask"][b].bool()
            assert torch.equal(got[:, b, real], full[:, b, kept]), (name, b)


def test_restoration_and_summary(model):
    inputs = _sample(model, [("video", CLIP)], 4, 0)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtcompress.apply(model, EVS(budget=0.5)) as handle:
            squeezed = model(**inputs).logits
        after = model(**inputs).logits
    assert squeezed.shape[1] == ref.shape[1] - 8 and torch.equal(after, ref)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert "16 -> 8 video tokens" in str(handle.summary())


def test_temporal_methods_are_refused_where_videos_do_not_reach_the_projector_stage():
    llava = tiny_llava()[0] if isinstance(tiny_llava(), tuple) else tiny_llava()
    inputs = dict(input_ids=torch.tensor([[5, 6]]), pixel_values=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="temporal.*run on: .*qwen2_vl"):
        vtcompress.compress_inputs(llava, EVS(budget=0.5), **inputs)


# ------------------------------------------------------------------------------------------- Qwen3-VL (DeepStack)
def test_qwen3_vl_clips_carry_their_deepstack_levels():
    """Qwen3-VL: the DeepStack levels of a video follow the temporal method's decisions (gathered for EVS / DyCoke,
    merged alike for the merging methods). EVS keeps every kept token's stock logits with the dropped tokens
    hidden; every temporal method at 1.0 is the stock model; a mixed batch equals one by one, cached == uncached."""
    from models_util import tiny_qwen3_vl

    model = tiny_qwen3_vl()[0]
    samples = [qwen3_sample(model, [("video", CLIP), ("image", (1, 4, 4))], 4, 0),
               qwen3_sample(model, [("image", (1, 4, 6))], 6, 1), qwen3_sample(model, [("video", (3, 4, 4))], 2, 2)]
    inputs = _batch(samples)
    with torch.no_grad():
        ref = model(**inputs).logits
        for name in TEMPORAL:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref), name
        res = vtcompress.compress_inputs(model, EVS(budget=0.5), **inputs)
        assert res.video_num_tokens.tolist() == [[16, 8], [12, 6]] and res.num_tokens.tolist() == [[4, 4], [6, 6]]
    assert_matches_stock_with_holes(model, inputs, res)
    for name in TEMPORAL:
        with torch.no_grad(), vtcompress.apply(model, vtcompress.get(name, budget=0.5)):
            batch_ids = model.generate(**inputs, **GEN)
            assert torch.equal(batch_ids, model.generate(**inputs, **GEN, use_cache=False)), name
            alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in samples]
        for b, ids in enumerate(alone):
            assert torch.equal(batch_ids[b, -GEN["max_new_tokens"]:], ids), (name, b)


# ------------------------------------------------------------------------------------------- OneVision, NeXT-Video
def test_onevision_clips():
    """The model's own 2 x 2 frame pooling stays; the clip is the pooled frames; the video newline is kept."""
    from models_util import tiny_onevision

    model, _ = tiny_onevision()
    inputs = _ov_video(4, 4, 0)
    with torch.no_grad():
        ref, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        for name in TEMPORAL:
            with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref), name
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids), name
        res = vtcompress.compress_inputs(model, EVS(budget=0.5), **inputs)
        assert res.video_num_tokens.tolist() == [[17, 9]]  # 8 of 16 and the newline
        video, text = _ov_video(4, 3, 0), _ov_video(1, 8, 1)
        text = {k: text[k][:, :8] for k in ("input_ids", "attention_mask")}
        length = video["input_ids"].shape[1]
        batch = {k: torch.cat([video[k], torch.nn.functional.pad(text[k], (length - 8, 0))])
                 for k in ("input_ids", "attention_mask")}
        batch["pixel_values_videos"] = video["pixel_values_videos"]
        for name in TEMPORAL:
            with vtcompress.apply(model, vtcompress.get(name, budget=0.5)):
                got = model.generate(**batch, **GEN)
                alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in (video, text)]
                assert torch.equal(got, model.generate(**batch, **GEN, use_cache=False)), name
            for b, ids in enumerate(alone):
                assert torch.equal(got[b, -GEN["max_new_tokens"]:], ids), (name, b)


def test_llava_next_video_clips():
    from models_util import tiny_llava_next_video

    model, _ = tiny_llava_next_video()
    video = next_video_sample(4)  # 4 frames of 2 x 2 pooled tokens
    assert_full_budget_is_stock(model, video, TEMPORAL)
    res = vtcompress.compress_inputs(model, EVS(budget=0.5), **video)
    assert res.video_num_tokens.tolist() == [[16, 8]]


def test_a_temporal_method_composed_with_fastv(model):
    """EVS on the videos, then FastV inside the LLM on every visual run: a batch equals one by one."""
    samples = [_sample(model, [("video", CLIP)], 3, 0), _sample(model, [("image", (1, 4, 4)), ("video", (2, 4, 4))],
                                                                 6, 1)]
    methods = [EVS(budget=0.5), vtcompress.get("fastv", budget=0.5, layer=1)]
    with torch.no_grad(), vtcompress.apply(model, methods):
        batch_ids = model.generate(**_batch(samples), **GEN)
        alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in samples]
    for b, ids in enumerate(alone):
        assert torch.equal(batch_ids[b, -GEN["max_new_tokens"]:], ids), b


def test_the_vllm_plugin_refuses_temporal_methods():
    from vtcompress.integrations.vllm.spec import _check_method

    with pytest.raises(ValueError, match="temporal method"):
        _check_method("evs")


def test_a_temporal_method_reading_vision_signals(model, monkeypatch):
    """Qwen2-VL and OneVision capture the signals of video frames: FastVID with the tower's attention as its
    saliency runs on the clip; on a family whose frames carry none (``video_signals`` off) it is refused (never
    silently skipped)."""
    from models_util import tiny_onevision
    from vtcompress.models.registry import adapter_for

    method = vtcompress.get("fastvid", budget=0.5, saliency="cls_attn")
    ov = tiny_onevision()[0]
    for m, inputs, n in ((model, _sample(model, [("video", CLIP)], 4, 0), 16), (ov, _ov_video(4, 4, 0), 17)):
        res = vtcompress.compress_inputs(m, method, **inputs)
        (clip,) = res.video_tokens[0]
        assert clip.cls_attn is not None and res.video_num_tokens.tolist()[0][0] == n
        assert res.video_num_tokens[0, 1] < n
    monkeypatch.setattr(adapter_for(ov), "video_signals", False)
    with pytest.raises(ValueError, match="not captured for video frames"):
        vtcompress.compress_inputs(ov, method, **_ov_video(4, 4, 0))


def test_a_trainable_method_on_a_clip_refuses_an_int_budget():
    method = vtcompress.get("perceiver", budget=4, pretrained=False, hidden_size=8)
    with pytest.raises(ValueError, match="learned weights"):
        method(_clip(t=2, grid=(3, 3)))


@pytest.mark.parametrize("name", TEMPORAL)
@pytest.mark.parametrize("t,grid", [(1, (2, 3)), (2, (1, 1)), (3, (5, 5)), (5, (2, 3)), (9, (1, 1))])
def test_every_temporal_method_on_short_long_and_tiny_clips(name, t, grid):
    """Clips of 1 to 9 frames and 1 to 25 tokens per frame, batches of 3 different clips, fraction and int
    budgets: valid tokens, budget 1.0 the identity, a batch equal to each clip alone, the kept patches' sizes
    conserved. An int budget below one token per frame is refused by a method that keeps one per frame."""
    clip = _clip(b=3, t=t, grid=grid, seed=t, moving=min(2, grid[0] * grid[1]))
    n = t * grid[0] * grid[1]
    for budget in (1.0, 0.999, 0.5, 0.05, 1, 7):
        if isinstance(budget, int) and budget > n:
            continue
        method = vtcompress.get(name, budget=budget)
        try:
            out = method(clip)
        except ValueError as e:
            assert isinstance(budget, int) and budget < t and "below one token per frame" in str(e), (budget, e)
            continue
        out.validate()
        assert out.frames == t and bool((out.counts <= clip.counts).all())
        if budget == 1.0 and isinstance(budget, float):
            assert torch.equal(out.x, clip.x) and torch.equal(out.assign, clip.assign)
        for r in range(3):
            one = method(clip.row(r))
            assert torch.equal(out.row(r).pos, one.pos), (budget, r)
            torch.testing.assert_close(out.row(r).x, one.x, rtol=0, atol=0)
        assert torch.equal((out.size * out.mask).sum(1), (out.assign >= 0).sum(1).to(out.size.dtype))


def _ov_mixed(make, images: int, frames: int, seed: int) -> dict:
    """One OneVision sample: ``images`` anyres images (the tiny builder's), then a video of ``frames`` frames."""
    s = make(batch=1, images=[images], seed=seed)
    gen = torch.Generator().manual_seed(seed)
    extra = [VIDEO] * (frames * 4 + 1) + [8, 9] if frames else [8, 9]
    ids = torch.cat([s["input_ids"][0], torch.tensor(extra)])
    out = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.shape[0], dtype=torch.long)}
    if images:
        out.update(pixel_values=s["pixel_values"], image_sizes=s["image_sizes"])
    if frames:
        out["pixel_values_videos"] = torch.randn(1, frames, 3, 16, 16, generator=gen)
    return out


def _ov_batch(samples: list[dict]) -> dict:
    """Left-pad OneVision samples into one batch (images and videos concatenated in sample order)."""
    length = max(s["input_ids"].shape[1] for s in samples)
    out = {k: torch.stack([torch.nn.functional.pad(s[k][0], (length - s[k].shape[1], 0)) for s in samples])
           for k in ("input_ids", "attention_mask")}
    for k in ("pixel_values", "image_sizes", "pixel_values_videos"):
        parts = [s[k] for s in samples if k in s]
        if parts:
            out[k] = torch.cat(parts)
    out["batch_num_images"] = torch.tensor([int(s["image_sizes"].shape[0]) if "image_sizes" in s else 0
                                            for s in samples])
    return out


@pytest.mark.parametrize("name", ["evs", "holitom"])
def test_onevision_mixed_image_and_video_batch(name):
    """OneVision: an image + video sample, a video, an image and text only in one left-padded batch under a
    grid method and a temporal method: equal to one by one, cached equal to uncached; budget 1.0 stock."""
    from models_util import tiny_onevision

    model, make = tiny_onevision()
    samples = [_ov_mixed(make, 1, 4, 0), _ov_mixed(make, 0, 4, 1), _ov_mixed(make, 1, 0, 2), _ov_mixed(make, 0, 0, 3)]
    batch = _ov_batch(samples)
    with torch.no_grad():
        ref = model(**batch).logits
        with vtcompress.apply(model, vtcompress.get(name, budget=1.0)):
            assert torch.equal(model(**batch).logits, ref)
        # a grid method first (frame by frame on the videos, per view on the images), then the temporal method
        methods = [vtcompress.get("avg_pool", budget=0.25), vtcompress.get(name, budget=0.5)]
        res = vtcompress.compress_inputs(model, methods, **batch)
        assert bool((res.video_num_tokens[:, 1] < res.video_num_tokens[:, 0]).all())
        assert bool((res.num_tokens[:, 1] < res.num_tokens[:, 0]).all())
        with vtcompress.apply(model, methods):
            got = model.generate(**batch, **GEN)
            assert torch.equal(got, model.generate(**batch, **GEN, use_cache=False))
            alone = [model.generate(**s, **GEN)[0, -GEN["max_new_tokens"]:] for s in samples]
    for b, ids in enumerate(alone):
        assert torch.equal(got[b, -GEN["max_new_tokens"]:], ids), b
