"""The hook lifecycle of :func:`apply`: :class:`ApplyHandle` installs the projector-stage pre-hook on the
top-level model and the decoder stage, dispatches ``generate`` (and continued chat turns) for the calling context,
and removes every hook again; the model is then exactly as before.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import Tensor, nn

from ..compressor import Compressor
from .context import (
    CACHE_KWARG,
    CacheRecord,
    activate,
    activate_model_scope,
    active_handles,
    cache_in,
    deactivate,
    detach_hook,
    install,
    installed_count,
    is_active,
    mark_cache,
    new_cache,
    record_of,
    set_record,
    uninstall,
)
from .description import PositionScheme
from .pipeline import CompressedInputs, _compress, has_visual_inputs, resolve_methods, resolve_positions
from .registry import adapter_for, description_for
from .sequence import continue_inputs

__all__ = ["ApplyHandle", "apply"]


class ApplyHandle:
    """Returned by :func:`apply`: a context manager and a handle with :meth:`remove`.

    While installed, ``model(**inputs)`` and ``model.generate(**inputs)`` run with the methods applied (the
    top-level model: calls to the inner base model directly are not compressed) -- for the calls made in the context
    (thread / asyncio task) that created or entered the handle; calls from other threads, and calls on a
    ``copy.deepcopy`` of the model, run stock. Concurrent blocks on one model (even with different methods) each
    get their own result. :attr:`last` holds the :class:`CompressedInputs` of the latest call (its ``tokens`` show
    which tokens survived). ``generate`` returns the ORIGINAL prompt ids followed by the new tokens, so slicing by
    the prompt length works as without compression, and a returned KV cache can be continued inside the block
    with the original ids (the Hugging Face chat pattern, see :func:`apply`). ``model(**inputs)`` returns logits
    over the SHORTENED sequence (``last.keep`` maps its columns to the original ones).

    Lifecycle: :func:`apply` installs the handle at once; ``with handle:`` installs it again if it was removed
    (re-entrant, nested ``with`` blocks of one handle count), and leaving the outermost block removes it.
    """

    def __init__(self, model: nn.Module, methods: list[Compressor], positions: str | None = None,
                 restore_prompt: bool = True, scope: str = "context", processor=None):
        if not isinstance(restore_prompt, bool):
            raise ValueError(f"restore_prompt={restore_prompt!r}; allowed: True, False")
        if scope not in ("context", "model"):
            raise ValueError(f"scope={scope!r}; allowed: 'context' (the calls of this thread / task, or of the "
                             "with block) or 'model' (every call on the model, from any thread, until removed)")
        self.scope = scope
        self.model = model
        self.methods = methods
        # decoder-only methods need no family (attach_decoder also serves plain causal LMs): ``adapter`` is the
        # family's description when the handle compresses before the LLM, ``description`` always
        self.adapter = adapter_for(model) if self._compressing else None
        self.description = self.adapter or description_for(model, text_only=True)
        self._positions_arg = positions  # the caller's choice, for the decoder stage too (None: each reference's)
        if self.adapter is not None:
            positions = resolve_positions(positions, methods, self.adapter)  # None: the methods' references
        elif positions is not None and not _decoder_takes_positions():
            raise ValueError(
                f"positions={positions!r} sets how encoder- / projector-stage methods number the shortened prompt; "
                f"{self.describe()} only has decoder-stage methods, which keep every token's original position: "
                "drop the argument")
        if self._decoding:
            _check_sliding_window(model, [m for m in methods if m.stage == "decoder"])
        self.positions = positions
        self.restore_prompt = restore_prompt
        self.processor = processor  # reads the frame prompts of frames_as_images families (InternVL videos)
        self.last: CompressedInputs | None = None
        #: installed (hooks on the model); ``epoch`` changes with every installation
        self.installed = False
        self.epoch: object | None = None
        self._hooks: list = []
        self._decoder = None
        self._depth = 0
        self._install()

    def describe(self) -> str:
        return "[" + ", ".join(m.name or type(m).__name__ for m in self.methods) + "]"

    @property
    def _compressing(self) -> bool:
        return any(m.stage in ("encoder", "projector") for m in self.methods)

    @property
    def _decoding(self) -> bool:
        return any(m.stage == "decoder" for m in self.methods)

    def __deepcopy__(self, memo) -> ApplyHandle:
        # the hooks of a deep-copied model still point here; they see they are not on self.model and pass through
        return self

    def __reduce__(self):
        raise TypeError("a model under vtcompress.apply cannot be pickled; leave the apply block first")

    # -------------------------------------------------------------------------------------------- lifecycle
    def _check_nesting(self) -> None:
        """At most one active apply per stage group (encoder/projector, decoder) per model and context."""
        from .decoder import DecoderHandle

        others = [h for h in active_handles(self.model) if h is not self]
        owned = {id(h._decoder) for h in others if isinstance(h, ApplyHandle) and h._decoder is not None}
        for h in others:
            if isinstance(h, ApplyHandle):
                clash = (h._compressing and self._compressing) or (h._decoding and self._decoding)
                what = h.describe()
            elif isinstance(h, DecoderHandle) and id(h) not in owned:
                clash, what = self._decoding, "attach_decoder(" + ", ".join(m.name for m in h.methods) + ")"
            else:
                continue
            if clash:
                raise ValueError(
                    f"another apply is active on this {type(self.model).__name__} in this thread ({what}); a nested "
                    f"apply ({self.describe()}) may only add the stage the outer one lacks (decoder-stage methods "
                    "inside an encoder/projector-stage apply, or the reverse), never the same stage twice: compose "
                    "methods of one stage as a list, vtcompress.apply(model, [a, b])")

    def _install(self) -> None:
        self._check_nesting()
        if self.scope == "model" and installed_count(self.model):
            raise ValueError(
                f"apply(..., scope='model') governs every thread's calls on this {type(self.model).__name__}, but "
                "another apply is installed on it (in some thread); remove that one first, or compose the methods "
                "as one list")
        install(self.model)  # the generate dispatcher (once per model, reference-counted)
        self.installed, self.epoch = True, object()
        activate(self)
        if self.scope == "model":
            activate_model_scope(self, self.model)
        try:
            if self._compressing:
                # prepended: under a nested decoder-stage apply, the decoder's top-level hook must see the
                # shortened input_ids (as in the list form)
                self._hooks.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True,
                                                                        prepend=True))
            decoder = [m for m in self.methods if m.stage == "decoder"]
            if decoder:
                from .decoder import attach_decoder

                extra = {"positions": self._positions_arg} if _decoder_takes_positions() else {}
                self._decoder = attach_decoder(self.model, decoder, **extra)
                if self.scope == "model":
                    activate_model_scope(self._decoder, self.model)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook, the decoder stage and (with the model's last handle) the instance ``generate``;
        restore runtime state. Idempotent; ``with handle:`` installs it again."""
        if self._decoder is not None:
            from .stats import decoder_record

            self._decoder_record = decoder_record(self._decoder)  # counts for summary() after the block
            self._decoder.remove()
            self._decoder = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        deactivate(self)
        self._depth = 0
        if self.installed:
            self.installed = False
            uninstall(self.model)

    def summary(self):
        """What the last call under this handle saved (also after the ``with`` block):
        :class:`~vtcompress.models.stats.Savings` -- tokens in / out per stage (before the LLM: per image;
        each decoder stage: per sample) and the analytic prefill FLOPs vs the uncompressed model; ``print`` it."""
        from .stats import summarize

        return summarize(self)

    def __enter__(self) -> ApplyHandle:
        if not self.installed:
            self._install()
        elif not is_active(self):  # installed in another context: it governs this one too from now on
            self._check_nesting()
            activate(self)
            if self._decoder is not None:
                activate(self._decoder)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth <= 0:
            self.remove()

    # -------------------------------------------------------------------------------------------- forward
    def _pre_hook(self, module, args, kwargs=None):
        # kwargs None: torch called us as a plain hook while another thread was (un)registering hooks (a call that
        # this handle does not govern); not active: another thread / task, or outside the block
        if kwargs is None:
            return None
        if module is not self.model:  # a deep copy of the model: stock, and the copied hook goes away
            detach_hook(module, self._pre_hook, self.model)
            return None
        if not (self.installed and is_active(self)):
            return None
        if not args and not has_visual_inputs(self.adapter, self.methods, kwargs):
            return self._explicit_mask(kwargs)
        if args:
            if len(args) > 1 or not isinstance(args[0], Tensor):
                raise ValueError("with vtcompress.apply, call the model with keyword arguments (input_ids=..., "
                                 "pixel_values=...)")
            kwargs = {"input_ids": args[0], **kwargs}
        if not has_visual_inputs(self.adapter, self.methods, kwargs):
            return self._explicit_mask(kwargs) or ((), kwargs)
        res = _compress(self.model, self.adapter, self.methods, kwargs, positions=self.positions,
                        for_generate=False, processor=self.processor)
        self.last = res
        return (), res.inputs

    def _explicit_mask(self, kwargs):
        """Give a call with 1-D position ids but no attention mask an explicit all-ones mask.

        ``generate`` drops an all-ones mask; without a mask and without a cache (``use_cache=False``) the
        stock mask builder reads gaps in ``position_ids`` -- which kept original positions have -- as
        packed-sequence boundaries. An all-ones mask is numerically the same as none and stops that.
        """
        pos = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is not None or pos is None or \
                self.adapter.position_scheme == PositionScheme.MROPE:
            return None
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            return None
        past = cache_in(kwargs)
        n = ref.shape[1] + (past.get_seq_length() if past is not None else 0)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.ones(ref.shape[0], n, dtype=torch.long, device=ref.device)
        return (), kwargs

    # -------------------------------------------------------------------------------------------- generate
    def _generate(self, handles: list, *args, **kwargs):
        """``model.generate`` for the calling context, whose active handles on the model are ``handles`` (this
        one compresses when it has encoder / projector methods; the others are decoder-stage)."""
        model = self.model
        gen = type(model).generate.__get__(model)
        kwargs = _generate_kwargs(args, kwargs)
        past = cache_in(kwargs)
        rec = record_of(past)
        decoders = [h._decoder for h in handles if getattr(h, "_decoder", None) is not None]
        if rec is not None:  # the next turn of a conversation whose cache was filled under compression
            if not rec.governed():
                raise rec.outside_error()
            call, prefix, coords = continue_inputs(rec, kwargs, self.description)
            for d, run in rec.decoder_runs.items():
                if d in decoders:
                    d.run = run  # the decoder stage's decision for this cache (another prefill may have run since)
            orig = kwargs["input_ids"] if coords == "orig" else None
        elif self._compressing and has_visual_inputs(self.adapter, self.methods, kwargs):
            if past is not None and past.get_seq_length() > 0:
                raise ValueError("under vtcompress.apply, images go with an empty cache (or none): this "
                                 "past_key_values already holds tokens that vtcompress did not compress")
            orig = kwargs["input_ids"]
            res = _compress(model, self.adapter, self.methods, kwargs, positions=self.positions, for_generate=True,
                            processor=self.processor)
            self.last = res
            call = dict(res.inputs)
        else:  # nothing to compress: decoder-stage methods only, or a text-only call
            orig, call = None, dict(kwargs)
        shaped = orig is not None or bool(decoders) or rec is not None  # the cache will differ from stock
        if shaped and past is None and _returns_cache(model, call):
            call[CACHE_KWARG] = new_cache(model)
        elif shaped and past is not None:
            mark_cache(past)  # the caller's own DynamicCache refuses, too, to be continued outside the block
        out = gen(**call)
        seqs = out if isinstance(out, Tensor) else out.sequences
        s_new = call["input_ids"].shape[1]
        if orig is not None and self.restore_prompt:
            prompt = orig.repeat_interleave(seqs.shape[0] // orig.shape[0], dim=0).to(seqs.device)
            full = torch.cat([prompt, seqs[:, s_new:]], dim=1)
            if isinstance(out, Tensor):
                out = full
            else:
                out.sequences = full
        cache = cache_in(call)
        if cache is None and not isinstance(out, Tensor):
            cache = getattr(out, CACHE_KWARG, None)
        if shaped and cache is not None:
            set_record(cache, _make_record(model, handles, decoders, kwargs["input_ids"] if orig is None else orig,
                                           call, seqs, cache, rec))
        return out


def _decoder_takes_positions() -> bool:
    from .decoder import attach_decoder

    return "positions" in inspect.signature(attach_decoder).parameters


def _generate_kwargs(args, kwargs) -> dict:
    """``generate``'s inputs as keywords (``input_ids`` may come positionally or as ``inputs``)."""
    kwargs = dict(kwargs)
    if len(args) > 1:
        raise ValueError("with vtcompress.apply, pass generate's arguments after input_ids by keyword")
    if args:
        if "input_ids" in kwargs or "inputs" in kwargs:
            raise ValueError("input_ids given twice")
        kwargs["input_ids"] = args[0]
    if "inputs" in kwargs:
        kwargs["input_ids"] = kwargs.pop("inputs")
    return kwargs


def _returns_cache(model: nn.Module, kwargs: dict) -> bool:
    """This ``generate`` call returns the DynamicCache it would build (so the caller can continue it)."""
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def opt(name, default=None):
        return kwargs[name] if name in kwargs else getattr(cfg, name, default)

    return (bool(opt("return_dict_in_generate", False)) and opt("use_cache", True) is not False
            and opt("cache_implementation") in (None, "dynamic") and isinstance(kwargs.get("input_ids"), Tensor))


def _make_record(model, handles, decoders, orig: Tensor, call: dict, seqs: Tensor, cache, prev):
    """What the next turn needs to map its ids onto ``cache`` (see :class:`~vtcompress.models.context.CacheRecord`)."""
    short = call["input_ids"]
    rows = seqs.shape[0]
    rep = rows // short.shape[0]

    def rows_of(t: Tensor, dim: int = 0) -> Tensor:
        return t.repeat_interleave(rep, dim=dim) if rep > 1 else t

    mask = call.get("attention_mask")
    seq = {"attention_mask": rows_of(mask if mask is not None else torch.ones_like(short))}
    for k in ("mm_token_type_ids", "token_type_ids"):
        t = call.get(k)
        if isinstance(t, Tensor) and tuple(t.shape) == tuple(short.shape):
            seq[k] = rows_of(t)
    pos = call.get("position_ids")
    if isinstance(pos, Tensor):
        pos = rows_of(pos.expand(short.shape[0], -1) if pos.dim() == 2 else pos, dim=pos.dim() - 2)
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[0], "keys", None) if layers else None
    cache_rows = int(keys.shape[0]) if isinstance(keys, Tensor) and keys.dim() > 0 else rows
    return CacheRecord(
        model=weakref.ref(model),
        owners=tuple((h, h.epoch) for h in handles if isinstance(h, ApplyHandle)),
        orig=rows_of(orig), short=rows_of(short), seq=seq, pos=pos,
        decoder_runs={d: d.run for d in decoders},
        description=" + ".join(h.describe() for h in handles if isinstance(h, ApplyHandle)),
        rows=cache_rows,
    )


