"""Input validation: malformed VisualTokens, fields assigned after construction, listing filters, method names,
the kvpress habit (``with method(model):``) and untrained weights (issues 13 and 12)."""

import dataclasses

import pytest
import torch

import vtcompress as vc
from methods_util import make_tokens
from vtcompress import VisualTokens
from vtcompress.checkpoints import load_trained
from vtcompress.trainable import TrainableCompressor


def _good(b=2, grid=(4, 4), counts=(16, 11)) -> VisualTokens:
    return make_tokens(b=b, grid=grid, d=6, counts=list(counts), seed=3)


# ------------------------------------------------------------------------------------------ VisualTokens values
def _bad_cases():
    t = _good()
    neg_pos = t.pos.clone()
    neg_pos[0, 2] = -1
    far_pos = t.pos.clone()
    far_pos[1, 0] = 16
    zero_size = t.size.clone()
    zero_size[0, 5] = 0.0
    neg_size = t.size.clone()
    neg_size[1, 3] = -2.0
    nan_size = t.size.clone()
    nan_size[0, 0] = float("nan")
    nan_attn = t.cls_attn.clone()
    nan_attn[0, 4] = float("nan")
    holes = t.mask.clone()
    holes[0, 3] = False  # row 0 keeps tokens after a padded one
    bad_assign = t.assign.clone()
    bad_assign[0, 0] = 99
    to_pad = t.assign.clone()
    to_pad[1, 0] = 13  # row 1 has 11 valid tokens: 13 is padding
    return [
        ("negative pos", t.replace(pos=neg_pos), r"pos -1 is outside the grid \(4, 4\)"),
        ("pos outside the grid", t.replace(pos=far_pos), r"pos 16 is outside the grid \(4, 4\)"),
        ("zero size", t.replace(size=zero_size), r"size 0.0 is invalid"),
        ("negative size", t.replace(size=neg_size), r"size -2.0 is invalid"),
        ("NaN size", t.replace(size=nan_size), r"size nan is invalid"),
        ("integer size", t.replace(size=t.size.long()), r"size must be floating point"),
        ("NaN cls_attn", t.replace(cls_attn=nan_attn), r"cls_attn contains NaN"),
        ("integer cls_attn", t.replace(cls_attn=(t.cls_attn * 100).long()), r"cls_attn must be floating point"),
        ("mask with holes", t.replace(mask=holes), r"mask has holes \(row 0"),
        ("layout not in grid", t.replace(layout=(2, 8)), r"layout \(2, 8\) does not fit in the original grid"),
        ("layout count", t.replace(layout=(3, 3)), r"layout \(3, 3\) does not match N=16"),
        ("grid not a pair", t.replace(grid=(4, 4, 1)), r"grid must be a pair"),
        ("grid inconsistent with layout", t.replace(grid=(2, 8)), r"layout \(4, 4\) does not fit in the original grid"),
        ("grid without layout", t.replace(grid=(2, 8), layout=None), None),  # same N0, no grid claim: accepted
        ("assign out of range", t.replace(assign=bad_assign), r"assign value 99 is out of range"),
        ("assign to padding", t.replace(assign=to_pad), r"assign sends a patch to a padded"),
        ("long assign", t.replace(assign=t.assign.int()), r"assign must have dtype torch.int64"),
        ("float pos", t.replace(pos=t.pos.float()), r"pos must have dtype torch.int64"),
        ("keys 2-D", t.replace(keys=t.keys[..., 0]), r"keys must have shape \[B, N, Dk\]"),
        ("integer keys", t.replace(keys=t.keys.long()), r"keys must be floating point"),
        ("text 2-D", t.replace(text=t.text[:, 0]), r"text must have shape \[B, T, D\]"),
        ("x 2-D", t.replace(x=t.x[0]), r"features x must be a tensor of shape \[B, N, D\]"),
        ("mask not a tensor", t.replace(mask=t.mask.tolist()), r"mask must be a tensor"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_malformed_tokens_raise_one_clear_error(case):
    _, tokens, message = case
    if message is None:
        tokens.validate()
        return
    with pytest.raises(ValueError, match=message):
        tokens.validate()
    # a method validates where the tokens enter it
    with pytest.raises(ValueError, match=message):
        vc.get("random", budget=4)(tokens)


def test_padding_may_hold_anything_and_valid_tokens_pass():
    t = _good()
    pos = t.pos.clone()
    pos[1, 12:] = -5  # padding of row 1 (11 valid tokens)
    size = t.size.clone()
    size[1, 12:] = 0.0
    t.replace(pos=pos, size=size).validate()
    out = vc.get("tome", budget=6)(t)
    out.validate()


def test_from_features_rejects_a_mask_with_holes():
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match="mask has holes"):
        VisualTokens.from_features(torch.randn(1, 16, 3), mask=mask)


# ------------------------------------------------------------------------------------------ fields after construction
@pytest.mark.parametrize("name", ["random", "uniform", "tome", "divprune", "avg_pool", "bilinear", "visionzip",
                                  "fastervlm", "fastv", "tome_encoder", "folder"])
def test_budget_assigned_after_construction_is_validated(name):
    m = vc.get(name, budget=4)
    for bad in (0, -1, 1.5, "half"):
        with pytest.raises(ValueError, match=rf"{name}\.budget = .* is invalid: budget"):
            m.budget = bad
        assert m.budget == 4  # the bad value is not stored
    m.budget = 0.5
    assert m.budget == 0.5


def test_other_fields_and_cross_field_rules_are_validated_at_assignment():
    m = vc.get("tome", budget=3, protect=1)
    with pytest.raises(ValueError, match="protect"):
        m.protect = -1
    with pytest.raises(ValueError, match=r"below protect \+ 1"):
        m.protect = 3  # budget 3 < protect + 1
    m.protect = 2
    assert dataclasses.replace(m) == m


def test_budget_zero_after_construction_no_longer_keeps_a_token():
    """Regression (issue 13, item 5): ``m.budget = 0`` kept 1 token per image instead of raising."""
    tokens = _good()
    m = vc.get("random", budget=4)
    with pytest.raises(ValueError):
        m.budget = 0
    assert m(tokens).counts.tolist() == [4, 4]


# ------------------------------------------------------------------------------------------ listing, names, habits
def test_list_methods_rejects_unknown_filters():
    with pytest.raises(ValueError, match=r"stage='decodr' .*did you mean 'decoder'.*valid: encoder, projector"):
        vc.list_methods(stage="decodr")
    with pytest.raises(ValueError, match=r"family='attn' .*did you mean 'attention'.*valid: transformation"):
        vc.list_methods(family="attn")
    assert "fastv" in vc.list_methods(stage="decoder", family="attention")


def test_mistyped_method_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown method 'visonzip'; valid names: .*did you mean 'visionzip'\?"):
        vc.get("visonzip")
    with pytest.raises(ValueError, match=r"unknown method 'xyz'; valid names: [^?]*$"):
        vc.get("xyz")


def test_calling_or_entering_a_method_points_to_apply():
    from models_util import tiny_llava

    model, _ = tiny_llava()
    m = vc.get("fastv", budget=0.5)
    with pytest.raises(ValueError, match=r"vtcompress\.apply\(model, method\)"):
        with m(model):
            pass
    with pytest.raises(ValueError, match=r"vtcompress\.apply\(model, method\)"):
        with m:
            pass
    with pytest.raises(ValueError, match=r"vtcompress\.apply"):
        vc.get("tome", budget=4)(model)


def test_matches_reference_is_listed_for_every_method():
    info = vc.method_info()
    assert all("matches_reference" in r for r in info)
    by = {r["name"]: r["matches_reference"] for r in info}
    for name in ("tome", "tome_encoder", "folder", "divprune", "avg_pool", "max_pool", "bilinear", "pixel_unshuffle",
                 "random", "uniform", "qformer", "perceiver", "ldpv2", "unshuffle_mlp"):
        assert by[name], name


# ------------------------------------------------------------------------------------------ untrained weights
TRAINABLE = ["qformer", "perceiver", "ldpv2", "unshuffle_mlp"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_trainable_without_weights_raises_naming_checkpoints(name):
    """Regression (issue 13): ``get("qformer")`` built random weights silently."""
    with pytest.raises(ValueError, match=rf"'{name}' .*has learned weights and none were given.*{name}-0\.11.*"
                                         rf"train-compressor {name}.*pretrained=False"):
        vc.get(name, budget=0.25)
    with pytest.raises(ValueError, match="has learned weights"):
        vc.get(name, budget=0.25, hidden_size=32, grid=(12, 12))  # eager build: same rule


@pytest.mark.parametrize("name", TRAINABLE)
def test_random_weights_only_when_asked_and_marked(name):
    m = vc.get(name, budget=0.25, pretrained=False)
    assert isinstance(m, TrainableCompressor) and m.untrained
    shipped = load_trained(name, 0.25)
    assert not shipped.untrained and shipped.pretrained
    # a loaded module's structure is fixed by its weights: re-budgeting it raises instead of re-initialising
    with pytest.raises(ValueError, match="weights were built for budget=0.25"):
        shipped.budget = 0.11
    with pytest.raises(ValueError, match="has learned weights"):
        dataclasses.replace(shipped, budget=0.11)
    with pytest.raises(ValueError, match="pretrained is fixed"):
        m.pretrained = True


def test_saved_untrained_config_has_no_pretrained_flag(tmp_path):
    import json

    m = vc.get("ldpv2", budget=0.25, pretrained=False, hidden_size=8, grid=(4, 4))
    m.save_pretrained(tmp_path / "ck")
    assert "pretrained" not in json.loads((tmp_path / "ck" / "config.json").read_text())["fields"]
    loaded = vc.Compressor.from_pretrained(tmp_path / "ck")
    assert not loaded.untrained


def test_show_marks_untrained_compressors():
    from PIL import Image

    from vtcompress.viz import method_panels

    img = Image.new("RGB", (48, 48), (120, 30, 200))
    panels = method_panels(None, img, ["unshuffle_mlp", "avg_pool"], 0.25, grid=(6, 6),
                           params={"unshuffle_mlp.pretrained": False})
    assert panels[0][0].startswith("unshuffle_mlp [untrained]") and "[untrained]" not in panels[1][0]
    with pytest.raises(ValueError, match="has learned weights"):
        method_panels(None, img, ["qformer"], 0.25, grid=(6, 6))
