"""`Compressor`, the base class of each stage, the stage / signal / query enums and the method registry.

Every method is a typed dataclass, validated in ``__post_init__``, registered by name, and maps
:class:`~vtcompress.tokens.VisualTokens` to fewer :class:`~vtcompress.tokens.VisualTokens`. One base class per
stage: :class:`ProjectorCompressor` (``Compressor`` itself; :class:`ScoreCompressor` for top-k-by-score methods),
:class:`EncoderCompressor` (merging inside the vision tower) and :class:`DecoderCompressor` (pruning inside the
LLM). The registry is public: :func:`register`, :func:`get`, :func:`method_class`, :data:`METHODS`.

One budget language for all methods: an ``int`` is the number of tokens kept per image, a ``float`` in
``(0, 1]`` the fraction kept (``1.0`` keeps everything). Methods whose output count is fixed by their
structure (pooling strides, pixel unshuffle, adaptive outlier rules) document the count they produce.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from .tokens import VisualTokens

__all__ = [
    "Stage",
    "Signal",
    "QueryKind",
    "SignalLayer",
    "Compressor",
    "ProjectorCompressor",
    "ScoreCompressor",
    "TemporalCompressor",
    "EncoderCompressor",
    "DecoderCompressor",
    "StageContext",
    "METHODS",
    "register",
    "get",
    "method_class",
    "load_builtin_methods",
    "list_methods",
    "method_info",
    "unknown_method_message",
    "STAGES",
    "FAMILIES",
    "SIGNALS",
    "check_budget",
    "parse_budget",
    "parse_params",
    "keep_counts",
    "budget_tokens",
]


class _StrEnum(str, Enum):
    """An enum whose members ARE their string values (``Stage.DECODER == "decoder"``, hashed, printed, formatted,
    repr'd in messages and JSON-encoded as ``"decoder"``), so configs, comparisons and error messages written
    with strings keep working.

    ``enum.StrEnum`` does this from Python 3.11; this package supports 3.10.
    """

    __hash__ = str.__hash__
    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__


class Stage(_StrEnum):
    """Where a method acts: inside the vision tower, on the features before the LLM, or inside the LLM."""

    ENCODER = "encoder"
    PROJECTOR = "projector"
    DECODER = "decoder"


class Signal(_StrEnum):
    """Optional :class:`VisualTokens` fields a method reads (its ``needs``)."""

    CLS_ATTN = "cls_attn"  # [B, N] attention the vision tower's [CLS] (or mean query) gives each token
    KEYS = "keys"  # [B, N, Dk] attention keys (vision tower, or the decoder layer's cached keys)
    TEXT = "text"  # [B, T, D] the prompt tokens (embeddings / hidden states)
    ATTN = "attn"  # [B, N, Q] decoder attention received from the query rows


class QueryKind(_StrEnum):
    """Which decoder query rows a decoder-stage method's ``attn`` comes from."""

    LAST = "last"  # the last real token of each row
    TEXT = "text"  # the prompt tokens after the first image (``text_mask`` marks the valid ones)


class SignalLayer(_StrEnum):
    """Which decoder layer a decoder-stage method's signals are read from, for a prune before layer ``K``."""

    PREVIOUS = "previous"  # layer K - 1 (FastV's reference reads the previous layer's attention)
    OWN = "own"  # layer K itself, on the sequence entering it (PyramidDrop)


STAGES = tuple(Stage)
FAMILIES = ("transformation", "similarity", "attention", "query", "temporal", "baseline")
#: the projector / encoder-stage signals the mechanics provide from the vision tower and the prompt
SIGNALS = (Signal.CLS_ATTN, Signal.KEYS, Signal.TEXT)

_SIGNAL_VALUES = frozenset(s.value for s in Signal)

_METHODS: dict[str, type[Compressor]] = {}


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


def keep_counts(budget: int | float, counts: Tensor, num_tokens: int | None = None) -> Tensor:
    """Tokens to keep per image, ``[B]`` long, for valid-token ``counts [B]`` (out of ``num_tokens`` per row).

    The one budget -> count rule of every stage: an int budget keeps ``min(budget, count)`` (a row with fewer
    valid tokens than the budget keeps them all); a fraction keeps ``round(fraction * count)``, at least one
    token when the row has any. With ``num_tokens`` (the projector and encoder stages, whose images all have
    that many tokens) an int budget larger than ``num_tokens`` raises; without it (inside the LLM, where images
    differ in token counts) it never does.
    """
    check_budget(budget)
    counts = counts.to(torch.long)
    if isinstance(budget, int):
        if num_tokens is not None and budget > num_tokens:
            raise ValueError(f"budget={budget} tokens is out of range: the images have N={num_tokens} tokens")
        return counts.clamp(max=budget)
    k = torch.round(counts.to(torch.float64) * budget).to(torch.long)
    return torch.minimum(k.clamp(min=1), counts)


def budget_tokens(budget: int | float, num_tokens: int) -> int:
    """Tokens kept out of ``num_tokens`` by ``budget``: :func:`keep_counts` for one image of ``num_tokens`` valid
    tokens (an int budget above ``num_tokens`` raises)."""
    return int(keep_counts(budget, torch.tensor([int(num_tokens)]), int(num_tokens))[0])


def parse_params(items: Sequence[str], what: str = "--param") -> dict[str, Any]:
    """Method hyper-parameters from command-line ``KEY=VALUE`` items (the one grammar of every subcommand).

    ``KEY`` is a field name or ``METHOD.FIELD`` (one method only; see :func:`params_for`); ``VALUE`` is a Python
    literal (``2``, ``0.5``, ``(2, 6)``, ``True``, ``None``), JSON (``true``, ``null``, ``[2, 6]``) or, if neither,
    the text itself (``keys``). A tuple of lists in JSON form becomes a list; the method's ``__post_init__``
    normalises it. A missing ``=`` or key raises ``ValueError`` naming the item.
    """
    import ast
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE, e.g. fastv.layer=2")
        try:
            value: Any = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            try:
                value = json.loads(text)
            except ValueError:
                value = text
        out[key] = value
    return out


def params_for(params: Mapping[str, Any], name: str, fields: set[str] | None = None) -> dict[str, Any]:
    """The parameters of :func:`parse_params` that apply to method ``name``: its ``METHOD.FIELD`` entries and the
    plain ``FIELD`` ones (restricted to ``fields`` when given, so a plain key reaches every method having it)."""
    out = {k: v for k, v in params.items() if "." not in k and (fields is None or k in fields)}
    prefix = f"{name}."
    out.update({k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})
    return out


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
    stage: ClassVar[Stage] = Stage.PROJECTOR
    paper: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    #: signals the method reads from :class:`VisualTokens` (:class:`Signal`: ``cls_attn``, ``keys``, ``text``;
    #: ``attn`` at the decoder stage).
    needs: ClassVar[tuple[Signal, ...]] = ()
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
    #: the output features are wider than the input (pixel unshuffle: ``f * f * D``): the LLM of a stock model
    #: cannot read them without a projector trained after the method (``vtcompress.apply`` refuses, saying so).
    widens: ClassVar[bool] = False
    #: the method acts across the frames of a clip (:class:`TemporalCompressor`); the others act on one frame at
    #: a time (a clip given to them is split into frames: :meth:`VisualTokens.split_frames`).
    temporal: ClassVar[bool] = False

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
        if tokens.frames > 1 and not self.temporal:
            return self._per_frame(tokens)
        return self.compress(tokens)

    def _per_frame(self, clip: VisualTokens) -> VisualTokens:
        """A spatial method on a clip: on every frame, a fraction budget kept of each frame, an int budget (tokens
        per clip) split evenly over the frames (the first ``budget % T`` frames keep one more)."""
        t = clip.frames
        frames = clip.split_frames()
        if self.trainable and isinstance(self.budget, int):
            # a copy at the per-frame budget would be a freshly built module: the caller's weights silently unused
            raise ValueError(f"method {self.name!r} has learned weights for budget={self.budget!r}; on a clip an int "
                             f"budget is tokens per clip, split over its {t} frames, which those weights do not "
                             "serve: pass a float budget (the fraction kept of every frame)")
        if not isinstance(self.budget, int) or self.budget % t == 0:
            per = self if not isinstance(self.budget, int) else dataclasses.replace(self, budget=self.budget // t)
            if isinstance(self.budget, int) and self.budget < t:
                raise ValueError(f"budget={self.budget} tokens per clip is below one token per frame of its "
                                 f"{t} frames: the spatial method {self.name!r} keeps at least one per frame")
            return VisualTokens.join_frames(per.compress(frames), t)
        q, r = divmod(self.budget, t)
        if q == 0:
            raise ValueError(f"budget={self.budget} tokens per clip is below one token per frame of its {t} "
                             f"frames: the spatial method {self.name!r} keeps at least one per frame")
        rows = torch.arange(frames.batch_size, device=clip.x.device)
        more = (rows % t) < r
        big, small = rows[more], rows[~more]
        parts = [dataclasses.replace(self, budget=q + 1).compress(frames.take_rows(big)),
                 dataclasses.replace(self, budget=q).compress(frames.take_rows(small))]
        joined = VisualTokens.cat_rows(parts)
        inverse = torch.cat([big, small]).argsort()
        return VisualTokens.join_frames(joined.take_rows(inverse), t)

    def __enter__(self):
        raise ValueError(_APPLY_HINT.format(what=f"`with {self.name or type(self).__name__}:`"))

    def __exit__(self, *exc) -> None:  # pragma: no cover - __enter__ always raises
        return None

    def keep_counts(self, tokens: VisualTokens) -> Tensor:
        """``[B]`` tokens to keep per image under this method's budget."""
        return keep_counts(self.budget, tokens.counts, tokens.num_tokens)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    # --- checkpoints (config.json; + model.safetensors for trainable methods): see vtcompress.checkpoints -------
    def save_pretrained(self, path):
        """Write this method to the local directory ``path`` (its config, and its weights if it has any)."""
        from .checkpoints import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path, budget=None, hidden_size=None, device=None):
        """Load a method saved by :meth:`save_pretrained` (a local directory or a shipped name such as
        ``"qformer-0.25"``); a checkpoint for another ``budget`` / ``hidden_size`` than asked raises."""
        from .checkpoints import from_pretrained

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


@dataclass
class TemporalCompressor(Compressor):
    """Base of temporal methods (:mod:`vtcompress.methods.temporal`): they act across the frames of a clip.

    :meth:`compress` receives clip tokens (``frames = T``; ``pos`` / ``assign`` over the clip, frame after frame)
    of the projected video features, one row per video. The budget counts per clip: an ``int`` is the tokens kept
    of the clip, a ``float`` the fraction of its tokens. On the projector stage of a model, images (one frame, no
    time axis) pass through a temporal method untouched; videos get it.
    """

    family: ClassVar[str] = "temporal"
    temporal: ClassVar[bool] = True


#: the projector stage's base class is :class:`Compressor` itself (its defaults describe that stage); this name
#: says so where a method's stage should read from its base class.
ProjectorCompressor = Compressor


@dataclass
class EncoderCompressor(Compressor):
    """Base of encoder-stage methods: they merge patch tokens inside the vision tower.

    The mechanics (:func:`vtcompress.models.encoder.encoder_merging`) call :meth:`schedule` once for the tower
    (tokens merged after each layer before the feature layer) and, after each such layer, :meth:`merge_step`
    on the layer's tokens (``x [B, N, D]``, ``keys [B, N, Dk]`` the layer's head-mean keys when ``metric ==
    "keys"``, ``size``); the layers after a merge add ``log(size)`` to their attention logits when
    ``prop_attn`` (ToMe's proportional attention, arXiv 2210.09461). :meth:`compress` applies the same merging
    to fixed :class:`VisualTokens` (no layers in between).

    Args:
        prop_attn: proportional attention in the layers after a merge.
        metric: the similarity the merges compare: ``"keys"`` (the layer's attention keys, as ToMe) or
            ``"features"`` (the layer's output states).
    """

    prop_attn: bool = True
    metric: str = "keys"

    stage: ClassVar[Stage] = Stage.ENCODER
    METRICS: ClassVar[tuple[str, ...]] = ("keys", "features")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in self.METRICS:
            raise ValueError(f"metric={self.metric!r}; allowed: 'keys', 'features'")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be a bool; got {self.prop_attn!r}")

    @property
    def use_keys(self) -> bool:
        """Whether the merges compare the layer's keys (else its output states)."""
        return self.metric == "keys"

    def schedule(self, num_patches: int, num_layers: int) -> list[int]:  # pragma: no cover - abstract
        """Tokens merged after each of ``num_layers`` layers, for ``num_patches`` patches per image."""
        raise NotImplementedError

    def merge_step(self, tokens: VisualTokens, r: int | Tensor) -> VisualTokens:  # pragma: no cover - abstract
        """Merge ``r`` (an int or ``[B]``) tokens of each row away."""
        raise NotImplementedError

    def metric_of(self, tokens: VisualTokens) -> Tensor:
        """``[B, N, C]``: the keys when ``metric == "keys"`` and the tokens carry them, else the features."""
        return tokens.keys if self.use_keys and tokens.keys is not None else tokens.x


@dataclass
class StageContext:
    """What the mechanics know about one decoder-stage call beyond :class:`VisualTokens` (one row per image).

    Attributes:
        text_keys: ``[B, T, Dk]`` the prompt tokens' keys (same layer and form as ``tokens.keys``), or ``None``.
        vis_seq: ``[B, N]`` long, each visual token's index in its sample's unpadded sequence (the reference's
            absolute token indices; DART's pivot order depends on them).
        text_seq: ``[B, T]`` long, the same for the prompt tokens, or ``None``.
        initial: ``[B]`` long, the image's visual tokens when the method's first stage ran (multi-stage budgets).
        rated: the mechanics already restricted the prompt query rows to the method's raters (SparseVLM).
        merge_rank: set by a merging method: ``[B, N_out]`` long, the order of each merged output token among its
            image's merged tokens (-1 for kept ones), in the method's output order; the mechanics append merged
            tokens after their image's kept tokens in that order when positions are compact.
    """

    text_keys: Tensor | None = None
    vis_seq: Tensor | None = None
    text_seq: Tensor | None = None
    initial: Tensor | None = None
    rated: bool = False
    merge_rank: Tensor | None = None


@dataclass
class DecoderCompressor(ScoreCompressor):
    """Base of decoder-stage methods: they prune visual tokens between LLM layers.

    The mechanics (:func:`vtcompress.models.decoder.attach_decoder`) call :meth:`schedule` once for the
    model's depth and, before each stage layer ``K``, :meth:`compress_stage` on the visual tokens of each
    image (one row per image; budgets count per image, as at the projector stage): ``x [B, N, D]`` their
    hidden states entering layer ``K`` (through the LLM's final norm if the class sets ``normed``), plus the
    signals named in ``needs`` computed at layer ``K - 1`` (``signal_layer = SignalLayer.PREVIOUS``) or at
    layer ``K`` itself (``SignalLayer.OWN``) on the sequence entering it: ``attn [B, N, Q]``: attention received
    from the query rows chosen by ``query`` (:class:`QueryKind`) — ``"last"``: the last token, ``"text"``: the
    prompt tokens after the first image, valid ones in ``text_mask``; ``keys [B, N, Dk]``: the keys that layer
    caches (``k_proj`` output rotated by RoPE, all KV heads concatenated); ``text [B, Q, D]``: the prompt tokens'
    hidden states entering ``K``. ``image_newline`` tokens (LLaVA-NeXT / OneVision) are never pruned and not
    counted. The rule is a pure function of those tensors, so it is tested on synthesized signals as well.
    Budgets follow :func:`keep_counts` (no ``num_tokens``: images differ in token counts) unless a method says
    otherwise; multi-stage methods get ``num_stages``. ``positions`` is the position scheme of the layers after
    a prune (``"original"`` or ``"compact"``, see :data:`vtcompress.models.decoder.POSITIONS`);
    ``matches_reference`` says how the default matches the authors' code. ``uses_context``: the mechanics pass
    a :class:`StageContext` to :meth:`compress_stage`.
    """

    stage: ClassVar[Stage] = Stage.DECODER
    query: ClassVar[QueryKind] = QueryKind.LAST
    signal_layer: ClassVar[SignalLayer] = SignalLayer.PREVIOUS
    normed: ClassVar[bool] = False
    uses_context: ClassVar[bool] = False
    positions: ClassVar[str] = "original"

    def schedule(self, num_layers: int) -> tuple[int, ...]:  # pragma: no cover - abstract
        """Stage layers for a decoder of ``num_layers`` layers (each in ``[1, num_layers - 1]``)."""
        raise NotImplementedError

    def compress_stage(self, tokens: VisualTokens, stage: int, num_stages: int = 1) -> VisualTokens:
        """Decision of stage ``stage`` (0-based) out of ``num_stages``; single-stage methods compress."""
        return self.compress(tokens)

    def keep_counts(self, tokens: VisualTokens) -> Tensor:
        return keep_counts(self.budget, tokens.counts)

    @staticmethod
    def _check_layer(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (a decoder layer after the first); got {value!r}")

    def _check_stage_layers(self, minimum: int = 1) -> None:
        """Validate and normalise the ``layers`` / ``ref_depth`` fields of multi-stage methods."""
        self.layers = tuple(self.layers)
        if not self.layers:
            raise ValueError("layers must name at least one stage layer; got ()")
        for v in self.layers:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"every entry of layers must be an int >= {minimum}; got {v!r}")
        self._check_layer("ref_depth", self.ref_depth)

    @staticmethod
    def _check_single(layer: int, num_layers: int, name: str) -> tuple[int, ...]:
        if layer >= num_layers:
            raise ValueError(f"{name}: layer={layer} is out of range for a decoder of {num_layers} layers "
                             f"(allowed: 1 .. {num_layers - 1})")
        return (layer,)


# ---------------------------------------------------------------------------------- registry
class _MethodRegistry(Mapping):
    """Read-only ``name -> method class`` view of the registry; the built-in methods load on first access."""

    def __getitem__(self, name: str) -> type[Compressor]:
        load_builtin_methods()
        return _METHODS[name]

    def __iter__(self) -> Iterator[str]:
        load_builtin_methods()
        return iter(dict(_METHODS))

    def __len__(self) -> int:
        load_builtin_methods()
        return len(_METHODS)

    def __contains__(self, name: object) -> bool:
        load_builtin_methods()
        return name in _METHODS

    def __repr__(self) -> str:
        return f"METHODS({', '.join(sorted(self))})"


#: every registered method by name (built-in ones included): ``METHODS["fastv"]``, ``"tome" in METHODS``
METHODS: Mapping[str, type[Compressor]] = _MethodRegistry()


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}.stage={cls.stage!r}; allowed: {', '.join(STAGES)}")
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family={cls.family!r}; allowed: {', '.join(FAMILIES)}")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_METHODS[cls.name].__name__}")
    # string class attributes of user subclasses become the enums, so every comparison reads one type
    cls.stage = Stage(cls.stage)
    # (a signal no stage provides stays a string: vtcompress.apply refuses it, naming it)
    cls.needs = tuple(Signal(s) if s in _SIGNAL_VALUES else s for s in cls.needs)
    _METHODS[cls.name] = cls
    return cls


