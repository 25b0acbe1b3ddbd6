"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT's images are compressed; under a
signal-reading method (FasterVLM here) the videos pass through untouched (videos under feature-only methods are
compressed frame by frame: tests/test_video.py)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtcompress
from family_checks import GEN, every_projector_method_with_fastv
from models_util import IMAGE, VIDEO, tiny_llava_next_video
from vtcompress import get
from vtcompress.models import adapter_for
from vtcompress.models.description import TokenLayout

FRAMES = 2
VIDEO_TOKENS = FRAMES * 4  # 4x4 patches pooled 2x2 per frame


@pytest.fixture(scope="module")
def lnv():
    return tiny_llava_next_video()


def _with_video(make, seed: int = 0) -> dict:
    """Two left-padded samples, each an image then a video of ``FRAMES`` frames, then text."""
    inputs = make(batch=2, images=[1, 1], seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    suffix = torch.tensor([[VIDEO] * VIDEO_TOKENS + [5, 6]] * 2)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], suffix], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(suffix)], dim=1)
    inputs["pixel_values_videos"] = torch.randn(2, FRAMES, 3, 16, 16, generator=gen)
    return inputs


def _capture_embeds(model):
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    return seen, hook


def test_videos_pass_through_untouched_under_a_signal_method(lnv, monkeypatch):
    """Where video frames carry no captured signal (``video_signals`` off, as a third-party description may have
    it): budget 1.0 with an image and a video per sample is the stock model bit for bit; under compression every
    video placeholder stays and the LLM receives exactly the stock model's video embeddings, while the images
    shrink. (With the signals, the videos are compressed: ``test_video.test_signal_methods_on_pooled_video_frames``.)"""
    from vtcompress.models.registry import adapter_for

    model, make = lnv
    monkeypatch.setattr(adapter_for(model), "video_signals", False)
    inputs = _with_video(make)
    seen, hook = _capture_embeds(model)
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
            ref_ids = model.generate(**inputs, **GEN)
            stock_embeds = seen[0]
            with vtcompress.apply(model, get("fastervlm", budget=1.0)):
                assert torch.equal(model(**inputs).logits, ref)
                assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
            seen.clear()
            with vtcompress.apply(model, get("fastervlm", budget=0.5)) as handle:
                model(**inputs)
    finally:
        hook.remove()
    short = handle.last.inputs
    assert bool((handle.last.num_tokens[:, 1] < handle.last.num_tokens[:, 0]).all())
    assert torch.equal((short["input_ids"] == VIDEO).sum(1), (inputs["input_ids"] == VIDEO).sum(1))
    assert "pixel_values_videos" not in short  # encoded once, by the model's own get_video_features
    got = seen[0][short["input_ids"] == VIDEO]
    assert torch.equal(got, stock_embeds[inputs["input_ids"] == VIDEO])


def test_vision_space_is_llava_nexts(lnv):
    """As on LLaVA-NeXT, a method with ``acts_on="vision"`` reads the tower's features before the model's own
    projector: the kept tokens are the projector's input rows of their patches, and a selection-only method keeps
    the same set in either space (same LLM input)."""
    model, make = lnv
    inputs = make(batch=2, images=[1, 1], seed=3)
    captured = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    finally:
        hook.remove()
    crops = captured[0]  # [crops, 16, C]: crop 0 of each image is its base view
    vision = get("fastervlm", budget=0.5, acts_on="vision")
    res = vtcompress.compress_inputs(model, vision, **inputs)
    per = [image_size_to_num_patches(s.tolist(), model.config.image_grid_pinpoints, 16) for s in inputs["image_sizes"]]
    first_crop = [0, per[0]]  # image 1's crops follow image 0's
    for i in range(2):
        tok = res.tokens_of(i, 0)
        assert torch.equal(tok.x[0], crops[first_crop[i]][tok.pos[0]])
    with torch.no_grad():
        a = model(**res.inputs).logits
        b = model(**vtcompress.compress_inputs(model, get("fastervlm", budget=0.5), **inputs).inputs).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_fastv_prunes_each_video_as_one_run(lnv):
    """The decoder stage sees every image / video placeholder run as one visual run (LLaVA-NeXT's newlines never
    pruned): with a video present, FastV keeps half of each run, and cached == uncached."""
    model, make = lnv
    inputs = _with_video(make, seed=1)
    with torch.no_grad(), vtcompress.apply(model, get("fastv", budget=0.5, layer=1)) as handle:
        cached = model.generate(**inputs, **GEN)
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **GEN))
        model(**inputs)
        kept = handle._decoder.kept_visual()
    for b in range(2):
        ids = inputs["input_ids"][b]
        assert int((ids[kept[b]] == VIDEO).sum()) == VIDEO_TOKENS // 2
        assert 0 < int((ids[kept[b]] == IMAGE).sum()) < int((ids == IMAGE).sum())


def test_every_projector_method_and_fastv_batch_cache_restore(lnv):
    """Every training-free projector-stage method, composed with FastV, on a left-padded batch of 0/1/2 images:
    batched == one by one, cached == uncached, budget 1.0 == stock, restoration (``family_checks``)."""
    model, make = lnv
    every_projector_method_with_fastv(model, make(batch=3, images=[2, 1, 0], seed=1))


def test_description_is_llava_nexts_plus_a_video_modality(lnv):
    model, _ = lnv
    desc = adapter_for(model)
    base = model.model
    assert desc.family == "llava_next_video" and desc.image.layout is TokenLayout.ANYRES
    assert desc.vision_layers(model) == list(base.vision_tower.encoder.layers)
    assert desc.projector(model) is base.multi_modal_projector and desc.projector_one_to_one
    assert desc.image_newline(model) is base.image_newline
    assert desc.video is not None and desc.video.pixel_key == "pixel_values_videos"
    assert desc.visual_token_ids(model) == [IMAGE, VIDEO]
