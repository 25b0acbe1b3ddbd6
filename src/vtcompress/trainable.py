"""Trainable compressors: the shared machinery behind the learned projector replacements.

A :class:`TrainableCompressor` is a registered :class:`~vtcompress.compressor.Compressor` that is also a
``torch.nn.Module``: it holds weights, maps the projected visual features ``[B, N, D]`` (``D`` = the LLM
hidden size, so it plugs into the same apply path as the training-free methods) to a FIXED number of
tokens per image, and is saved / loaded as a local directory by :mod:`vtcompress.checkpoints`.

Training: ``vtcompress testbed train-compressor METHOD --budget B`` (:mod:`vtcompress.testbed.train_compressor`).
Checkpoints trained on the embedded testbed ship in ``vtcompress/trained/<method>-<budget>/``
(:func:`vtcompress.checkpoints.load_trained`, ``Compressor.from_pretrained("qformer-0.25")``); they fit the
testbed only (its hidden size 128, 12x12 grid).

Untrained weights never pass for trained ones: constructing a trainable compressor (``get("qformer")``,
``QFormer(...)``) raises unless it is loaded from a checkpoint (inside :func:`loading_checkpoint`, as
:func:`vtcompress.checkpoints.from_pretrained` does) or random initialisation is asked for explicitly with
``pretrained=False`` (to train it, or to study an untrained module); such a module reports ``untrained = True``
and the bench / ``vtcompress show`` mark it.

Random weights are created when both ``hidden_size`` (``D``) and ``grid`` (the input patch grid ``(H, W)``) are
known: pass them at construction, or leave them ``None`` and the first call builds the weights from the
input (deterministically, from ``seed``). The output layout ``(h, w)`` is fixed at build time from the
budget and the grid (:func:`vtcompress.grid.grid_for_budget`), so a checkpoint always produces the same token
count.

Bookkeeping (``pos`` / ``size`` / ``assign``): every trainable method here produces one token per cell of a
regular ``(h, w)`` partition of the input grid (:func:`vtcompress.grid.cell_partition`). Pooling-like methods
(pixel unshuffle + MLP, LDPv2) really are functions of their cell; query-based resamplers (Q-Former, Perceiver)
seed query ``i`` with the mean of cell ``i`` but attend to every patch, so for them the cell is a NOMINAL
provenance (``spatial = False``): ``size`` is the cell's patch count (``~N0 / M``, summing to ``N0``),
``pos`` its top-left patch (evenly spaced anchors in raster order) and ``assign`` the cell.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compressor import Compressor
from .grid import cell_merge, cell_partition, grid_for_budget, require_full_grid
from .tokens import VisualTokens

__all__ = [
    "TrainableCompressor",
    "Attention",
    "FeedForward",
    "zero_",
    "loading_checkpoint",
    "untrained_message",
]

#: set while a checkpoint loader constructs a compressor whose weights it is about to load.
_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("vtcompress_loading", default=False)


@contextlib.contextmanager
def loading_checkpoint() -> Iterator[None]:
    """Inside this block a trainable compressor may be built with ``pretrained=True`` and no weights: the caller
    (:func:`vtcompress.checkpoints.from_pretrained`) loads them right after construction."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def untrained_message(name: str, budget: object = None) -> str:
    """The error for a trainable method built without weights: what is shipped, how to load or train one."""
    from .checkpoints import trained_checkpoints  # the loader builds compressors of this module

    shipped = [f"{m}-{b}" for m, b, _ in trained_checkpoints() if m == name]
    at = f" at budget={budget!r}" if budget is not None else ""
    return (
        f"{name!r}{at} has learned weights and none were given; vtcompress does not silently use random ones. "
        f"Load trained weights: Compressor.from_pretrained(DIR) (a checkpoint written by save_pretrained) or "
        f"vtcompress.checkpoints.load_trained({name!r}, BUDGET) for a shipped checkpoint "
        f"({', '.join(shipped) or 'none shipped'}; trained on the embedded testbed only: hidden size 128, 12x12 "
        f"grid); train one with `vtcompress testbed train-compressor {name} --budget B` (testbed) or your own "
        f"loop; or pass pretrained=False to get randomly initialised, UNTRAINED weights (e.g. to train them)"
    )


