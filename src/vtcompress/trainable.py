"""Trainable compressors: the shared machinery behind the learned projector replacements.

A :class:`TrainableCompressor` is a registered :class:`~vtcompress.compressor.Compressor` that is also a
``torch.nn.Module``: it holds weights, maps the projected visual features ``[B, N, D]`` (``D`` = the LLM
hidden size, so it plugs into the same apply path as the training-free methods) to a FIXED number of
tokens per image, and is saved / loaded as a local directory::

    <dir>/config.json        {"method": ..., "fields": {budget, hidden_size, grid, ...}, "format_version": 1}
    <dir>/model.safetensors  the weights (float32)

Training: ``vtcompress testbed train-compressor METHOD --budget B`` (:mod:`vtcompress.testbed.train_compressor`).
Checkpoints trained on the embedded testbed ship in ``vtcompress/trained/<method>-<budget>/``: list them with
:func:`trained_checkpoints`, load one with :func:`load_trained` ``(method, budget)`` or
``Compressor.from_pretrained("qformer-0.25")``; they fit the testbed only (its hidden size 128, 12x12 grid).

Untrained weights never pass for trained ones: constructing a trainable compressor (``get("qformer")``,
``QFormer(...)``) raises unless it is loaded from a checkpoint (:func:`from_pretrained`, :func:`load_trained`)
or random initialisation is asked for explicitly with ``pretrained=False`` (to train it, or to study an
untrained module); such a module reports ``untrained = True`` and the bench / ``vtcompress show`` mark it.

Random weights are created when both ``hidden_size`` (``D``) and ``grid`` (the input patch grid ``(H, W)``) are
known: pass them at construction, or leave them ``None`` and the first call builds the weights from the
input (deterministically, from ``seed``). The output layout ``(h, w)`` is fixed at build time from the
budget and the grid (:func:`grid_for_budget`), so a checkpoint always produces the same token count.

Bookkeeping (``pos`` / ``size`` / ``assign``): every trainable method here produces one token per cell of a
regular ``(h, w)`` partition of the input grid (:func:`cell_partition`). Pooling-like methods (pixel
unshuffle + MLP, LDPv2) really are functions of their cell; query-based resamplers (Q-Former, Perceiver)
seed query ``i`` with the mean of cell ``i`` but attend to every patch, so for them the cell is a NOMINAL
provenance (``spatial = False``): ``size`` is the cell's patch count (``~N0 / M``, summing to ``N0``),
``pos`` its top-left patch (evenly spaced anchors in raster order) and ``assign`` the cell.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compressor import Compressor, check_budget
from .tokens import VisualTokens

__all__ = [
    "TrainableCompressor",
    "grid_for_budget",
    "cell_partition",
    "cell_merge",
    "save_pretrained",
    "from_pretrained",
    "trained_checkpoints",
    "load_trained",
    "TRAINED_DIR",
    "untrained_message",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
#: checkpoints shipped with the package: ``trained/<method>-<budget>/``.
TRAINED_DIR = Path(__file__).resolve().parent / "trained"
#: set while :func:`from_pretrained` constructs a compressor whose weights it is about to load.
_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("vtcompress_loading", default=False)


def untrained_message(name: str, budget: object = None) -> str:
    """The error for a trainable method built without weights: what is shipped, how to load or train one."""
    shipped = [f"{m}-{b}" for m, b, _ in trained_checkpoints() if m == name]
    at = f" at budget={budget!r}" if budget is not None else ""
    return (
        f"{name!r}{at} has learned weights and none were given; vtcompress does not silently use random ones. "
        f"Load trained weights: Compressor.from_pretrained(DIR) (a checkpoint written by save_pretrained) or "
        f"vtcompress.trainable.load_trained({name!r}, BUDGET) for a shipped checkpoint "
        f"({', '.join(shipped) or 'none shipped'}; trained on the embedded testbed only: hidden size 128, 12x12 "
        f"grid); train one with `vtcompress testbed train-compressor {name} --budget B` (testbed) or your own "
        f"loop; or pass pretrained=False to get randomly initialised, UNTRAINED weights (e.g. to train them)"
    )


# ------------------------------------------------------------------------------------------ layout helpers
def grid_for_budget(budget: int | float, grid: tuple[int, int]) -> tuple[int, int]:
    """Output grid ``(h, w)`` for ``budget`` on an input ``grid (H, W)``.

    ``k`` is the budget in tokens (``round(budget * N0)`` for a fraction, as
    :func:`~vtcompress.compressor.keep_counts`);
    ``(h, w)`` is the grid with ``h <= H``, ``w <= W`` whose ``h * w`` is closest to ``k``, ties broken towards
    the input's aspect ratio, then the smaller ``h``: 12x12 at 0.25 -> 6x6 (36), at 0.11 -> 4x4 (16), at 20 -> 4x5.
    """
    check_budget(budget)
    hh, ww = int(grid[0]), int(grid[1])
    n0 = hh * ww
    k = budget if isinstance(budget, int) else max(1, round(budget * n0))
    if k > n0:
        raise ValueError(f"budget={budget} tokens is out of range: the grid {grid} has N0={n0} patches")
    best = None
    for h in range(1, hh + 1):  # at most H candidates: a handful of scalar steps, not a loop over tokens
        w = min(ww, max(1, round(k / h)))
        key = (abs(h * w - k), abs(math.log(h / w) - math.log(hh / ww)), h)
        if best is None or key < best[0]:
            best = (key, (h, w))
    return best[1]


def cell_partition(layout: tuple[int, int], out: tuple[int, int], device=None) -> Tensor:
    """``[N]`` long: the cell (raster index in ``out (h, w)``) of each token of a ``layout (H, W)`` grid.

    Row ``r`` goes to cell row ``floor(r * h / H)`` (same for columns): a partition into contiguous blocks
    that every cell meets (``h <= H``). For ``H % h == 0`` it is the ``H / h`` block partition of pooling.
    """
    (hh, ww), (h, w) = layout, out
    rows = torch.arange(hh, device=device) * h // hh
    cols = torch.arange(ww, device=device) * w // ww
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def cell_merge(tokens: VisualTokens, cells: Tensor, out: tuple[int, int]) -> VisualTokens:
    """Merge the tokens of a full grid by ``cells [N]`` (from :func:`cell_partition`) into ``out (h, w)`` tokens.

    Every field follows (``x`` becomes the size-weighted cell mean, ``size`` the cell's patch count,
    ``assign`` the cell, ``pos`` the cell's first token in raster order) through the shared
    :meth:`VisualTokens.merge`. Requires a full grid: ``tokens.layout`` set and every token valid.
    """
    require_full_grid(tokens, "cell_merge")
    b, n = tokens.mask.shape
    m = out[0] * out[1]
    dest = cells.to(tokens.x.device).expand(b, n)
    # each cell keeps its lowest token index as anchor: cells are raster-ordered blocks, so anchors ascend
    first = torch.full((m,), n, dtype=torch.long, device=dest.device)
    first = first.scatter_reduce(0, cells.to(dest.device), torch.arange(n, device=dest.device), reduce="amin")
    return tokens.merge(dest, first.expand(b, m), layout=out)


def require_full_grid(tokens: VisualTokens, what: str) -> tuple[int, int]:
    """The ``layout (h, w)`` of ``tokens``; ``ValueError`` if they no longer form a full regular grid."""
    if tokens.layout is None:
        raise ValueError(
            f"{what} needs tokens that form a full regular grid (tokens.layout set); got layout=None "
            "(tokens already pruned, or a packed anyres layout): apply it to the full patch grid"
        )
    if not bool(tokens.mask.all()):
        raise ValueError(f"{what} needs every token of the {tokens.layout} grid valid; got {int((~tokens.mask).sum())} "
                         "masked token(s)")
    return tokens.layout


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
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "pretrained"}

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


# ------------------------------------------------------------------------------------------ checkpoints
def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def save_pretrained(compressor: Compressor, path: str | os.PathLike) -> Path:
    """Write ``compressor`` to the local directory ``path``: ``config.json`` (+ ``model.safetensors`` if trainable).

    A trainable compressor must be built (weights exist) first. Returns the directory.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(compressor, TrainableCompressor):
        if not compressor.built:
            raise ValueError(
                f"{compressor.name} has no weights yet (hidden_size={compressor.hidden_size}, grid={compressor.grid}): "
                "pass hidden_size and grid, or call it once on features, before save_pretrained"
            )
        fields = compressor.config()
    else:
        fields = {f.name: _jsonable(getattr(compressor, f.name)) for f in dataclasses.fields(compressor)}
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"method": compressor.name, "format_version": FORMAT_VERSION, "fields": fields}
    if isinstance(compressor, TrainableCompressor):
        cfg["out_grid"] = list(compressor.out_grid)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in compressor.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "method": compressor.name})
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    shipped = TRAINED_DIR / str(path)
    if not p.is_absolute() and (shipped / CONFIG_NAME).is_file():
        return shipped
    names = ", ".join(f"{m}-{b}" for m, b, _ in trained_checkpoints()) or "none"
    raise ValueError(
        f"no checkpoint at {str(path)!r} (a local directory with {CONFIG_NAME} is needed; nothing is downloaded); "
        f"shipped checkpoints: {names}"
    )


