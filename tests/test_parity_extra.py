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
