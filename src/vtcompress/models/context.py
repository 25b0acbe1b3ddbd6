"""Which ``apply`` governs a call: per-context activation, one ``generate`` dispatcher per model, and KV caches
that remember how their prompt was compressed.

A ``with vtcompress.apply(model, m):`` block governs the calls made inside it, in its own thread / asyncio task:

- every hook (the projector pre-hook of :class:`~vtcompress.models.apply.ApplyHandle`, the hooks of
  :class:`~vtcompress.models.decoder.DecoderHandle`) is registered per handle but acts only when its handle is
  *active in the calling context* (:func:`is_active`, a :mod:`contextvars` variable) and when the module it runs
  on is the module it was installed on (a ``copy.deepcopy`` of the model carries the hooks along; on the copy
  they pass through and detach themselves);
- the instance ``generate`` of a model is one :class:`GenerateDispatch`, installed with the first handle on the
  model and removed with the last (reference-counted in :class:`ModelState`); each call goes to the handles
  active in the calling context, or to the stock ``generate``;
- per-call state lives per context (the decoder stage's run) or per cache (:class:`CacheRecord`), never on the
  model, so two threads with different methods on one model each get their own result.

KV caches. A cache filled under compression holds the SHORTENED prompt. :class:`CacheRecord` (kept per cache
object in a weak dictionary) remembers the original prompt ids and the shortened ones, so that the next turn's
``input_ids`` (original prompt + answer + new text, the Hugging Face chat pattern) can be mapped into the
cache's coordinates. Caches created by the dispatcher are :class:`CompressedCache` (a ``DynamicCache``) and
refuse to be extended by a forward that no owning handle governs (after the block), with one clear error,
instead of silently mixing coordinates.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

from torch import Tensor, nn
from transformers.generation.utils import ALL_CACHE_NAMES

__all__ = [
    "CACHE_KWARG",
    "cache_in",
    "activate",
    "activate_model_scope",
    "deactivate",
    "is_active",
    "active_handles",
    "detach_hook",
    "ModelState",
    "GenerateDispatch",
    "CacheRecord",
    "compressed_cache_class",
    "new_cache",
    "mark_cache",
    "install",
    "installed_count",
    "uninstall",
    "record_of",
    "set_record",
]

#: The keyword a KV cache travels under in ``generate`` / ``forward`` calls: ``past_key_values`` up to transformers
#: 5.23, ``cache`` from 5.24 (which still accepts the old name and renames it). Read from transformers itself.
CACHE_KWARG: str = ALL_CACHE_NAMES[0]


def cache_in(kwargs: dict):
    """The KV cache of a call's keyword arguments (``cache`` or ``past_key_values``, whichever the caller used)."""
    for key in ("cache", "past_key_values"):
        value = kwargs.get(key)
        if value is not None:
            return value
    return None


#: the handles (ApplyHandle, DecoderHandle) active in the current context, outermost first
_ACTIVE: ContextVar[tuple] = ContextVar("vtcompress_active_handles", default=())
_LOCK = threading.RLock()


def activate(obj) -> None:
    """Make ``obj`` active in the calling context (idempotent)."""
    cur = _ACTIVE.get()
    if not any(o is obj for o in cur):
        _ACTIVE.set((*cur, obj))


def deactivate(obj) -> None:
    """Remove ``obj`` from the calling context's active handles (other contexts keep their own view; a removed
    handle is also inert there because its hooks are gone)."""
    cur = _ACTIVE.get()
    if any(o is obj for o in cur):
        _ACTIVE.set(tuple(o for o in cur if o is not obj))
    if getattr(obj, "model_scope", False):
        with _LOCK:
            obj.model_scope = False
            model = getattr(obj, "model", None)
            left = tuple(o for o in _MODEL_SCOPE.get(model, ()) if o is not obj) if model is not None else ()
            if left:
                _MODEL_SCOPE[model] = left
            elif model is not None:
                _MODEL_SCOPE.pop(model, None)


def is_active(obj) -> bool:
    """``obj`` governs calls made in the calling context (or in every context: ``scope="model"``)."""
    return getattr(obj, "model_scope", False) or any(o is obj for o in _ACTIVE.get())


#: model -> the handles installed with ``scope="model"`` (they govern every thread's calls), outermost first
_MODEL_SCOPE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def activate_model_scope(obj, model: nn.Module) -> None:
    """Make ``obj`` govern every call on ``model``, from any thread or task, until :func:`deactivate`."""
    with _LOCK:
        obj.model_scope = True
        cur = _MODEL_SCOPE.get(model, ())
        if not any(o is obj for o in cur):
            _MODEL_SCOPE[model] = (*cur, obj)


