"""Shared helpers of the method tests: synthetic tokens with every signal, method classes, invariants."""

from __future__ import annotations

import torch

import vtcompress
from vtcompress import VisualTokens

#: selection methods: the output is a subset of the input tokens (size 1 each, x unchanged).
SELECT = {"random", "uniform", "fastervlm", "divprune"}
#: merging methods on any (ragged / pruned) tokens: every output token is a group of input tokens.
MERGE = {"tome", "visionzip", "prumerge", "prumerge_plus"}
#: merging methods that need a full grid; their count is h * w of ``output_grid``.
GRID = {"avg_pool", "max_pool", "bilinear", "pixel_unshuffle"}
#: methods whose full budget is not the identity (documented): adaptive count, fixed factor, learned weights.
NOT_IDENTITY = {"prumerge", "prumerge_plus", "pixel_unshuffle"}


def projector_methods() -> list[str]:
    """Every registered projector-stage method acting on images (trainable ones included; temporal methods act on
    clips: tests/test_temporal.py)."""
    temporal = set(vtcompress.list_methods(family="temporal"))
    return [n for n in vtcompress.list_methods(stage="projector") if n not in temporal]


def needs_grid(method) -> bool:
    return method.name in GRID or getattr(method, "trainable", False) or hasattr(method, "output_grid")


def make_tokens(
    b: int = 2, grid: tuple[int, int] = (6, 6), d: int = 8, counts: list[int] | None = None,
    seed: int = 0, dtype: torch.dtype = torch.float32, spikes: int = 3,
) -> VisualTokens:
    """Random tokens carrying ``cls_attn`` (a softmax with ``spikes`` outliers per row), ``keys`` and ``text``.

    ``counts`` gives valid tokens per row (ragged right padding); padded tokens get huge features and
    attention so that selecting one would show.
    """
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    x = torch.randn(b, n, d, generator=g)
    logits = torch.randn(b, n, generator=g) * 0.3
    if spikes:
        hot = torch.rand(b, n, generator=g).argsort(dim=1)[:, :spikes]
        logits.scatter_(1, hot, 4.0)
    mask = torch.ones(b, n, dtype=torch.bool)
    if counts is not None:
        mask = torch.arange(n)[None] < torch.tensor(counts)[:, None]
        x = torch.where(mask[..., None], x, torch.full_like(x, 1e4))
    cls_attn = logits.masked_fill(~mask, float("-inf")).softmax(-1)  # a softmax over each image's tokens
    cls_attn = torch.where(mask, cls_attn, torch.ones_like(cls_attn))  # padding: more than any real token
    keys = torch.randn(b, n, 5, generator=g)
    text = torch.randn(b, 3, d, generator=g)
    return VisualTokens.from_features(x.to(dtype), grid, mask=mask, cls_attn=cls_attn.to(dtype),
                                      keys=keys.to(dtype), text=text.to(dtype))


def expected_counts(method, tokens: VisualTokens) -> torch.Tensor:
    """``[B]`` documented output count of ``method`` on ``tokens``."""
    if method.name == "tome":
        return method.target_counts(tokens)
    if method.name in ("prumerge", "prumerge_plus"):
        return method.kept_counts(tokens)
    if needs_grid(method):
        h, w = method.output_grid(tokens.layout)
        return torch.full((tokens.batch_size,), h * w, dtype=torch.long)
    return method.keep_counts(tokens)


def check_invariants(inp: VisualTokens, out: VisualTokens) -> None:
    """The VisualTokens invariants every method keeps (see tokens.py), asserted exactly."""
    out.validate()
    b, n = out.mask.shape
    counts = out.counts
    # valid tokens first
    assert torch.equal(out.mask, torch.arange(n)[None] < counts[:, None])
    for r in range(b):
        c = int(counts[r])
        pos = out.pos[r, :c]
        # spatial order, one token per anchor patch
        assert bool((pos[1:] > pos[:-1]).all()), f"row {r}: pos not strictly ascending: {pos.tolist()}"
        # kept anchors were valid input patches
        assert bool((inp.assign[r, pos] >= 0).all())
        # provenance: every kept token owns its anchor patch, and exactly `size` patches
        assert torch.equal(out.assign[r, pos], torch.arange(c))
        a = out.assign[r]
        assert bool(((a >= -1) & (a < c)).all())
        owned = torch.bincount(a[a >= 0], minlength=c)[:c]
        torch.testing.assert_close(out.size[r, :c].double(), owned.double(), rtol=0, atol=1e-4)
        # patches dropped before stay dropped
        assert bool((a[inp.assign[r] < 0] == -1).all())


def assert_same_tokens(a: VisualTokens, b: VisualTokens, atol: float = 0.0) -> None:
    """Same valid tokens: features (to ``atol``), mask, pos, size, assign, and cls_attn / keys when carried."""
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.pos[a.mask], b.pos[b.mask])
    assert torch.equal(a.assign, b.assign)
    torch.testing.assert_close(a.size[a.mask], b.size[b.mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(a.x[a.mask], b.x[b.mask], rtol=0, atol=atol)
    for name in ("cls_attn", "keys"):
        ta, tb = getattr(a, name), getattr(b, name)
        if ta is not None and tb is not None:
            torch.testing.assert_close(ta[a.mask], tb[b.mask], rtol=0, atol=max(atol, 1e-6))
