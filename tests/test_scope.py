"""``apply(..., scope="model")``: one handle governs every thread's calls on the model (a server that applies once
at start-up and answers from a thread pool), until it is removed; the default scope is the calling context."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vtcompress
from models_util import BUILDERS
from test_guarantees import GEN, NormTopK


@pytest.fixture(scope="module")
def llava():
    return BUILDERS["llava"]()


@pytest.mark.parametrize("method", ["projector", "decoder", "both"])
def test_model_scope_governs_pool_threads(llava, method):
    model, make = llava
    inputs = make(batch=1, images=[1])
    methods = {"projector": [NormTopK(budget=0.25)], "decoder": [vtcompress.get("fastv", budget=0.25, layer=1)],
               "both": [NormTopK(budget=0.5), vtcompress.get("fastv", budget=0.5, layer=1)]}[method]
    with torch.no_grad():
        stock = model.generate(**inputs, **GEN)
        with vtcompress.apply(model, methods):
            here = model.generate(**inputs, **GEN)
            here_logits = model(**inputs).logits[:, -1]
        with ThreadPoolExecutor(2) as pool:  # default scope: a plain pool thread runs stock
            assert torch.equal(pool.submit(lambda: model.generate(**inputs, **GEN)).result(), stock)
        handle = vtcompress.apply(model, methods, scope="model")
        try:
            with ThreadPoolExecutor(2) as pool:
                outs = list(pool.map(lambda _: model.generate(**inputs, **GEN), range(4)))
                logits = list(pool.map(lambda _: model(**inputs).logits[:, -1], range(4)))
        finally:
            handle.remove()
        after = model.generate(**inputs, **GEN)
    assert not torch.equal(here_logits, model(**inputs).logits[:, -1])  # the method changes the answer's logits
    for o, lg in zip(outs, logits, strict=True):
        assert torch.equal(o, here)
        torch.testing.assert_close(lg, here_logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(after, stock) and "generate" not in vars(model)


def test_model_scope_refused_next_to_another_apply(llava):
    model, _ = llava
    with vtcompress.apply(model, NormTopK(budget=0.25)):
        with pytest.raises(ValueError, match="scope='model'"):
            vtcompress.apply(model, vtcompress.get("fastv", budget=0.5, layer=1), scope="model")
    handle = vtcompress.apply(model, NormTopK(budget=0.25), scope="model")
    try:
        with pytest.raises(ValueError, match="another apply"):
            vtcompress.apply(model, vtcompress.get("random", budget=0.5))
    finally:
        handle.remove()
    assert "generate" not in vars(model)
    with pytest.raises(ValueError, match="scope='everywhere'"):
        vtcompress.apply(model, "random", scope="everywhere")