def from_pretrained(path: str | os.PathLike, budget: int | float | None = None, hidden_size: int | None = None,
                    device: str | torch.device | None = None, expect_cls: type | None = None) -> Compressor:
    """Load a compressor saved by :func:`save_pretrained` from a local directory (or a shipped name such as
    ``"qformer-0.25"``).

    ``budget`` / ``hidden_size``, when given, are what the caller needs: a checkpoint for another value raises a
    ``ValueError`` naming both. The loaded module is in eval mode.
    """
    from safetensors.torch import load_file

    from .compressor import _REGISTRY, _load_builtin_methods

    p = _resolve(path)
    cfg = json.loads((p / CONFIG_NAME).read_text())
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p / CONFIG_NAME}: format_version={cfg.get('format_version')!r}; this vtcompress reads "
                         f"{FORMAT_VERSION}")
    _load_builtin_methods()
    name = cfg.get("method")
    if name not in _REGISTRY:
        raise ValueError(f"{p}: unknown method {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    if expect_cls is not None and expect_cls not in (Compressor, TrainableCompressor) and cls is not expect_cls:
        raise ValueError(f"{p} holds a {name!r} checkpoint, not {getattr(expect_cls, 'name', expect_cls.__name__)!r}")
    fields = dict(cfg["fields"])
    for k, v in fields.items():
        if isinstance(v, list):
            fields[k] = tuple(v)
    if budget is not None and (budget != fields.get("budget") or type(budget) is not type(fields.get("budget"))):
        raise ValueError(
            f"checkpoint {p} was trained for budget={fields.get('budget')!r}, but budget={budget!r} was asked for: "
            "train one for that budget (vtcompress testbed train-compressor METHOD --budget B)"
        )
    if hidden_size is not None and "hidden_size" in fields and hidden_size != fields["hidden_size"]:
        raise ValueError(
            f"checkpoint {p} was trained for hidden size D={fields.get('hidden_size')}, but D={hidden_size} was "
            "asked for: a checkpoint only fits models with the hidden size it was trained on"
        )
    fields.pop("pretrained", None)
    token = _LOADING.set(True)
    try:
        comp = cls(**fields)
    finally:
        _LOADING.reset(token)
    if isinstance(comp, TrainableCompressor):
        state = load_file(str(p / WEIGHTS_NAME))
        comp.load_state_dict(state, strict=True)
        comp.eval()
        if device is not None:
            comp.to(device)
    return comp


def trained_checkpoints() -> list[tuple[str, int | float, Path]]:
    """Shipped checkpoints as ``(method, budget, directory)``, sorted."""
    out = []
    if TRAINED_DIR.is_dir():
        for d in sorted(TRAINED_DIR.iterdir()):
            cfg_path = d / CONFIG_NAME
            if cfg_path.is_file():
                cfg = json.loads(cfg_path.read_text())
                out.append((cfg["method"], cfg["fields"]["budget"], d))
    return out


def load_trained(method: str, budget: int | float, device: str | torch.device | None = None) -> Compressor:
    """The shipped testbed checkpoint of ``method`` at ``budget`` (``ValueError`` listing what is shipped)."""
    for m, b, d in trained_checkpoints():
        if m == method and b == budget and type(b) is type(budget):
            return from_pretrained(d, device=device)
    names = ", ".join(f"{m}@{b}" for m, b, _ in trained_checkpoints()) or "none"
    raise ValueError(f"no shipped checkpoint for method={method!r} at budget={budget!r}; shipped: {names}")