# ------------------------------------------------------------------------------------------ layers
def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias: a residual branch that starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ------------------------------------------------------------------------------------------ the base class
@dataclass(eq=False)
class TrainableCompressor(Compressor, nn.Module):
    """A compressor with weights: a ``Compressor`` (config, registry, validation) AND an ``nn.Module``.

    Fields (besides ``budget``):
        hidden_size: ``D`` of the features it compresses (the LLM hidden size); ``None`` = from the first input.
        grid: the input patch grid ``(H, W)`` the output layout is built for; ``None`` = from the first input.
        seed: seed of the weight initialisation (weights are identical for equal seeds).

    Subclasses implement :meth:`build` (create the layers for ``D`` and the input grid) and
    :meth:`transform` (the differentiable map); the base class handles lazy building, dtype / device,
    the ``D`` and grid checks, and checkpoints. Initialisations start each method at (or next to) plain
    average pooling of its cells, so a few hundred training steps already help.
    """

    hidden_size: int | None = None
    grid: tuple[int, int] | None = None
    seed: int = 0
    #: ``True`` (default): weights must come from a checkpoint (:func:`from_pretrained`); constructing one any
    #: other way raises. ``False``: random initialisation from ``seed``, marked untrained.
    pretrained: bool = True

    trainable: ClassVar[bool] = True
    matches_reference: ClassVar[str] = "n/a (trainable)"
    #: no reference to follow: the positions the shipped checkpoints were trained with (training and evaluation
    #: both go through ``vtcompress.apply``, so a checkpoint always sees the positions it was trained on)
    positions: ClassVar[str] = "original"
    #: False for resamplers whose output tokens are not functions of one image region (provenance nominal).
    spatial: ClassVar[bool] = True
    #: True when weights depend on the output count (learned queries): then the input grid must match ``grid``.
    grid_bound: ClassVar[bool] = False

    # dataclass(eq=True) on Compressor set __hash__ = None; modules must hash by identity (named_modules etc.)
    __hash__ = nn.Module.__hash__
    __eq__ = object.__eq__

    def __post_init__(self) -> None:
        nn.Module.__init__(self)  # plain fields were set before; parameters and submodules come after this
        super().__post_init__()
        hs = self.hidden_size
        if hs is not None and (isinstance(hs, bool) or not isinstance(hs, int) or hs < 1):
            raise ValueError(f"hidden_size must be a positive int (the LLM hidden size D) or None; got {hs!r}")
        if self.grid is not None:
            g = tuple(self.grid)
            if len(g) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g):
                raise ValueError(f"grid must be (H, W) with positive ints or None; got {self.grid!r}")
            self.grid = (int(g[0]), int(g[1]))
        self.check_fields()
        if not isinstance(self.pretrained, bool):
            raise ValueError(f"pretrained must be a bool; got {self.pretrained!r}")
        if self.pretrained and not _LOADING.get():
            raise ValueError(untrained_message(self.name, self.budget))
        self.out_grid: tuple[int, int] | None = None
        if self.hidden_size is not None and self.grid is not None:
            self._build_now(torch.device("cpu"))

    @property
    def untrained(self) -> bool:
        """True for randomly initialised weights (``pretrained=False``), False for weights from a checkpoint."""
        return not self.pretrained

    @contextlib.contextmanager
    def _internal(self):
        """Field assignments inside (lazy build) are the machinery's own, not a user's: not re-checked."""
        depth = self.__dict__.get("_vtc_depth", 0)
        object.__setattr__(self, "_vtc_depth", depth + 1)
        try:
            yield
        finally:
            object.__setattr__(self, "_vtc_depth", depth)

    def _check_assignment(self, name: str, value) -> None:
        if getattr(self, name) == value and type(getattr(self, name)) is type(value):
            return
        if name == "pretrained":
            raise ValueError(f"{self.name}.pretrained is fixed at construction: load trained weights with "
                             "from_pretrained / load_trained, or build with pretrained=False")
        if self.built:
            raise ValueError(f"{self.name}.{name} = {value!r}: the weights were built for {name}="
                             f"{getattr(self, name)!r} (grid {self.grid} -> {self.out_grid}); build a new compressor")
        try:
            with self._internal():
                dataclasses.replace(self, **{name: value, "pretrained": False})
        except ValueError as exc:
            raise ValueError(f"{self.name}.{name} = {value!r} is invalid: {exc}") from None

    # --- subclass API ---------------------------------------------------------------------------
    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The ``(h, w)`` output layout for an input ``grid`` (default: :func:`grid_for_budget`)."""
        return grid_for_budget(self.budget, grid)

    def check_fields(self) -> None:
        """Validate the subclass's own hyper-parameters (``ValueError`` naming the bad value)."""

    def partition(self, layout: tuple[int, int], out: tuple[int, int], device=None) -> Tensor:
        """``[N]`` long: the cell of ``out`` of each token of a ``layout`` grid (default :func:`cell_partition`)."""
        return cell_partition(layout, out, device)

    def build(self, d: int) -> None:  # pragma: no cover - abstract
        """Create the layers for feature size ``d``; ``self.grid`` and ``self.out_grid`` are set."""
        raise NotImplementedError

    def transform(self, tokens: VisualTokens, cells: VisualTokens) -> Tensor:  # pragma: no cover - abstract
        """Output features ``[B, M, D]`` (parameter dtype) from the input ``tokens`` (``x`` already in the
        parameter dtype / device, a full ``layout`` grid) and their cells ``cells`` (``M = h * w`` tokens whose
        ``x`` is the size-weighted cell mean; :meth:`pool` gives the cell means of any other per-token values)."""
        raise NotImplementedError

    def pool(self, tokens: VisualTokens, values: Tensor) -> Tensor:
        """Size-weighted cell means ``[B, M, C]`` of per-token ``values [B, N, C]`` (same cells as ``compress``)."""
        out = self.output_grid(tuple(tokens.layout))
        return cell_merge(tokens.replace(x=values, keys=None, cls_attn=None),
                          self.partition(tokens.layout, out, values.device), out).x

    # --- machinery ------------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.out_grid is not None

    def _build_now(self, device: torch.device) -> None:
        with self._internal():
            self.out_grid = self.output_grid(self.grid)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.build(self.hidden_size)
        self.to(device)

    def _check_input(self, tokens: VisualTokens) -> tuple[int, int]:
        """Build on first use; check ``D`` (and the grid, for grid-bound weights). Returns the output grid."""
        d = tokens.x.shape[-1]
        layout = tuple(tokens.layout)
        if not self.built:
            with self._internal():
                self.hidden_size = self.hidden_size or d
                self.grid = self.grid or layout
            self._build_now(tokens.x.device)
        if d != self.hidden_size:
            raise ValueError(
                f"{self.name} was built for hidden size D={self.hidden_size}, but the features have D={d}: "
                "use a checkpoint trained for this model's hidden size"
            )
        out = self.output_grid(layout)
        if self.grid_bound and out != self.out_grid:
            raise ValueError(
                f"{self.name} (budget={self.budget}) has weights for {self.out_grid[0] * self.out_grid[1]} output "
                f"tokens (grid {self.grid} -> {self.out_grid}), but grid {layout} needs {out[0] * out[1]} "
                f"({out}): build one for this grid"
            )
        return out

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        """``[B, N, D]`` tokens of a full grid -> ``[B, h*w, D]`` tokens, ``(h, w)`` from :meth:`output_grid`."""
        layout = require_full_grid(tokens, self.name)
        out_grid = self._check_input(tokens)
        p = next(self.parameters())
        work = tokens.replace(x=tokens.x.to(device=p.device, dtype=p.dtype))
        cells = cell_merge(work, self.partition(layout, out_grid, p.device), out_grid)
        y = self.transform(work, cells)
        out = cells.replace(x=y).to(device=tokens.x.device)
        return out.replace(x=out.x.to(tokens.x.dtype))

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        return self.compress(tokens)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"

    def config(self) -> dict[str, Any]:
        """The JSON config of this compressor (every dataclass field but ``pretrained``: a loaded checkpoint
        is pretrained by definition)."""
        from .checkpoints import jsonable  # the checkpoint module builds compressors of this one

        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "pretrained"}

    # save_pretrained / from_pretrained: inherited from Compressor (they delegate to the functions below)


# ------------------------------------------------------------------------------------------ shared layers
class Attention(nn.Module):
    """Multi-head attention of queries ``[B, M, D]`` over keys / values ``[B, S, D]`` with SDPA.

    ``key_mask [B, S]`` bool marks valid keys. The output projection starts at zero so that a residual
    block ``q + Attention(q, kv)`` is the identity at initialisation.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"hidden size D={d} is not divisible by num_heads={heads}; pick a divisor of {d}")
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = zero_(nn.Linear(d, d))

    def forward(self, q: Tensor, kv: Tensor, key_mask: Tensor | None = None) -> Tensor:
        b, m, d = q.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, -1, h, d // h).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(kv)), split(self.v(kv)), attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, m, d))


class FeedForward(nn.Module):
    """``Linear -> GELU -> Linear`` with the last layer zero-initialised (identity residual at start)."""

    def __init__(self, d: int, mult: int = 4, d_in: int | None = None, d_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_in or d, mult * d)
        self.fc2 = zero_(nn.Linear(mult * d, d_out or d))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
