"""`Compressor`, `ScoreCompressor` and the method registry.

Every method is a typed dataclass, validated in ``__post_init__``, registered by name, and maps
:class:`~vtcompress.tokens.VisualTokens` to fewer :class:`~vtcompress.tokens.VisualTokens`.

One budget language for all methods: an ``int`` is the number of tokens kept per image, a ``float`` in
``(0, 1]`` the fraction kept (``1.0`` keeps everything). Methods whose output count is fixed by their
structure (pooling strides, pixel unshuffle, adaptive outlier rules) document the count they produce.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .tokens import VisualTokens

__all__ = [
    "Compressor",
    "ScoreCompressor",
    "register",
    "get",
    "list_methods",
    "method_info",
    "STAGES",
    "FAMILIES",
    "check_budget",
    "parse_budget",
    "keep_counts",
]

STAGES = ("encoder", "projector", "decoder")
FAMILIES = ("transformation", "similarity", "attention", "query", "baseline")
SIGNALS = ("cls_attn", "keys", "text")

_REGISTRY: dict[str, type[Compressor]] = {}


def check_budget(budget: int | float) -> None:
    """Raise ``ValueError`` unless ``budget`` is an int >= 1 or a float in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(
            f"budget must be an int (tokens kept per image, >= 1) or a float in (0, 1] (fraction kept); "
            f"got {budget!r} of type {type(budget).__name__}"
        )
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget={budget} tokens is out of range: an int budget must be >= 1")
    elif not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"budget={budget} is out of range: a float budget is a fraction in (0, 1]")


def parse_budget(text: str, what: str = "--budget") -> int | float:
    """A budget from command-line text: ``"64"`` -> 64 tokens, ``"0.25"`` -> a fraction; validated."""
    try:
        budget: int | float = int(text)
    except ValueError:
        try:
            budget = float(text)
        except ValueError:
            raise ValueError(
                f"{what} {text!r} is not a number: give an int (tokens kept) or a fraction in (0, 1]"
            ) from None
    check_budget(budget)
    return budget


def keep_counts(budget: int | float, counts: Tensor, num_tokens: int) -> Tensor:
    """Tokens to keep per image, ``[B]`` long, for valid-token ``counts [B]`` out of ``num_tokens`` per row.

    An int budget larger than ``num_tokens`` raises; a row with fewer valid tokens than the budget keeps
    them all. A fraction keeps ``round(fraction * count)``, at least one token.
    """
    check_budget(budget)
    if isinstance(budget, int):
        if budget > num_tokens:
            raise ValueError(f"budget={budget} tokens is out of range: the images have N={num_tokens} tokens")
        return counts.clamp(max=budget).to(torch.long)
    k = torch.round(counts.to(torch.float64) * budget).to(torch.long)
    return torch.minimum(k.clamp(min=1), counts.to(torch.long))


