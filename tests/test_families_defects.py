"""Regression tests for family-specific defects (issues 12 and 13).

* InternVL with beams / several returned sequences and images in two samples: generate's multimodal expansion
  must hand every copy of a sample that sample's own images (the adapter once returned one ``[1, K, D]`` row,
  which the expansion cannot split, so sample 0's second beam received sample 1's image).
* LLaVA-NeXT / OneVision on very tall images: the unpadded high-resolution grid has no columns, the stock
  packer emits one ``image_newline`` per row and no patch; those newlines were dropped even at budget 1.0.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtcompress
from models_util import BUILDERS, _assemble, _prompts, tiny_llava_next, tiny_onevision
from vtcompress.models import adapter_for
from vtcompress.models.context import cache_in

# ------------------------------------------------------------------------------------------ beams

GENERATE_MODES = {
    "beams": {"num_beams": 3, "num_return_sequences": 2, "do_sample": False},
    "sampling": {"do_sample": True, "num_return_sequences": 3, "top_k": 0},
}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


def _generate(model, inputs, mode):
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, **GENERATE_MODES[mode])
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("mode", list(GENERATE_MODES))
@pytest.mark.parametrize("family", list(BUILDERS))
def test_full_budget_beams_and_returns_equal_stock(models, family, mode):
    """Budget 1.0 under beams / multi-return sampling, images in both samples (two in one): the same
    sequences and the same per-step scores as the stock model (the tiny random models often agree on the
    argmax even with a wrong image, so the scores are what catches a mixed-up image)."""
    model, make = models[family]
    inputs = make(batch=2, images=[1, 2])
    with torch.no_grad():
        ref_ids, ref_scores = _generate(model, inputs, mode)
        # a projector-stage method alone, and composed with a decoder-stage one
        for method in (vtcompress.get("random", budget=1.0, seed=0),
                       [vtcompress.get("random", budget=1.0, seed=0), vtcompress.get("fastv", budget=1.0, layer=1)]):
            with vtcompress.apply(model, method):
                ids, scores = _generate(model, inputs, mode)
            assert torch.equal(ids, ref_ids)
            finite = torch.isfinite(ref_scores)
            assert torch.equal(finite, torch.isfinite(scores))
            torch.testing.assert_close(scores[finite], ref_scores[finite], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_copy_of_a_sample_gets_its_own_images(models, family):
    """Under compression (budget 0.5) with num_return_sequences=3 the LLM's prefill embeddings of the three
    copies of a sample are identical, and equal to that sample's embeddings without expansion."""
    model, make = models[family]
    inputs = make(batch=2, images=[2, 1])
    seen = []

    def grab(module, args, kwargs):
        cache = cache_in(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            seen.append(kwargs["inputs_embeds"].detach().clone())

    lm = adapter_for(model).language_model(model)
    method = vtcompress.get("uniform", budget=0.5)
    with torch.no_grad(), vtcompress.apply(model, method):
        hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model.generate(**inputs, max_new_tokens=1, do_sample=True, num_return_sequences=3, pad_token_id=0)
            model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
        finally:
            hook.remove()
    expanded, single = seen[0], seen[1]
    assert expanded.shape[0] == 6 and single.shape[0] == 2
    for b in range(2):
        for r in range(3):
            assert torch.equal(expanded[3 * b + r], single[b]), (b, r)


# ------------------------------------------------------------------------------------------ tall images
def _anyres_inputs(model, sizes, onevision: bool):
    """One sample per image of ``sizes`` ((H, W) pixels), placeholder runs from the stock feature path."""
    gen = torch.Generator().manual_seed(1)
    sizes = torch.tensor(sizes, dtype=torch.long)
    crop = model.config.vision_config.image_size
    crops = [image_size_to_num_patches(s.tolist(), model.config.image_grid_pinpoints, crop) for s in sizes]
    kw = {"pixel_values": torch.randn(len(sizes), max(crops), 3, crop, crop, generator=gen), "image_sizes": sizes}
    if onevision:
        kw["batch_num_images"] = torch.ones(len(sizes), dtype=torch.long)
    with torch.no_grad():
        lens = [f.shape[0] for f in model.model.get_image_features(**kw).pooler_output]
    rows, _ = _prompts(gen, len(sizes), [1] * len(sizes), lens)
    ids, mask, _ = _assemble(rows, "left")
    return {"input_ids": ids, "attention_mask": mask, **kw}, lens


# tiny geometry: 16 px crops of 4x4 patches, pinpoints 16x32 / 32x16 / 32x32. An image more than 16x taller
# than wide (here 17:1 and up) leaves the 8x4 high-resolution grid with zero columns after unpadding; 16x
# wider than tall leaves it with zero rows (no newline at all). Moderate ratios keep a few columns / rows.
ASPECTS = [(1000, 10), (340, 20), (17, 1), (100, 1), (160, 10), (90, 10), (30, 2), (10, 1000), (1, 17), (10, 90),
           (2, 30), (20, 30)]


def _builders():
    return [("llava_next", tiny_llava_next, False), ("onevision", tiny_onevision, True)]


@pytest.mark.parametrize(("family", "build", "onevision"), _builders())
def test_tall_and_wide_images_full_budget_equal_stock(family, build, onevision):
    model, _ = build()
    inputs, lens = _anyres_inputs(model, ASPECTS, onevision)
    adapter = adapter_for(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        with vtcompress.apply(model, vtcompress.get("random", budget=1.0, seed=0)) as handle:
            out = model(**inputs).logits
            ids = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert handle.last.num_tokens[:, 0].tolist() == lens == handle.last.num_tokens[:, 1].tolist()
    valid = inputs["attention_mask"].bool()
    assert out.shape == ref.shape and torch.equal(out[valid], ref[valid])
    assert torch.equal(ids, ref_ids)
    # the sweep does hit the zero-column case: newlines with no patch in their row (always-kept, view -1)
    with torch.no_grad():
        feats = adapter.features(model, inputs, model.model.get_image_features(**adapter.encoder_kwargs(model, inputs)))
    layouts = adapter.layouts(model, inputs, feats)
    zero_col = [bool((lay.view == -1).any()) for lay in layouts]
    assert zero_col[:4] == [True] * 4 and not any(zero_col[7:])
    assert [lay.view.shape[0] for lay in layouts] == lens


@pytest.mark.parametrize(("family", "build", "onevision"), _builders())
def test_zero_column_grid_keeps_its_newlines_and_prunes_the_base(family, build, onevision):
    """At an int budget the base crop is pruned; the newlines of a column-less grid have nothing to prune and
    stay (as the stock packer emits them); batched == one by one."""
    model, _ = build()
    h, w = adapter_for(model).grid(model)
    sizes = [(1000, 10), (17, 1), (20, 30)]
    inputs, lens = _anyres_inputs(model, sizes, onevision)
    with torch.no_grad():
        res = vtcompress.compress_inputs(model, vtcompress.get("uniform", budget=4), **inputs)
        for i, size in enumerate(sizes[:2]):
            one, _ = _anyres_inputs(model, [size], onevision)
            alone = vtcompress.compress_inputs(model, vtcompress.get("uniform", budget=4), **one)
            assert alone.num_tokens.tolist() == res.num_tokens[i : i + 1].tolist()
            rows = lens[i] - h * w
            assert rows > 0
            assert res.num_tokens[i].tolist() == [lens[i], 4 + rows]  # 4 base patches + every newline
            assert len(res.tokens[i]) == 1 and res.tokens[i][0].grid == (h, w)  # only the base crop is a view


def test_from_views_explicit_separator_view():
    """ImageLayout.from_views with ``sep_view``: a separator right after the base crop can close a row of the
    high-resolution grid; rows without patches become always-kept non-patch features."""
    from vtcompress.models import ImageLayout

    # base 2x2, then a high-resolution grid of 3 rows x 0 columns (newlines only)
    view = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    sep = torch.tensor([False] * 4 + [True] * 3)
    lay = ImageLayout.from_views(view, sep, (2, 2), sep_view=1)
    assert lay.grids == [(2, 2)]
    assert lay.view.tolist() == [0, 0, 0, 0, -1, -1, -1]
    assert lay.patch.tolist() == [0, 1, 2, 3, -1, -1, -1] and not bool(lay.sep.any())
    assert lay.group.tolist()[4:] == [-1, -1, -1]
    # a 2x1 grid: each newline closes a row with one patch
    view = torch.tensor([0, 0, 0, 0, 1, -1, 1, -1])
    sep = view < 0
    lay = ImageLayout.from_views(view.clamp(min=0), sep, (2, 2), sep_view=1)
    assert lay.grids == [(2, 2), (2, 1)]
    assert lay.sep.tolist() == [False] * 5 + [True, False, True]
    assert lay.group[5] == lay.group[4] and lay.group[7] == lay.group[6] and lay.group[4] != lay.group[6]
    # default (no sep_view): a single-crop image's newline closes the base crop's row
    lay = ImageLayout.from_views(torch.tensor([0, 0, 0, 0, 0]), torch.tensor([False] * 4 + [True]), (2, 2))
    assert lay.grids == [(2, 2)] and lay.view.tolist() == [0] * 5 and bool(lay.sep[4])
