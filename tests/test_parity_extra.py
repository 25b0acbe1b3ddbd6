"""Independent-checker cases (issue 12 review): configurations, batches and inputs the other tests do not use.

Each test here failed on the code before its fix (see the commit that added it)."""

from __future__ import annotations

import pytest
import torch

import vtcompress
from models_util import tiny_llava, tiny_llava_next
from vtcompress import Compressor, get


# --------------------------------------------------------------------------- trainables with per-view budgets
@pytest.mark.parametrize("name", ["qformer", "ldpv2"])
def test_trainable_int_budget_split_over_views_raises_one_clear_error(name, tmp_path):
    """An int budget on a LLaVA-NeXT image is split over its base and high-resolution views; a trainable's
    weights serve its own budget only. Before: a loaded checkpoint raised "has learned weights and none were
    given", and pretrained=False silently ran freshly initialised copies (the caller's weights ignored)."""
    model, make = tiny_llava_next()
    inputs = make(batch=1, images=[1], seed=1)
    m = get(name, budget=8, pretrained=False)
    with pytest.raises(ValueError, match=rf"{name}.*learned weights for budget=8.*split over .*views.*float budget"):
        with vtcompress.apply(model, m), torch.no_grad():
            model(**inputs)
    built = get(name, budget=8, pretrained=False, hidden_size=32, grid=(4, 4))
    built.save_pretrained(tmp_path / name)
    loaded = Compressor.from_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match=rf"{name}.*learned weights for budget=8.*split over .*views.*float budget"):
        with vtcompress.apply(model, loaded), torch.no_grad():
            model(**inputs)


def test_trainable_int_budget_above_the_image_tokens_raises():
    """LLaVA-1.5 (one view of 16 tokens) with a trainable at budget=20: the split caps it at 16, which its
    weights were not built for. Before: a fresh copy at budget=16 ran silently."""
    model, make = tiny_llava()
    inputs = make(batch=1, images=[1], seed=1)
    with pytest.raises(ValueError, match=r"qformer.*learned weights for budget=20"):
        with vtcompress.apply(model, get("qformer", budget=20, pretrained=False)), torch.no_grad():
            model(**inputs)


def test_trainable_own_budget_still_runs_with_its_own_weights():
    """The rule only refuses a budget that differs from the method's: budget=8 on one 16-token view runs the
    caller's own (modified) weights."""
    model, make = tiny_llava()
    inputs = make(batch=1, images=[1], seed=1)
    m = get("ldpv2", budget=8, pretrained=False)
    with vtcompress.apply(model, m), torch.no_grad():
        a = model(**inputs).logits
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    with vtcompress.apply(model, m), torch.no_grad():
        b = model(**inputs).logits
    assert a.shape == b.shape and not torch.allclose(a, b)


# --------------------------------------------------------------------------- OneVision down-sized image in a batch
@pytest.mark.parametrize("name", ["visionzip", "prumerge"])
def test_onevision_downsized_image_does_not_move_the_other_images_out_of_the_vision_space(name, monkeypatch):
    """Sample 0's 64x64 image is down-sized by anyres_max (no 1:1 map before the projector: compressed in its
    projected features); sample 1's two small images map 1:1 and must be compressed before the projector as
    they are alone. Before: the whole batch fell back to the projected features (differences ~5e-3)."""
    import models_util

    monkeypatch.setattr(models_util, "_SIZES", [(64, 64), (20, 30), (16, 16)])
    model, make = models_util.tiny_onevision(pinpoints=[[16, 32], [32, 16], [32, 32], [64, 64]])
    inputs = make(batch=2, images=[1, 2], seed=1)
    method = get(name, budget=0.4)
    assert method.acts_on == "vision"
    with torch.no_grad():
        batched = vtcompress.compress_inputs(model, method, **inputs)
        alone = [vtcompress.compress_inputs(model, method, **s) for s in models_util.split_samples(inputs)]
    got = batched.inputs["mm_encoder_outputs"]["image"].pooler_output
    want = [f for a in alone for f in a.inputs["mm_encoder_outputs"]["image"].pooler_output]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.num_tokens, torch.cat([a.num_tokens for a in alone]))


# --------------------------------------------------------------------------- guards (held on review; cheap)
def test_next_feature_layer_list_acts_before_projector_batched_equals_alone():
    """LLaVA-NeXT reading a list of vision layers (projector input 2C wide), batch with 0 / 1 / 2 images of
    different sizes: VisionZip before the projector gives each image what it gets alone."""
    from transformers import LlavaNextForConditionalGeneration

    from models_util import _anyres_inputs, split_samples

    base, _ = tiny_llava_next()
    cfg = base.config
    cfg.vision_feature_layer = [-3, -1]
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    inputs = _anyres_inputs(model, torch.Generator().manual_seed(1), 3, [0, 1, 2], "left")
    method = get("visionzip", budget=0.4)
    with torch.no_grad():
        batched = vtcompress.compress_inputs(model, method, **inputs)
        alone = [vtcompress.compress_inputs(model, method, **s) for s in split_samples(inputs)[1:]]
    got = batched.inputs["mm_encoder_outputs"]["image"].pooler_output
    want = [f for a in alone for f in a.inputs["mm_encoder_outputs"]["image"].pooler_output]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
