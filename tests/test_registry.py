"""The public registry (METHODS, method_class, get), the stage / signal / query enums, the per-stage base classes and
the shared helpers that replaced per-module copies (keep_counts, budget_tokens, parse_params, flag_indices)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

import vtcompress
from vtcompress import VisualTokens
from vtcompress.compressor import (
    METHODS,
    SIGNALS,
    STAGES,
    Compressor,
    DecoderCompressor,
    EncoderCompressor,
    QueryKind,
    ScoreCompressor,
    Signal,
    SignalLayer,
    Stage,
    budget_tokens,
    keep_counts,
    method_class,
    params_for,
    parse_params,
    register,
)
from vtcompress.ops import flag_indices


def test_enums_are_their_strings():
    assert STAGES == ("encoder", "projector", "decoder") and SIGNALS == ("cls_attn", "keys", "text")
    for member in (*Stage, *Signal, *QueryKind, *SignalLayer):
        assert member == member.value and isinstance(member, str)
        assert hash(member) == hash(member.value) and member.value in {member} and member in {member.value}
        assert f"{member}" == str(member) == member.value and repr(member) == repr(member.value)
        assert json.dumps({"k": member}) == json.dumps({"k": member.value})
    assert Stage("decoder") is Stage.DECODER
    with pytest.raises(ValueError):
        Stage("decodr")


def test_every_method_declares_enums_and_subclasses_its_stage_base():
    bases = {Stage.ENCODER: EncoderCompressor, Stage.DECODER: DecoderCompressor, Stage.PROJECTOR: Compressor}
    assert set(METHODS) == set(vtcompress.list_methods()) and len(METHODS) >= 20
    for name, cls in METHODS.items():
        assert type(cls.stage) is Stage, name
        assert all(type(s) is Signal for s in cls.needs), name
        assert issubclass(cls, bases[cls.stage]), name
        if cls.stage != Stage.DECODER:
            assert not issubclass(cls, DecoderCompressor), name
        if cls.stage != Stage.ENCODER:
            assert not issubclass(cls, EncoderCompressor), name
        if issubclass(cls, DecoderCompressor):
            assert type(cls.query) is QueryKind and type(cls.signal_layer) is SignalLayer, name
        assert method_class(name) is cls


def test_encoder_base_fields_are_validated_for_every_encoder_method():
    for name in vtcompress.list_methods(stage="encoder"):
        m = vtcompress.get(name, budget=0.5)
        assert m.prop_attn is True and m.metric == "keys" and m.use_keys
        assert not vtcompress.get(name, metric="features").use_keys
        with pytest.raises(ValueError, match="metric='norm'"):
            vtcompress.get(name, metric="norm")
        with pytest.raises(ValueError, match="prop_attn must be a bool"):
            vtcompress.get(name, prop_attn=1)
        tokens = VisualTokens.from_features(torch.randn(1, 16, 8), grid=(4, 4), keys=torch.randn(1, 16, 3))
        assert m.metric_of(tokens) is tokens.keys
        assert vtcompress.get(name, metric="features").metric_of(tokens) is tokens.x


def test_method_class_and_the_read_only_registry():
    assert method_class("fastv").stage == "decoder"
    with pytest.raises(ValueError, match="unknown method 'tomee'.*did you mean 'tome'"):
        method_class("tomee")
    with pytest.raises(ValueError, match="unknown method 3"):
        method_class(3)
    assert "tome" in METHODS and "tomee" not in METHODS and METHODS.get("tomee") is None
    with pytest.raises(TypeError):
        METHODS["mine"] = Compressor  # type: ignore[index]


def test_register_turns_a_string_stage_and_needs_into_the_enums():
    @register
    @dataclass
    class _StringSpelled(ScoreCompressor):
        name = "test_string_spelled"
        family = "baseline"
        stage = "projector"
        needs = ("cls_attn", "depth")

        def score(self, tokens):
            return tokens.cls_attn

    try:
        assert _StringSpelled.stage is Stage.PROJECTOR
        assert _StringSpelled.needs[0] is Signal.CLS_ATTN and _StringSpelled.needs[1] == "depth"  # apply refuses it
        assert method_class("test_string_spelled") is _StringSpelled
    finally:
        import vtcompress.compressor as c

        c._METHODS.pop("test_string_spelled")


def _old_decoder_counts(budget, counts):
    """The rule the decoder stage had in its own copy: min(budget, n); round(f * n) >= 1 when n > 0."""
    if isinstance(budget, int):
        return counts.clamp(max=budget)
    k = torch.round(counts.to(torch.float64) * budget).to(torch.long)
    return torch.minimum(k.clamp(min=1), counts)


def test_one_budget_to_count_rule():
    counts = torch.tensor([0, 1, 5, 9, 16, 144])
    for budget in (1, 4, 16, 200, 0.05, 0.11, 0.25, 0.5, 1.0):
        assert torch.equal(keep_counts(budget, counts), _old_decoder_counts(budget, counts)), budget
    assert torch.equal(keep_counts(0.25, counts, 144), _old_decoder_counts(0.25, counts))
    with pytest.raises(ValueError, match="N=144"):
        keep_counts(200, counts, 144)
    for n in (1, 7, 144, 576):
        for budget in (1, 0.11, 0.25, 0.5, 1.0):
            assert budget_tokens(budget, n) == int(keep_counts(budget, torch.tensor([n]), n)[0])
    assert budget_tokens(0.25, 144) == 36 and budget_tokens(0.11, 144) == 16 and budget_tokens(0.001, 144) == 1
    with pytest.raises(ValueError, match="budget=0"):
        budget_tokens(0, 144)


def test_parse_params_grammar():
    got = parse_params(["layer=2", "fastv.layer=3", "layers=(1, 2)", "flag=true", "gone=null", "metric=keys",
                        "ratio=0.5", "grid=[2,2]", "pretrained=False"])
    assert got == {"layer": 2, "fastv.layer": 3, "layers": (1, 2), "flag": True, "gone": None, "metric": "keys",
                   "ratio": 0.5, "grid": [2, 2], "pretrained": False}
    for bad in ("layer", "=2", ".layer=2", "fastv.=2"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_params([bad])
    fields = {f.name for f in dataclasses.fields(method_class("fastv"))}
    assert params_for(got, "fastv", fields) == {"layer": 3}
    assert params_for({"budget": 0.5, "tome.r": 4}, "tome") == {"budget": 0.5, "r": 4}


def test_flag_indices_is_each_rows_nonzero():
    gen = torch.Generator().manual_seed(0)
    flag = torch.rand(5, 13, generator=gen) < 0.4
    flag[2] = False
    idx, valid = flag_indices(flag)
    assert idx.shape == valid.shape == (5, int(flag.sum(1).max()))
    for row in range(5):
        want = flag[row].nonzero().squeeze(1)
        assert torch.equal(idx[row][valid[row]], want) and int(valid[row].sum()) == len(want)
        assert bool((idx[row][~valid[row]] == 0).all())
    idx, valid = flag_indices(torch.zeros(0, 4, dtype=torch.bool))
    assert idx.shape == (0, 0)


def test_train_config_defaults_are_the_cli_defaults(monkeypatch):
    from vtcompress.testbed import cli as train_cli
    from vtcompress.testbed.train import TrainConfig

    seen = []
    monkeypatch.setattr(train_cli, "train_testbed", lambda cfg: seen.append(cfg) or {})
    train_cli.train_main([])
    train_cli.train_main(["--steps-s2", "5", "--lr-s4", "0.1"])
    assert seen[0] == TrainConfig()
    assert seen[1].steps == (0, 5, 0, 0) and seen[1].lr[3] == 0.1 and seen[1].minutes == TrainConfig().minutes


def test_load_model_specs(tmp_path):
    from vtcompress.loading import load_model

    assert load_model("none") is None
    with pytest.raises(ValueError, match="expected 'testbed', 'none' or a local directory"):
        load_model(str(tmp_path / "missing"))