def _installed(h) -> bool:
    flag = getattr(h, "installed", None)  # ApplyHandle; a DecoderHandle is installed while it holds hooks
    return bool(getattr(h, "_hooks", True)) if flag is None else bool(flag)


def active_handles(model: nn.Module, kind: type | None = None) -> list:
    """The installed handles on ``model`` active in the calling context (outermost first); a handle removed from
    another context stays in this context's view but no longer counts."""
    everywhere = _MODEL_SCOPE.get(model, ())
    here = [h for h in _ACTIVE.get() if not any(h is g for g in everywhere)]
    return [h for h in (*everywhere, *here) if getattr(h, "model", None) is model and _installed(h)
            and (kind is None or isinstance(h, kind))]


def detach_hook(module: nn.Module, hook, owner: nn.Module) -> None:
    """Remove ``hook`` from a module it was copied onto (``copy.deepcopy`` of a model under ``apply``).

    Only when ``module`` does not share its hook dictionaries with ``owner`` (a shallow ``copy.copy`` shares them,
    and removing there would remove the owner's hook).
    """
    if module._forward_pre_hooks is owner._forward_pre_hooks:
        return
    for key, fn in list(module._forward_pre_hooks.items()):
        if fn == hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


# ============================================================================== generate
class ModelState:
    """Per model while at least one handle is installed: the dispatcher and what it replaced."""

    def __init__(self, model: nn.Module):
        self.count = 0
        self.dispatch = GenerateDispatch(model)
        # runtime state stock generate() keeps on the model (Qwen2-VL's rope_deltas: the description's
        # runtime_state), put back after the last handle
        from .registry import description_for

        desc = description_for(model, text_only=True)
        self.holder = desc.runtime_holder(model) if desc.runtime_state else None
        self.runtime = {name: getattr(self.holder, name, _MISSING) for name in desc.runtime_state}


_MISSING = object()
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install(model: nn.Module) -> ModelState:
    """Count one more handle on ``model``; the first installs the dispatcher as ``model.generate``."""
    with _LOCK:
        state = _STATES.get(model)
        if state is None:
            own = vars(model).get("generate")
            if own is not None and not isinstance(own, GenerateDispatch):
                raise ValueError(f"{type(model).__name__} instance already has its own `generate` attribute, which "
                                 "vtcompress.apply would have to replace; remove it first")
            state = ModelState(model)
            _STATES[model] = state
            model.generate = state.dispatch  # an instance attribute: the class is untouched
        state.count += 1
        return state


def installed_count(model: nn.Module) -> int:
    """Handles installed on ``model`` now, in any thread."""
    with _LOCK:
        state = _STATES.get(model)
        return state.count if state is not None else 0


def uninstall(model: nn.Module) -> None:
    """One handle fewer on ``model``; the last removes the dispatcher and restores the runtime state."""
    with _LOCK:
        state = _STATES.get(model)
        if state is None:
            return
        state.count -= 1
        if state.count > 0:
            return
        del _STATES[model]
        if vars(model).get("generate") is state.dispatch:
            del model.generate
        for name, value in state.runtime.items():
            if value is not _MISSING:
                setattr(state.holder, name, value)


