"""The support table (vtcompress.support, ``vtcompress list --models``) against the test matrix: every family it
calls supported has a tiny stock model in ``models_util.BUILDERS``, and every (family, stage, kind of method) cell
it claims runs there and compresses (every training-free method of the cell), while the stages it does not claim
are refused with one clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vtcompress
from models_util import BUILDERS
from vtcompress.compressor import METHODS, Stage
from vtcompress.models import adapter_for
from vtcompress.support import (
    list_models,
    stage_kinds,
    support_markdown,
    support_rows,
    trainable_methods,
    widening_methods,
)


@pytest.fixture(scope="module")
def built():
    """Each builder's model, by the family the registry assigns it."""
    out = {}
    for name, build in BUILDERS.items():
        model, make = build()
        out.setdefault(adapter_for(model).family, []).append((name, model, make))
    return out


def test_every_supported_family_and_model_class_has_a_builder(built):
    classes = {type(model).__name__ for entries in built.values() for _, model, _ in entries}
    supported = [m for m in list_models() if m.status == "supported"]
    assert supported  # the built-in families are all supported
    for m in supported:
        assert m.family in built, f"family {m.family!r} is claimed supported but no tests/models_util builder makes one"
        missing = set(m.model_classes) - classes
        assert not missing, f"{m.family}: model classes {sorted(missing)} are claimed but no builder makes one"


def _build(name: str):
    """Method ``name`` at a budget every method accepts on the tiny models (a quarter: pixel unshuffle's fixed
    ratio), trainable ones with random weights (their shape is what the mechanics see)."""
    cls = METHODS[name]
    params = {"budget": 0.25}
    if cls.trainable:
        params["pretrained"] = False
    if "layer" in {f.name for f in dataclasses.fields(cls)}:
        params["layer"] = 1  # the tiny LLMs have 2 layers
    return vtcompress.get(name, **params)


def _stage_row(handle, stage):
    return next(r for r in handle.summary().stages if stage in r.stage.split("+"))


def _runs(model, inputs, method):
    with torch.no_grad(), vtcompress.apply(model, method) as handle:
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    row = _stage_row(handle, method.stage)
    assert sum(row.tokens_out) < sum(row.tokens_in), f"{method.name}: {row}"


@pytest.mark.parametrize("family", [m.family for m in list_models()])
def test_every_claimed_cell_runs_and_every_unclaimed_stage_is_refused(built, family):
    info = next(m for m in list_models() if m.family == family)
    for _, model, make in built[family]:
        inputs = make(batch=2, images=[1, 1])
        for stage in Stage:
            names = [n for kind in stage_kinds(stage).values() for n in kind]
            if stage not in info.stages:
                for name in names:
                    with pytest.raises(ValueError, match=family):
                        with torch.no_grad(), vtcompress.apply(model, _build(name)):
                            model(**inputs)
                continue
            for name in names:
                _runs(model, inputs, _build(name))
        trainable = trainable_methods()
        for name in trainable["any grid"]:
            _runs(model, inputs, _build(name))
        for name in trainable["grid-bound"]:  # weights for the first grid seen: others are refused, never resized
            try:
                _runs(model, inputs, _build(name))
            except ValueError as e:
                assert "build one for this grid" in str(e)
        for name in widening_methods():  # the stock LLM reads D-wide features: refused, naming the widths
            with pytest.raises(ValueError, match="changed the feature width|needs a grid divisible"):
                with torch.no_grad(), vtcompress.apply(model, _build(name)):
                    model(**inputs)


def test_table_rows_follow_the_registries():
    rows = support_rows()
    models = list_models()
    assert [r["family"] for r in rows] == [f"`{m.family}`" for m in models]
    n_decoder = sum(len(v) for v in stage_kinds(Stage.DECODER).values())
    for r, m in zip(rows, models, strict=True):
        assert r["status"] == m.status
        assert r[Stage.PROJECTOR] != "-" and r[Stage.DECODER].endswith(f"({n_decoder})")
        assert (r[Stage.ENCODER] == "-") == (Stage.ENCODER not in m.stages)
    md = support_markdown()
    assert md.count("\n| `") == len(models)
    for name in METHODS:
        assert f"`{name}`" in md  # every registered method is named under its stage and kind


def test_list_models_cli(capsys):
    from vtcompress.cli import main

    assert main(["list", "--models"]) == 0
    out = capsys.readouterr().out
    assert all(f"`{m.family}`" in out for m in list_models())
    assert main(["list", "--models", "--stage", "decoder"]) == 2
    assert "--models lists every model family" in capsys.readouterr().err