def _check_sliding_window(model: nn.Module, methods: list[Compressor]) -> None:
    """Decoder-stage pruning does not handle sliding-window attention layers (the window would count kept
    tokens): refuse at apply time, from the text config's ``layer_types`` / ``sliding_window``, unless the family's
    description declares them handled (``decoder_sliding_window``: Gemma 3)."""
    desc = description_for(model, text_only=True)
    if desc.decoder_sliding_window:
        return
    cfg = desc.text_config(model)
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types:
        sliding = [i for i, t in enumerate(types) if "sliding" in str(t)]
    else:
        sliding = ["all"] if window and getattr(cfg, "use_sliding_window", True) else []
    if sliding:
        names = ", ".join(m.name for m in methods)
        raise ValueError(
            f"decoder-stage method(s) {names} prune inside the LLM, and this {type(cfg).__name__} uses sliding-window "
            f"attention (sliding_window={window}, layers {sliding}); the window would count kept tokens, which "
            "decoder-stage pruning does not handle: use an encoder- / projector-stage method on this model")


def apply(model: nn.Module, method, *, positions: str | None = None, restore_prompt: bool = True,
          scope: str = "context", processor=None) -> ApplyHandle:
    """Apply ``method`` to ``model`` until the returned handle is removed (or its ``with`` block ends).

    Args:
        model: a stock ``...ForConditionalGeneration`` of a supported family (see :func:`supported_families`).
        method: a Compressor, a registered name, or a list of them (composition: encoder stage first, then
            the projector-stage methods in list order, then the decoder stage).
        positions: ``None`` (default: the scheme of the methods' references, ``Compressor.positions``:
            ``"compact"`` for the projector-stage ones; M-RoPE models keep their 3-D positions), ``"original"``
            (kept tokens keep their positions) or ``"compact"`` (1-D RoPE models only: renumber the shortened
            sequence). Only for encoder- / projector-stage methods (decoder-stage methods keep every position).
        restore_prompt: ``True`` or ``False``: ``generate`` returns the original prompt ids followed by the new
            tokens (else the shortened prompt).

        scope: ``"context"`` (default): the handle governs the calls made in the calling thread / asyncio task
            (others run stock, even on the same model), so concurrent blocks with different methods each get their
            own result; ``"model"``: every call on the model, from any thread (a server that applies once at
            start-up and answers from a thread pool), until the handle is removed -- refused while another apply
            is installed on the model.

        processor: the model's processor (or its tokenizer), for the families whose processor gives a video to the
            model as frames among the images (InternVL): under a temporal method it reads the frame prompts to find
            each video's frames (:meth:`~vtcompress.models.description.ModelDescription.image_clips`); a temporal
            method on such a family without it is refused. Not needed elsewhere.

    Nested applies on one model may add the stage the outer one lacks (decoder inside projector, or the
    reverse: the same as the list form); the same stage twice is refused.

    Multi-turn: ``o = model.generate(**inputs, return_dict_in_generate=True)`` then
    ``model.generate(input_ids=torch.cat([o.sequences, new_ids], 1), attention_mask=..., past_key_values=
    o.past_key_values)`` inside the same block gives what the whole conversation gives from scratch under the
    same decisions (the cache remembers the shortened prompt; the images are already in it, so do not pass them
    again). Continuing such a cache outside the block raises ``ValueError``.

    Example::

        with vtcompress.apply(model, vtcompress.get("fastervlm", budget=64)):
            out = model.generate(**inputs, max_new_tokens=20)
    """
    return ApplyHandle(model, resolve_methods(method), positions=positions, restore_prompt=restore_prompt,
                       scope=scope, processor=processor)