class GenerateDispatch:
    """``model.generate`` while handles are installed: the call goes to the handles active in the calling context
    (``handles[-1]._generate(handles, ...)``), or to the stock ``generate`` when none is."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def __call__(self, *args, **kwargs):
        model = self._model()
        if model is None:  # pragma: no cover - the model is gone
            raise ReferenceError("the model of this generate is gone")
        stock = type(model).generate.__get__(model)
        state = _STATES.get(model)
        if state is None or state.dispatch is not self:  # a copy of a model under apply: stock, and detach
            if vars(model).get("generate") is self:
                del model.generate
            return stock(*args, **kwargs)
        handles = [h for h in active_handles(model) if hasattr(h, "_generate")]  # ApplyHandles
        if not handles:
            past = cache_in(kwargs)
            rec = record_of(past)
            if rec is not None:
                raise rec.outside_error()
            return stock(*args, **kwargs)
        # the handle with encoder / projector methods compresses (at most one per context); any other is decoder-only
        lead = next((h for h in reversed(handles) if getattr(h, "_compressing", False)), handles[-1])
        return lead._generate(handles, *args, **kwargs)

    def __deepcopy__(self, memo):
        # the copy of the model gets its own dispatcher, which finds no state and hands every call to stock generate
        model = self._model()
        return GenerateDispatch(memo.get(id(model), model)) if model is not None else self

    def __reduce__(self):
        raise TypeError("a model under vtcompress.apply cannot be pickled; leave the apply block first")


# ============================================================================== KV caches
@dataclass
class CacheRecord:
    """How a cache's content maps to the caller's ids.

    The cache holds ``short`` (the model's coordinates: the shortened prompt of the last call) followed by what
    was generated after it; ``orig`` is the same prefix as the caller wrote it (the original prompt).

    Attributes:
        model: weak reference to the model.
        owners: ``(handle, epoch)`` of every handle that shaped the cache; a continuation needs each of them
            installed in the same epoch (the same ``with`` block) and active in the calling context.
        orig: ``[R, S]`` original-coordinate ids of the prefix.
        short: ``[R, S']`` the same prefix in the cache's coordinates (``S' <= S``).
        seq: ``{key: [R, S']}`` the other sequence inputs of the shortened prefix (``attention_mask`` etc.).
        pos: position ids passed for ``short`` (``[R, S']`` or ``[rows, R, S']``), ``None`` when generate built
            them from the attention mask.
        decoder_runs: ``{decoder handle: its run}`` the decoder stage's state for this cache.
        description: what made it (for error messages).
        rows: rows of the cache (beam search keeps more than it returns: such a cache cannot be continued).
    """

    model: weakref.ref
    owners: tuple
    orig: Tensor
    short: Tensor
    seq: dict
    pos: Tensor | None
    decoder_runs: dict = field(default_factory=dict)
    description: str = ""
    rows: int = 0

    def governed(self) -> bool:
        return all(h.installed and h.epoch is epoch and is_active(h) for h, epoch in self.owners)

    def outside_error(self) -> ValueError:
        return ValueError(
            f"this KV cache was filled under vtcompress.apply ({self.description}): it holds the compressed prompt "
            f"({self.short.shape[1]} tokens for the {self.orig.shape[1]} you wrote), so it can only be continued "
            "inside the same apply block (same handle, same thread, not removed / re-entered in between); to "
            "continue elsewhere, run the whole conversation again without past_key_values")


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_of(cache) -> CacheRecord | None:
    if cache is None:
        return None
    try:
        return _RECORDS.get(cache)
    except TypeError:  # not weak-referenceable / hashable: never recorded
        return None


def set_record(cache, record: CacheRecord) -> None:
    _RECORDS[cache] = record


def _dynamic_cache_class():
    from transformers import DynamicCache

    return DynamicCache


def new_cache(model: nn.Module):
    """A :class:`CompressedCache` built as ``generate`` builds its default ``DynamicCache``."""
    return compressed_cache_class()(config=model.config.get_text_config(decoder=True))


def mark_cache(cache) -> None:
    """Make a caller's plain ``DynamicCache`` a :class:`CompressedCache` (an instance-level change: the subclass
    only adds the check in ``update``), so that it too refuses a forward outside its block."""
    if type(cache) is _dynamic_cache_class():
        cache.__class__ = compressed_cache_class()


_CACHE_CLASS: list = []


def compressed_cache_class():
    """``CompressedCache``: a ``DynamicCache`` whose ``update`` refuses a forward that no owning handle governs.

    Defined lazily (transformers is imported on first use only)."""
    if not _CACHE_CLASS:
        base = _dynamic_cache_class()

        class CompressedCache(base):
            """A ``DynamicCache`` filled under ``vtcompress.apply``; see :class:`CacheRecord`."""

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                rec = record_of(self)
                if rec is not None and not rec.governed():
                    raise rec.outside_error()
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)

            def __deepcopy__(self, memo):
                # a copy holds the same compressed content: it carries the record along
                new = type(self).__new__(type(self))
                memo[id(self)] = new
                for key, value in vars(self).items():
                    setattr(new, key, copy.deepcopy(value, memo))
                rec = record_of(self)
                if rec is not None:
                    set_record(new, dataclasses.replace(rec, decoder_runs=dict(rec.decoder_runs)))
                return new

        _CACHE_CLASS.append(CompressedCache)
    return _CACHE_CLASS[0]


def __getattr__(name):  # ``context.CompressedCache`` without importing transformers at module load
    if name == "CompressedCache":
        return compressed_cache_class()
    raise AttributeError(name)