@dataclass
class Compressor:
    """Base class of every method: ``VisualTokens -> VisualTokens``.

    Subclasses set the class attributes below, add typed hyper-parameters as dataclass fields
    (validated in ``__post_init__``, calling ``super().__post_init__()``), and implement :meth:`compress`.

    A field assigned after construction (``m.budget = 0``) is checked by the same rules as at construction (a
    trial copy runs every ``__post_init__``): a bad value raises ``ValueError`` and is not stored. A method is
    applied to a model with ``vtcompress.apply(model, method)``; calling it on a model or entering it with
    ``with method:`` raises saying so.
    """

    budget: int | float = 0.5

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    stage: ClassVar[str] = "projector"
    paper: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    #: signals the method reads from :class:`VisualTokens` (``cls_attn``, ``keys``, ``text``).
    needs: ClassVar[tuple[str, ...]] = ()
    #: how the default matches the authors' reference code: ``"exact"``, ``"equivalent"``, ``"deviation: ..."``,
    #: ``"n/a (baseline)"``; printed by ``vtcompress list`` and backed by ``tests/reference/``.
    matches_reference: ClassVar[str] = ""
    #: the LLM positions of the reference (``vtcompress.apply(..., positions=None)`` uses it): ``"compact"``
    #: (the LLaVA code base feeds fewer tokens, renumbered contiguously: projector / encoder-stage references)
    #: or ``"original"`` (kept tokens keep their positions, as FastV's reference). M-RoPE models keep their 3-D
    #: grid positions whatever this says.
    positions: ClassVar[str] = "compact"
    #: where the method acts on a stock VLM (its reference's point): ``"projected"`` (the features after the
    #: multimodal projector) or ``"vision"`` (the vision tower's selected-layer features, before the projector;
    #: see :mod:`vtcompress.models.apply`). Methods with an ``acts_on`` field let the user choose.
    acts_on: ClassVar[str] = "projected"
    #: how the vision-tower attention signal pools heads: ``"mean"`` (head-mean attention, head-mean keys) or
    #: ``"full"`` (one full-width head: ``q . k`` over all channels scaled by ``C^-1/2``, keys of all heads
    #: concatenated, as PruMerge's reference). Methods with a ``signal_heads`` field let the user choose.
    signal_heads: ClassVar[str] = "mean"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_vtc_tracked", False):
            cls.__post_init__ = _tracked(own)

    def __post_init__(self) -> None:
        check_budget(self.budget)

    def __setattr__(self, name: str, value) -> None:
        # a field assigned after construction is checked by the same rules as at construction (a trial
        # copy runs every __post_init__ check); assignments made while validating or building are not
        if self.__dict__.get("_vtc_ready", False) and not self.__dict__.get("_vtc_depth", 0) \
                and name in _field_names(type(self)):
            self._check_assignment(name, value)
        super().__setattr__(name, value)

    def _check_assignment(self, name: str, value) -> None:
        """Raise ``ValueError`` if setting field ``name`` to ``value`` breaks a construction rule."""
        try:
            dataclasses.replace(self, **{name: value})
        except ValueError as exc:
            raise ValueError(f"{self.name or type(self).__name__}.{name} = {value!r} is invalid: {exc}") from None

    # --- the one required method --------------------------------------------------------------
    def compress(self, tokens: VisualTokens) -> VisualTokens:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, tokens: VisualTokens) -> VisualTokens:
        """Validate ``tokens``, check the signals this method needs, and compress."""
        if isinstance(tokens, torch.nn.Module):
            raise ValueError(_APPLY_HINT.format(what=f"{self.name or type(self).__name__}(model)"))
        if not isinstance(tokens, VisualTokens):
            raise ValueError(f"{self.name or type(self).__name__} expects VisualTokens; got {type(tokens).__name__}")
        tokens.validate()
        for signal in self.needs:
            if getattr(tokens, signal) is None:
                raise ValueError(
                    f"method {self.name!r} needs the {signal!r} signal, which these tokens do not carry "
                    f"(apply it through vtcompress.apply on a model that provides it, or pass {signal}=...)"
                )
        return self.compress(tokens)

    def __enter__(self):
        raise ValueError(_APPLY_HINT.format(what=f"`with {self.name or type(self).__name__}:`"))

    def __exit__(self, *exc) -> None:  # pragma: no cover - __enter__ always raises
        return None

    def keep_counts(self, tokens: VisualTokens) -> Tensor:
        """``[B]`` tokens to keep per image under this method's budget."""
        return keep_counts(self.budget, tokens.counts, tokens.num_tokens)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    # --- checkpoints (config.json; + model.safetensors for trainable methods): see vtcompress.trainable ---------
    def save_pretrained(self, path):
        """Write this method to the local directory ``path`` (its config, and its weights if it has any)."""
        from .trainable import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path, budget=None, hidden_size=None, device=None):
        """Load a method saved by :meth:`save_pretrained` (a local directory or a shipped name such as
        ``"qformer-0.25"``); a checkpoint for another ``budget`` / ``hidden_size`` than asked raises."""
        from .trainable import from_pretrained

        return from_pretrained(path, budget=budget, hidden_size=hidden_size, device=device, expect_cls=cls)


