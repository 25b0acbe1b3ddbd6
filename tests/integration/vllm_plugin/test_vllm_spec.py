"""The per-request spec of the vLLM plugin: resolution, validation, the placeholder count, the wire format."""

from __future__ import annotations

import pytest
import torch

import vtcompress
from vtcompress import VisualTokens
from vtcompress.integrations.vllm.spec import BUDGET_KEY, METHOD_KEY, RequestSpec, decode, encode, kept_count, resolve


def test_request_keys_override_the_server_default():
    default = {"method": "visionzip", "budget": 0.25}
    assert resolve(default, None) == RequestSpec("visionzip", 0.25)
    assert resolve(default, {BUDGET_KEY: 64}) == RequestSpec("visionzip", 64)
    assert resolve(default, {METHOD_KEY: "tome", BUDGET_KEY: "0.5"}) == RequestSpec("tome", 0.5)
    assert resolve(None, None) == RequestSpec(None)
    assert resolve(None, {"unrelated": 1}) == RequestSpec(None)


@pytest.mark.parametrize(("default", "request_kwargs", "match"), [
    (None, {BUDGET_KEY: 0.5}, "without a method"),
    ({"method": "tome", "budgett": 1}, None, "unknown key"),
    (None, {METHOD_KEY: "tome", BUDGET_KEY: -3}, "out of range"),
    (None, {METHOD_KEY: "tome", BUDGET_KEY: True}, "budget must be"),
    (None, {METHOD_KEY: 3, BUDGET_KEY: 0.5}, "method name"),
    (None, {METHOD_KEY: "tomee", BUDGET_KEY: 0.5}, "did you mean 'tome'"),
    (None, {METHOD_KEY: "pyramiddrop", BUDGET_KEY: 0.5}, "paged KV cache"),
    (None, {METHOD_KEY: "prumerge_plus", BUDGET_KEY: 0.5}, "content-dependent"),
])
def test_bad_values_raise_one_clear_error(default, request_kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve(default, request_kwargs)


@pytest.mark.parametrize("spec", [RequestSpec(None), RequestSpec("tome", 0.33), RequestSpec("divprune", 64),
                                  RequestSpec("prumerge_plus", 1.0), RequestSpec("visionzip", 1e-3)])
def test_wire_format_round_trips(spec):
    assert decode(encode(spec)) == spec


@pytest.mark.parametrize(("method", "budget"), [("visionzip", 0.25), ("tome", 0.1), ("divprune", 50),
                                                ("avg_pool", 0.25), ("uniform", 0.3), ("fastervlm", 1.0)])
def test_kept_count_is_what_the_method_keeps(method, budget):
    """The placeholder count fixed at processing time equals the count the method keeps of real-looking tokens."""
    grid = (12, 16)
    n = kept_count(RequestSpec(method, budget), grid)
    x = torch.randn(2, grid[0] * grid[1], 32)
    attn = torch.rand(2, grid[0] * grid[1]).softmax(-1)
    out = vtcompress.get(method, budget=budget)(VisualTokens.from_features(x, grid, cls_attn=attn, keys=x))
    assert out.counts.tolist() == [n, n]


def test_kept_count_refuses_content_dependent_counts():
    with pytest.raises(ValueError, match="content-dependent"):
        kept_count(RequestSpec("prumerge", 0.5), (12, 12))