def load_builtin_methods() -> None:
    """Import the built-in methods (each registers itself); called by every registry look-up."""
    from . import methods  # noqa: F401  (registers every built-in method)


def method_class(name: str) -> type[Compressor]:
    """The registered class of method ``name`` (``method_class("fastv").stage``): fields, defaults and class
    attributes without building one. An unknown name raises ``ValueError`` listing the valid names."""
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    raise ValueError(unknown_method_message(name))


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
    return sorted(
        n for n, c in METHODS.items()
        if (stage is None or c.stage == stage) and (family is None or c.family == family)
    )


def method_info() -> list[dict[str, object]]:
    """One row per method: name, family, stage, trainable, paper, signals needed, matches reference."""
    return [
        {"name": n, "family": c.family, "stage": c.stage, "trainable": c.trainable, "paper": c.paper,
         "needs": ",".join(c.needs), "matches_reference": c.matches_reference}
        for n, c in sorted(METHODS.items(), key=lambda kv: (FAMILIES.index(kv[1].family), kv[0]))
    ]


def unknown_method_message(name: object) -> str:
    """``"unknown method 'tomee'; valid names: ...; did you mean 'tome'?"``."""
    names = sorted(METHODS)
    close = difflib.get_close_matches(str(name), names, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown method {name!r}; valid names: {', '.join(names)}{hint}"


def get(name: str | Compressor, **params) -> Compressor:
    """Build a registered method by name: ``get("fastv", budget=0.25, layer=2)``.

    Unknown names and unknown parameters raise ``ValueError`` with the valid choices.
    """
    if isinstance(name, Compressor):
        if params:
            return dataclasses.replace(name, **params)
        return name
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; its parameters: {', '.join(sorted(fields))}"
        )
    return cls(**params)