_APPLY_HINT = (
    "{what}: a method is not applied by calling it on a model or by entering it; use "
    "`with vtcompress.apply(model, method): ...` (or `handle = vtcompress.apply(model, method)` ... "
    "`handle.remove()`); calling a method directly takes VisualTokens"
)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def _tracked(post_init):
    """Wrap a ``__post_init__`` so that field checks at assignment start once the outermost one has returned."""

    @functools.wraps(post_init)
    def wrapper(self, *args, **kwargs):
        depth = self.__dict__.get("_vtc_depth", 0)
        object.__setattr__(self, "_vtc_depth", depth + 1)
        try:
            post_init(self, *args, **kwargs)
        finally:
            object.__setattr__(self, "_vtc_depth", depth)
        if depth == 0:
            object.__setattr__(self, "_vtc_ready", True)

    wrapper._vtc_tracked = True
    return wrapper


Compressor.__post_init__ = _tracked(Compressor.__post_init__)


@dataclass
class ScoreCompressor(Compressor):
    """Keep the top-k tokens of each image by a score; subclasses write only :meth:`score`.

    Kept tokens stay in spatial order; padded tokens are never kept; ties break towards lower index.
    """

    def score(self, tokens: VisualTokens) -> Tensor:  # pragma: no cover - abstract
        """``[B, N]`` score per token, higher is kept."""
        raise NotImplementedError

    def compress(self, tokens: VisualTokens) -> VisualTokens:
        from .ops import topk_sorted  # local import keeps ops free of the base classes

        scores = self.score(tokens)
        idx, valid = topk_sorted(scores, self.keep_counts(tokens), tokens.mask)
        return tokens.select(idx, valid)


# ---------------------------------------------------------------------------------- registry
def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}.stage={cls.stage!r}; allowed: {', '.join(STAGES)}")
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family={cls.family!r}; allowed: {', '.join(FAMILIES)}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    from . import methods  # noqa: F401  (registers every built-in method)


def _check_choice(what: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{what}={value!r} is not a valid {what}{hint}; valid: {', '.join(allowed)}")


def list_methods(stage: str | None = None, family: str | None = None) -> list[str]:
    """Names of the registered methods, optionally filtered by stage or family.

    A ``stage`` not in :data:`STAGES` or a ``family`` not in :data:`FAMILIES` raises ``ValueError`` listing them.
    """
    _check_choice("stage", stage, STAGES)
    _check_choice("family", family, FAMILIES)
    _load_builtin_methods()
    return sorted(
        n for n, c in _REGISTRY.items()
        if (stage is None or c.stage == stage) and (family is None or c.family == family)
    )


def method_info() -> list[dict[str, object]]:
    """One row per method: name, family, stage, trainable, paper, signals needed, matches reference."""
    _load_builtin_methods()
    return [
        {"name": n, "family": c.family, "stage": c.stage, "trainable": c.trainable, "paper": c.paper,
         "needs": ",".join(c.needs), "matches_reference": c.matches_reference}
        for n, c in sorted(_REGISTRY.items(), key=lambda kv: (FAMILIES.index(kv[1].family), kv[0]))
    ]


def unknown_method_message(name: object) -> str:
    """``"unknown method 'tomee'; valid names: ...; did you mean 'tome'?"``."""
    _load_builtin_methods()
    close = difflib.get_close_matches(str(name), sorted(_REGISTRY), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown method {name!r}; valid names: {', '.join(sorted(_REGISTRY))}{hint}"


def get(name: str | Compressor, **params) -> Compressor:
    """Build a registered method by name: ``get("fastv", budget=0.25, layer=2)``.

    Unknown names and unknown parameters raise ``ValueError`` with the valid choices.
    """
    if isinstance(name, Compressor):
        if params:
            return dataclasses.replace(name, **params)
        return name
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise ValueError(unknown_method_message(name))
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; its parameters: {', '.join(sorted(fields))}"
        )
    return cls(**params)
