"""Decoder-stage mechanics: prune visual tokens inside the LLM (FastV, PyramidDrop, SparseVLM, DART).

:func:`attach_decoder` puts forward pre-hooks on the model's own modules (no forward is copied, no class
is patched) and returns a :class:`DecoderHandle` whose ``remove()`` takes every hook away again.

How one prefill runs (``K`` is a stage layer of a method; a method may have several stages):

* a pre-hook on the top-level model reads ``input_ids`` (already shortened by projector-stage hooks,
  which are registered earlier) and ``attention_mask``: image placeholders are ``input_ids`` equal to the
  config's image / video token id; pads are ``attention_mask == 0``; the family's description groups them into
  images (``placeholder_images``: each contiguous run for most families, whose images are separated by text or
  vision start / end tokens; Idefics3's tiles and Pixtral's rows are several runs of one image);
* the pre-hook on ``layers[0]`` (the input embeddings) marks LLaVA-NeXT / OneVision ``image_newline`` tokens
  (placeholders whose embedding is the model's ``image_newline`` vector): they carry no patch, so they are
  never pruned and do not count towards budgets (they keep the packed grid's row layout); methods that rate
  their query rows once (SparseVLM, :meth:`rate`) choose them there, from the embeddings, as their reference;
* the signal a method needs is computed from the input of layer ``K - 1`` (``signal_layer = "previous"``:
  FastV, SparseVLM, DART, whose references read the previous layer's attention / cached keys) or of layer
  ``K`` itself (``"own"``: PyramidDrop, whose reference scores with the pruning layer's own q / k): the
  attention rows of the chosen query tokens (the last token, or the prompt tokens) — q of those rows only,
  K of all tokens in chunks, full causal + padding row normaliser, head mean — exactly the row
  ``output_attentions=True`` returns under eager attention, while the layers keep running SDPA /
  FlashAttention; optionally the keys the layer caches (``k_proj`` output after RoPE, all KV heads);
* the pre-hook on ``layers[K]`` wraps each image's visual tokens (the hidden states entering ``K``, one row
  per image, so budgets count per image as at the projector stage) with the signal in
  :class:`~vtcompress.tokens.VisualTokens`, calls the method (a pure function on them), and returns the kept
  rows of ``hidden_states``; that hook and those of every later layer slice the attention mask (query and key
  axes) to the kept tokens and give them positions by the method's scheme (``method.positions`` or
  ``attach_decoder(positions=...)``): ``"original"`` (FastV, DART: ``position_embeddings`` / ``position_ids``
  sliced, kept tokens keep their positions) or ``"compact"`` (PyramidDrop, SparseVLM: each row's real tokens
  renumbered contiguously from its first one, rotary embeddings recomputed with the decoder's own
  ``rotary_emb``; decode steps use the stock position minus the tokens dropped). M-RoPE (Qwen2-VL) keeps its
  per-token 3-D positions under either scheme: no reference renumbers a grid, and text after an image
  already continues from the grid's maximum whatever the token count.

Consequences:

* the KV cache is full-length for layers ``< K`` and pruned from ``K`` on; decode steps slice the key
  axis of their mask per layer with the same kept indices (plus every generated position);
* the final norm and ``lm_head`` see the pruned sequence: the last position is never pruned, so
  ``logits[:, -1]`` (what ``generate`` uses) is valid, but full-length logits for pruned positions
  are not returned (passing ``labels`` raises);
* ragged batches: every image keeps exactly its own budget of visual tokens; rows then have different
  real lengths, so shorter rows are filled up to the longest with "filler" slots, taken first from
  their padding and then from their dropped visual tokens; fillers that are not padding are masked
  out as keys (each still attends to itself, so its row is never empty). With the usual left-padded
  batch of same-length prompts the fillers are pads and no mask changes;
* rows (or whole batches) without visual tokens run like the stock model;
* the query token of "last"-row methods is the last real token of each row; the prompt ("text") rows
  are the real non-placeholder tokens after each row's first visual token;
* multi-stage methods (PyramidDrop, SparseVLM): stage ``s`` works on the survivors of stage ``s - 1``,
  its signal computed on the pruned sequence (at its positions); merged tokens (SparseVLM's recycling)
  take a slot of the image: with compact positions they follow the image's kept tokens in the method's
  order (``StageContext.merge_rank``; the causal mask is rebuilt in that order), as the reference appends
  them; with original positions they sit at their cluster centre's position;
* supported: eager, sdpa and flash attention masks (tensors; flex attention's BlockMask is refused),
  DynamicCache (static caches are refused: the layers from ``K`` on hold fewer tokens), greedy / sampled
  / beam generation (beams of one sample share its decision). FlashAttention is only exercised on GPU, which the
  tests here lack;
  under it, layers from ``K`` on get ``position_ids=None`` (gapped positions of a batch of one would read
  as packed sequences; positions travel in ``position_embeddings``);
* layers whose masks are not plain causal (Gemma 3: sliding-window layers, each image's placeholder run attending
  to itself both ways from ``token_type_ids``): the scoring rows are the rows of the layer's own mask; from ``K`` on
  each layer keeps its own mask at the kept tokens (a window counts original positions: a kept token sees the kept
  tokens among those it saw in the stock model; when merged tokens are placed out of positional order the window
  also counts the layer's own slots, as its cache does), and decode steps build each layer's mask over the keys its
  cache returns (a sliding layer caches its last ``window - 1`` entries; the stock decode masks are sized for the
  first layer of each type, which may be pruned). FlashAttention applies a window over the layer's own keys, so
  sliding-window layers under it are refused;
* ``generate(use_cache=False)`` re-runs the whole sequence each step: a forward with
  ``use_cache=False`` whose ``input_ids`` extend the previous prefill's prompt reuses that prefill's
  decision (the cached run cannot change its mind either), so cached and uncached generation match.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..compressor import Compressor, StageContext
from ..ops import flag_indices as _compact  # positions of the True entries of a [B, L] flag, left-aligned
from ..tokens import VisualTokens
from .context import activate, cache_in, deactivate, detach_hook, is_active
from .description import ModelDescription, PositionScheme, visual_token_ids
from .registry import description_for

__all__ = ["attach_decoder", "DecoderHandle", "attention_rows", "language_model_of", "visual_token_ids", "POSITIONS"]

#: position schemes of the layers after a prune: "original" (kept tokens keep their positions, FastV's reference) or
#: "compact" (renumbered contiguously, the generated tokens follow on: PyramidDrop's and SparseVLM's references).
POSITIONS = ("original", "compact")

_BASE = ModelDescription()

#: key chunk of the attention-row computation: bounds the extra memory of scoring to O(chunk * D).
KEY_CHUNK = 1024


# ------------------------------------------------------------------------------------ locating things
def language_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with the LLM's layers) of a stock VLM, or of a plain causal LM: where the
    model's family description says it is."""
    return description_for(model, text_only=True).language_model(model)


def _rope(fn, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B,H,L,hd]`` with the layer's own function (it rotates a (q, k) pair; we pass x twice)."""
    return fn(x, x, cos, sin)[0]


def _gather_seq(t: Tensor, idx: Tensor, batch_dim: int, seq_dim: int) -> Tensor:
    """Gather ``t`` along ``seq_dim`` by per-row ``idx [B,K]``; a batch dim of 1 is broadcast to ``B``."""
    b = idx.shape[0]
    shape = list(t.shape)
    shape[batch_dim] = b
    t = t.expand(shape).movedim((batch_dim, seq_dim), (0, 1))
    index = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, index).movedim((0, 1), (batch_dim, seq_dim))


def _allowed(mask: Tensor) -> Tensor:
    """Bool "may attend" of an attention mask (bool, or additive float: 0 allowed, dtype minimum masked)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _as_mask(allowed: Tensor, like: Tensor | None) -> Tensor:
    """``allowed`` in ``like``'s mask format: bool, or additive float (0 / dtype minimum)."""
    if like is None or like.dtype == torch.bool:
        return allowed
    return torch.zeros((), dtype=like.dtype, device=allowed.device).expand(allowed.shape).masked_fill(
        ~allowed, torch.finfo(like.dtype).min)


# ------------------------------------------------------------------------------------ the signal
def attention_rows(
    layer: nn.Module,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    query_idx: Tensor,
    key_ok: Tensor,
    chunk: int = KEY_CHUNK,
    desc: ModelDescription | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Head-mean softmax attention rows of the chosen queries of a decoder ``layer``, without an L x L matrix.

    Args:
        layer: a decoder layer with ``input_layernorm`` and ``self_attn`` (``q_proj``, ``k_proj``, optional
            ``q_norm`` / ``k_norm``, ``head_dim``, ``scaling``).
        hidden: ``[B, L, D]`` the layer's input hidden states.
        position_embeddings: ``(cos, sin)`` ``[B or 1, L, hd]`` as the layer receives them.
        query_idx: ``[B, Q]`` long positions of the query rows.
        key_ok: ``[B, L]`` bool keys a query may attend (padding and masked fillers False); causality
            (key position <= query position) is added here, and a query always sees itself.
        chunk: keys per chunk of the score computation.
        desc: the model's description (where the layer's attention, input norm and rotary function are);
            ``None``: the description base's defaults (``self_attn``, ``input_layernorm``, the modeling file's
            ``apply_rotary_pos_emb``).
        allowed: optional ``[B, Q, L]`` bool, the keys each query row may attend as the layer's own attention mask
            says (its rows at ``query_idx``): replaces the causal / ``key_ok`` rule, for layers whose mask is not
            plain causal (sliding windows, bidirectional image blocks: Gemma 3).

    Returns:
        ``[B, Q, L]`` float32: ``softmax(q k^T * scaling + mask)`` averaged over heads — the eager
        attention row of each query (GQA keys shared by their query heads as ``repeat_kv`` does).
    """
    desc = desc if desc is not None else _BASE
    attn = desc.llm_attention(layer)
    norm_in = desc.llm_input_norm(layer)
    fn = desc.rotary_fn(attn)
    cos, sin = position_embeddings
    b, n, _ = hidden.shape
    hd = attn.head_dim
    nq = query_idx.shape[1]

    def proj(x: Tensor, lin: nn.Module, norm_name: str) -> Tensor:
        y = lin(x).view(b, x.shape[1], -1, hd)
        norm = getattr(attn, norm_name, None)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)

    hq = norm_in(_gather_seq(hidden, query_idx, 0, 1))
    q = _rope(fn, proj(hq, attn.q_proj, "q_norm"), _gather_seq(cos, query_idx, 0, 1), _gather_seq(sin, query_idx, 0, 1))
    heads = q.shape[1]
    q = q.float()
    logits = []
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        k = proj(norm_in(hidden[:, sl]), attn.k_proj, "k_norm")
        k = _rope(fn, k, cos[:, sl], sin[:, sl]).float()
        kv_heads = k.shape[1]
        # [B, Hkv, g, Q, hd] x [B, Hkv, c, hd] -> [B, Hkv, g, Q, c]: each KV head serves g query heads
        s = torch.einsum("bkgqd,bkcd->bkgqc", q.view(b, kv_heads, heads // kv_heads, nq, hd), k)
        logits.append(s.reshape(b, heads, nq, -1))
    logits = torch.cat(logits, dim=-1) * float(attn.scaling)
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping, before the mask as in the layer's eager attention
        logits = torch.tanh(logits / cap) * cap
    pos = torch.arange(n, device=hidden.device)
    if allowed is None:
        allowed = (pos[None, None] <= query_idx[..., None]) & key_ok[:, None]
    # a query always sees itself (a padding row's mask row may be empty: no NaN row)
    allowed = allowed | (pos[None, None] == query_idx[..., None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


# ------------------------------------------------------------------------------------ state
@dataclass
class _Stage:
    layer: int
    method: Compressor
    index: int  # stage number within its method
    count: int  # stages of its method
    method_id: int  # which method (index into DecoderHandle.methods)


@dataclass
class _Decision:
    """What one stage decided in the prefill; reused by decode steps and uncached continuations."""

    rel: Tensor  # [B, Ls] positions kept, into the previous stage's sequence (in the new order)
    keep: Tensor  # [B, Ls] absolute positions (into the prefill sequence) kept
    ok: Tensor  # [B, Ls] bool real tokens (False: pads and fillers)
    fix: bool  # some fillers are not pads: masks must hide them
    identity: bool  # nothing pruned in any row
    slots: Tensor | None = None  # [B, M] new slots whose hidden state the method rewrote (merging)
    values: Tensor | None = None  # [B, M, D]
    slot_ok: Tensor | None = None  # [B, M]
    pid: Tensor | None = None  # [B, Ls] position ids of the layers of this stage when some stage renumbered them
    shift: Tensor | None = None  # [B] decode positions are the stock ones minus this (compact positions)
    reordered: bool = False  # the new order is not the positional order (merged tokens appended): causal masks
    # are rebuilt in the new order
    into: Tensor | None = None  # [B, Lprev] with merges: the new row each row entering the stage went into (-1:
    # dropped), so that per-token features can follow a merge (DeepStack levels)


@dataclass
class _Run:
    mode: str  # prefill | continue | decode | off
    ids: Tensor
    vis: Tensor  # [B, L0] prunable visual tokens of the prefill (placeholders that carry a patch)
    pad_ok: Tensor  # [B, L] not padding (current full length)
    length: int  # L0, prefill length
    full: int  # current full length (prefill/continue)
    ph: Tensor | None = None  # [B, L0] image / video placeholders (visual tokens and image_newline tokens)
    img: Tensor | None = None  # [B, L0] long: index of the placeholder run (image) in its row, -1 elsewhere
    pid0: Tensor | None = None  # [B, L0] prefill position ids (text rotary models)
    raters: dict[int, Tensor] = field(default_factory=dict)  # method id -> [B, L0] bool prompt query rows
    n0: dict[int, Tensor] = field(default_factory=dict)  # method id -> [B, R] visual tokens per image at stage 0
    past: int = 0  # tokens in layer 0's cache before this decode step
    decisions: dict[int, _Decision] = field(default_factory=dict)
    signals: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    pe_cache: dict[tuple, tuple[Tensor, Tensor]] = field(default_factory=dict)  # (stage, layer type) -> (cos, sin)
    # the layers' masks are not plain causal (sliding windows, token_type_ids image blocks): masks follow the layer
    structured: bool = False
    dmask: Tensor | None = None  # [B, past + q] the 2-D padding mask of the current decode step


class DecoderHandle:
    """Hooks of :func:`attach_decoder`; ``remove()`` (or leaving the ``with`` block) restores the model."""

    def __init__(self, model: nn.Module, methods: list[Compressor], positions: str | None = None):
        if positions is not None and positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}; allowed: None (each method's reference scheme), "
                             f"{', '.join(map(repr, POSITIONS))}")
        self.model = model
        self.methods = list(methods)
        self.desc = desc = description_for(model, text_only=True)
        self.lm = desc.language_model(model)
        self.layers = desc.llm_layers(model)
        self.token_ids = desc.visual_token_ids(model)
        if not self.token_ids:
            raise ValueError(
                f"{type(model.config).__name__} has no image_token_id / image_token_index: decoder-stage pruning needs "
                "it to find the visual tokens in input_ids")
        self._impl = str(getattr(desc.text_config(model), "_attn_implementation", None) or "")
        rotary = desc.rotary_emb(model)
        # M-RoPE (Qwen2-VL): 3-D grid positions; text after an image already continues from the grid's maximum
        # whatever the token count, so "compact" positions are the stock ones there (nothing is renumbered).
        self._mrope = desc.position_scheme == PositionScheme.MROPE
        self._rotary = rotary
        newline = desc.image_newline(model)
        self._newline = newline.detach() if newline is not None else None
        # per-layer-type rotary embeddings (Gemma 3: sliding and full layers have their own RoPE base)
        self._rotary_typed = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        # each layer's sliding window (None: full attention), as its attention module declares it
        self._windows = [getattr(desc.llm_attention(layer), "sliding_window", None) or None for layer in self.layers]
        if any(self._windows) and "flash" in self._impl:
            raise ValueError(
                f"decoder-stage pruning on sliding-window layers (window {max(w or 0 for w in self._windows)}) follows "
                f"each layer's mask in original positions; attn_implementation={self._impl!r} applies the window over "
                "the layer's own (pruned) keys instead: use 'sdpa' or 'eager' for the language model")
        num = len(self.layers)
        stages: list[_Stage] = []
        self._positions: dict[int, str] = {}
        for mi, m in enumerate(self.methods):
            if getattr(m, "stage", None) != "decoder":
                raise ValueError(f"attach_decoder takes decoder-stage methods; {type(m).__name__} has stage "
                                 f"{getattr(m, 'stage', None)!r}")
            pos = positions or getattr(m, "positions", "original")
            if pos not in POSITIONS:
                raise ValueError(f"{m.name}.positions={pos!r}; allowed: {', '.join(map(repr, POSITIONS))}")
            self._positions[mi] = pos
            sched = tuple(m.schedule(num))
            for i, k in enumerate(sched):
                if not 1 <= k < num:
                    raise ValueError(f"{m.name} prunes at layer {k}, but this model has {num} decoder layers: "
                                     f"a stage layer must be in [1, {num - 1}]")
                stages.append(_Stage(int(k), m, i, len(sched), mi))
        stages.sort(key=lambda s: s.layer)
        layers_seen = [s.layer for s in stages]
        if len(set(layers_seen)) != len(layers_seen):
            raise ValueError(f"two decoder-stage prunes at the same layer ({layers_seen}); give them different layers")
        if rotary is None and any(p == "compact" for p in self._positions.values()):
            raise ValueError("compact positions need the decoder's rotary_emb module (to recompute the position "
                             "embeddings of the renumbered tokens); pass positions='original'")
        self.stages = stages
        # what the hooks were planned from: a method's stage layers / signal layer assigned inside the block would
        # otherwise be silently ignored (the plan is fixed here); _top_hook refuses a changed plan
        self._plan = self._plan_of()
        self._stage_at = {s.layer: i for i, s in enumerate(stages)}
        # the layer whose attention / keys a stage reads: K - 1 (FastV, SparseVLM, DART) or K itself (PyramidDrop)
        self._own_signal = {i for i, s in enumerate(stages) if getattr(s.method, "signal_layer", "previous") == "own"}
        self._signal_at = {s.layer - 1: i for i, s in enumerate(stages) if i not in self._own_signal}
        self._raters = {s.method_id: s.method for s in stages if hasattr(s.method, "rate")}
        # per-call state lives per context (thread / asyncio task): concurrent calls on one model each have theirs
        self._run_var: ContextVar = ContextVar(f"vtcompress_decoder_run_{id(self)}", default=None)
        self.run: _Run | None = None
        self._hooks = [model.register_forward_pre_hook(self._top_hook, with_kwargs=True)]
        for j, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_layer_hook(j), with_kwargs=True))
        self._hooks += list(desc.decoder_hooks(model, self))  # e.g. Qwen3-VL: DeepStack injections into kept rows
        activate(self)  # the hooks act for calls made in this context only (vtcompress.models.context)

    def _plan_of(self) -> tuple:
        num = len(self.layers)
        return tuple((tuple(m.schedule(num)), getattr(m, "signal_layer", "previous")) for m in self.methods)

    @property
    def run(self) -> _Run | None:
        """State of the last prefill made in the calling context (``None`` before one)."""
        return self._run_var.get()

    @run.setter
    def run(self, value: _Run | None) -> None:
        self._run_var.set(value)

    def __deepcopy__(self, memo) -> DecoderHandle:
        # hooks copied onto a deep copy of the model still point here; they pass through there (see the gates)
        return self

    # -------------------------------------------------------------------------------- public
    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.run = None
        deactivate(self)

    def __enter__(self) -> DecoderHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def kept(self, stage: int = -1) -> tuple[Tensor, Tensor]:
        """Of the last prefill: ``(positions [B, Ls], real [B, Ls])`` kept after ``stage`` (absolute indices into
        the prefill's ``input_ids``, in the order the later layers see them; ``real`` False marks fillers and pads;
        a merged token is reported at its anchor's position)."""
        if self.run is None or not self.run.decisions:
            raise ValueError("no prefill has run through the pruned model yet")
        i = range(len(self.stages))[stage]
        if i not in self.run.decisions:
            raise ValueError(f"stage {stage} did not run in the last prefill")
        d = self.run.decisions[i]
        return d.keep, d.ok

    def stage_maps(self, layer: int) -> list[tuple[Tensor, Tensor, Tensor | None]] | None:
        """In the running prefill (or uncached continuation): how the rows of the hidden states that decoder layer
        ``layer`` receives and returns came from the call's sequence, one ``(rel [B, Ls], real [B, Ls], into)`` per
        stage decided at or before ``layer``, in order: stage ``s`` keeps rows ``rel`` of the rows entering it
        (``real`` False: fillers and pads), and, when it merged tokens, ``into [B, Lprev]`` is the row each
        entering row went into (``-1``: dropped). The rows after ``Ls`` (an uncached continuation's generated tokens)
        follow in order. ``None`` when nothing is pruned at that layer (every row as in the stock model)."""
        run = self.run
        if run is None or run.mode not in ("prefill", "continue") or not is_active(self):
            return None
        s = self._stage_of(layer)
        done = [i for i in range(s + 1) if i in run.decisions]
        if s < 0 or s not in run.decisions or all(run.decisions[i].identity for i in done):
            return None
        return [(run.decisions[i].rel, run.decisions[i].ok, run.decisions[i].into) for i in done]

    def kept_visual(self, stage: int = -1) -> list[Tensor]:
        """Of the last prefill: per row, the sorted positions (into ``input_ids``) of the visual tokens kept."""
        keep, ok = self.kept(stage)
        vis = self.run.vis.gather(1, keep) & ok
        return [keep[b][vis[b]].sort().values for b in range(keep.shape[0])]

    # -------------------------------------------------------------------------------- top-level hook
    def _top_hook(self, module, args, kwargs=None):
        # kwargs None: torch called us as a plain hook because another thread was (un)registering hooks right then
        if kwargs is None:
            return None
        if module is not self.model:  # a deep copy of the model: stock, and the copied hook goes away
            detach_hook(module, self._top_hook, self.model)
            return None
        if not is_active(self):  # a call from another thread / task, or outside the block
            return None
        plan = self._plan_of()
        if plan != self._plan:
            changed = [f"{m.name} {old[0]} -> {new[0]}" + (f" (signal_layer {old[1]!r} -> {new[1]!r})"
                                                              if old[1] != new[1] else "")
                       for m, old, new in zip(self.methods, self._plan, plan, strict=True) if old != new]
            raise ValueError(f"decoder-stage layers changed inside the apply block ({'; '.join(changed)}): the "
                             "hooks were planned for the old ones; leave the block and apply the method again")
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = cache_in(kwargs)
        if past is not None and getattr(past, "is_compileable", False):
            raise ValueError(f"decoder-stage pruning needs a growing cache (DynamicCache): layers from K on hold fewer "
                             f"tokens; got {type(past).__name__} (do not pass cache_implementation='static')")
        past_len = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        if past_len > 0:
            run = self.run
            if run is not None and run.mode in ("prefill", "decode") and past_len >= run.length:
                run.mode, run.past = "decode", past_len
                run.pe_cache = {}
                run.dmask = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
            elif run is not None:
                run.mode = "off"
            return None
        if ids is None:
            raise ValueError("decoder-stage pruning needs input_ids to find the visual tokens; got inputs_embeds only")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D [B, L] padding mask; got shape {tuple(mask.shape)}")
        pad_ok = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        run = self.run
        if (kwargs.get("use_cache") is False and run is not None and run.decisions and run.mode != "off"
                and ids.shape[0] == run.ids.shape[0] and ids.shape[1] > run.length
                and torch.equal(ids[:, : run.length], run.ids)):
            run.mode, run.pad_ok, run.full = "continue", pad_ok, ids.shape[1]
            run.signals = {}
            run.pe_cache = {}
            return None
        if kwargs.get("labels") is not None:
            raise ValueError("decoder-stage pruning returns logits for the kept positions only; labels are not "
                             "supported (compute the loss without the pruning hooks)")
        ph = torch.isin(ids, torch.tensor(self.token_ids, device=ids.device)) & pad_ok
        # image boundaries: the family's grouping of placeholders into images (contiguous runs for most)
        img = self.desc.placeholder_images(self.model, ids, ph)
        self.run = _Run("prefill", ids.clone(), ph.clone(), pad_ok, ids.shape[1], ids.shape[1], ph=ph, img=img)
        # bidirectional image blocks (Gemma 3 builds them from token_type_ids) or sliding windows: the layers' own
        # masks are followed (scoring rows, re-ordered and decode-step masks) instead of a plain causal rule
        self.run.structured = any(self._windows) or kwargs.get("token_type_ids") is not None
        return None

    # -------------------------------------------------------------------------------- per-layer hook
    def _stage_of(self, j: int) -> int:
        s = -1
        for i, st in enumerate(self.stages):
            if st.layer <= j:
                s = i
        return s

    def _make_layer_hook(self, j: int):
        def hook(module, args, kwargs=None):
            if kwargs is None:  # see _top_hook
                return None
            if module is not self.layers[j]:  # a deep copy of the model
                detach_hook(module, hook, self.layers[j])
                return None
            if not is_active(self):
                return None
            run = self.run
            if run is None or run.mode == "off":
                return None
            in_args = len(args) > 0
            hidden = args[0] if in_args else kwargs["hidden_states"]
            if run.mode == "prefill" and j == 0:
                self._first_layer(hidden, kwargs)
            if run.mode in ("prefill", "continue") and j in self._stage_at:
                si = self._stage_at[j]
                if run.mode == "prefill":
                    if si in self._own_signal:  # this layer's own q / k on the sequence entering it
                        prev = kwargs if si - 1 not in run.decisions else self._slice(si - 1, kwargs, hidden, j)
                        self._signal(si, module, hidden, prev)
                    self._decide(si, hidden)
                hidden = self._prune(si, hidden)
            s = self._stage_of(j)
            if s >= 0 and s in run.decisions:
                kwargs = self._slice(s, kwargs, hidden, j)
            if run.mode == "prefill" and j in self._signal_at:
                self._signal(self._signal_at[j], module, hidden, kwargs)
            if in_args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _first_layer(self, hidden: Tensor, kwargs: dict) -> None:
        """Prefill, input of layer 0: newline tokens, prefill positions, and query raters (from the embeddings)."""
        run = self.run
        if self._newline is not None and bool(run.ph.any()):
            # LLaVA-NeXT / OneVision: image_newline closes each row of the packed grid; it is an image placeholder
            # in input_ids but carries no patch. It is never pruned and not counted (it keeps the row layout).
            nl = (hidden == self._newline.to(device=hidden.device, dtype=hidden.dtype)).all(-1)
            run.vis = run.ph & ~nl
        pid = kwargs.get("position_ids")
        if isinstance(pid, Tensor) and pid.dim() == 2 and pid.shape[-1] == run.length:
            run.pid0 = pid.expand(hidden.shape[0], -1)
        else:
            run.pid0 = torch.arange(run.length, device=hidden.device).expand(hidden.shape[0], -1)
        for mi, method in self._raters.items():
            q_idx, q_ok = self._text_rows(run.vis & run.pad_ok, run.pad_ok, run.ph)
            v_idx, v_ok = _compact(run.vis)
            with torch.no_grad():
                raters = method.rate(_gather_seq(hidden, v_idx, 0, 1), v_ok, _gather_seq(hidden, q_idx, 0, 1), q_ok)
            flag = torch.zeros(hidden.shape[0], run.length + 1, dtype=torch.bool, device=hidden.device)
            flag.scatter_(1, torch.where(raters & q_ok, q_idx, torch.full_like(q_idx, run.length)), True)
            run.raters[mi] = flag[:, : run.length]

    # -------------------------------------------------------------------------------- sequences
    def _current(self, si: int) -> tuple[Tensor, Tensor]:
        """Absolute positions and real-token flags of the sequence entering stage ``si`` (prefill)."""
        run = self.run
        if si == 0:
            b = run.ids.shape[0]
            pos = torch.arange(run.length, device=run.ids.device).expand(b, -1)
            return pos, run.pad_ok
        d = run.decisions[si - 1]
        return d.keep, d.ok

    def _current_pid(self, si: int) -> Tensor:
        """Position ids of the sequence entering stage ``si`` (prefill)."""
        run = self.run
        if si > 0 and run.decisions[si - 1].pid is not None:
            return run.decisions[si - 1].pid
        return run.pid0.gather(1, self._current(si)[0])

    @staticmethod
    def _last(ok: Tensor) -> Tensor:
        """``[B, 1]`` position of the last real token of each row."""
        ar = torch.arange(ok.shape[1], device=ok.device)
        return torch.where(ok, ar, torch.full_like(ar, -1)).amax(dim=1, keepdim=True).clamp(min=0)

    def _text_rows(self, vis: Tensor, ok: Tensor, ph: Tensor) -> tuple[Tensor, Tensor]:
        """The prompt rows: real non-placeholder tokens after each row's first visual token, compacted."""
        ar = torch.arange(ok.shape[1], device=ok.device)
        first_vis = torch.where(vis, ar, torch.full_like(ar, ok.shape[1])).amin(dim=1, keepdim=True)
        text = ok & ~ph & (ar[None] > first_vis)
        none = ~text.any(1, keepdim=True)
        text = text | (none & vis.any(1, keepdim=True) & (ar[None] == self._last(ok)))  # no prompt: the last token
        return _compact(text)

    def _queries(self, si: int, vis: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """Query rows for the signal: the last real token, or the prompt tokens (raters, if the method rates)."""
        run = self.run
        stage = self.stages[si]
        method = stage.method
        if getattr(method, "query", "last") == "last":
            last = self._last(ok)
            return last, torch.ones_like(last, dtype=torch.bool)
        cur = self._current(si)[0]
        q_idx, q_ok = self._text_rows(vis, ok, run.ph.gather(1, cur))
        if stage.method_id in run.raters:  # only the raters chosen once from the embeddings query
            q_ok = q_ok & run.raters[stage.method_id].gather(1, cur).gather(1, q_idx)
        return q_idx, q_ok

    def _vis(self, si: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(cur, ok, vis)`` of the sequence entering stage ``si``: prunable visual tokens (the last never)."""
        cur, ok = self._current(si)
        vis = self.run.vis.gather(1, cur) & ok & (torch.arange(ok.shape[1], device=ok.device)[None] != self._last(ok))
        return cur, ok, vis

    def _signal(self, si: int, layer: nn.Module, hidden: Tensor, kwargs: dict) -> None:
        """Attention rows (and keys) the method of stage ``si`` needs, from ``layer`` on its input ``hidden``."""
        run = self.run
        method = self.stages[si].method
        cur, ok, vis = self._vis(si)
        sig: dict[str, Tensor] = {}
        if not bool(vis.any()):  # no visual token in the batch (text-only): nothing to rank
            run.signals[si] = sig
            return
        with torch.no_grad():
            if "attn" in method.needs:
                q_idx, q_ok = self._queries(si, vis, ok)
                mask = kwargs.get("attention_mask")
                allowed = None
                if run.structured and isinstance(mask, Tensor) and mask.dim() == 4:
                    # the rows of the layer's own mask: its sliding window / image blocks, padding and fillers
                    allowed = _allowed(_gather_seq(mask, q_idx, 0, 2)[:, 0])
                rows = attention_rows(layer, hidden, kwargs["position_embeddings"], q_idx, ok, desc=self.desc,
                                      allowed=allowed)
                sig["attn"] = rows.transpose(1, 2)  # [B, L, Q]
                sig["q_ok"] = q_ok
            if "keys" in method.needs:
                # the keys the layer caches: k_proj (+ k_norm) of the normed input, rotated by RoPE, all KV heads
                # concatenated ([B, L, Hkv * hd]) — DART's reference reads these post-RoPE keys of layer K - 1
                attn = self.desc.llm_attention(layer)
                b, n, _ = hidden.shape
                k = attn.k_proj(self.desc.llm_input_norm(layer)(hidden)).view(b, n, -1, attn.head_dim)
                if getattr(attn, "k_norm", None) is not None:
                    k = attn.k_norm(k)
                cos, sin = kwargs["position_embeddings"]
                k = _rope(self.desc.rotary_fn(attn), k.transpose(1, 2), cos, sin)
                sig["keys"] = k.transpose(1, 2).reshape(b, n, -1)
        run.signals[si] = sig

    def _decide(self, si: int, hidden: Tensor) -> None:
        """At the input of layer ``K``: run the method on each image's visual tokens, then choose the kept sequence.

        Each image (placeholder run) of each row is one row of the method's :class:`VisualTokens`, so budgets
        count per image, as at the projector stage; prompt signals are those of the image's sample.
        """
        run = self.run
        stage = self.stages[si]
        method = stage.method
        sig = run.signals.pop(si, {})
        cur, ok, vis = self._vis(si)
        b, n, _ = hidden.shape
        dev = hidden.device
        ar = torch.arange(n, device=dev)
        compact = self._positions[stage.method_id] == "compact" and not self._mrope
        prio = torch.where(ok, torch.zeros_like(cur), torch.ones_like(cur))  # 0 real, 1 pad/filler, 2 dropped
        slots = values = slot_ok = None
        seqkey = ar[None].expand(b, -1) * (n + 1)  # the new order: positional, merged tokens after their image
        img = torch.where(vis, run.img.gather(1, cur), torch.full_like(cur, -1))
        n_img = int(run.img.max()) + 1 if run.img.numel() else 0
        cnt = torch.zeros(b, n_img + 1, dtype=torch.long, device=dev).scatter_add_(1, img + 1, torch.ones_like(img))
        cnt = cnt[:, 1:]
        if stage.index == 0:
            run.n0[stage.method_id] = cnt
        pairs = (cnt > 0).nonzero()  # [P, 2] (row, image)
        went = None  # [B, n] the current position of the output token each row went into (n: dropped)
        if pairs.shape[0] > 0 and sig is not None:
            bp, rp = pairs[:, 0], pairs[:, 1]
            flag = vis[bp] & (img[bp] == rp[:, None])  # [P, n]
            img_idx, img_ok = _compact(flag)  # [P, Nmax] positions in the current sequence
            flat = bp[:, None] * n + img_idx

            def rows_of(t: Tensor) -> Tensor:  # [B, n, ...] -> [P, Nmax, ...]
                return t.reshape(b * n, *t.shape[2:])[flat]

            x = rows_of(hidden)
            text = text_mask = text_keys = text_seq = None
            if getattr(method, "query", "last") == "text" or "text" in method.needs:
                q_idx, q_ok = self._queries(si, vis, ok)
                text, text_mask = _gather_seq(hidden, q_idx, 0, 1)[bp], q_ok[bp]
                if "keys" in sig:
                    text_keys = _gather_seq(sig["keys"], q_idx, 0, 1)[bp]
                text_seq = (ok.long().cumsum(1) - 1).gather(1, q_idx)[bp]
            if getattr(method, "normed", False):  # DART: cosine similarity on the final-RMSNorm'd states
                norm = self.desc.final_norm(self.model)
                x = norm(x)
                text = norm(text) if text is not None else None
            x = torch.where(img_ok[..., None], x, torch.zeros((), device=dev, dtype=x.dtype))
            keys = rows_of(sig["keys"]) if "keys" in sig else None
            tokens = VisualTokens.from_features(x, grid=(1, img_idx.shape[1]), mask=img_ok, keys=keys, text=text,
                                                text_mask=text_mask)
            if "attn" in sig:
                a = sig["attn"]
                tokens = tokens.replace(attn=rows_of(a), text_mask=text_mask if text_mask is not None
                                        else sig["q_ok"][bp])
            tokens.validate()
            for name in method.needs:
                if getattr(tokens, name, None) is None:
                    raise ValueError(f"method {method.name!r} needs {name!r}, which the decoder stage does not provide")
            kw = {}
            if getattr(method, "uses_context", False):
                kw["context"] = StageContext(
                    text_keys=text_keys, vis_seq=(ok.long().cumsum(1) - 1).reshape(-1)[flat], text_seq=text_seq,
                    initial=run.n0[stage.method_id][bp, rp], rated=stage.method_id in run.raters)
            with torch.no_grad():
                out = method.compress_stage(tokens, stage.index, stage.count, **kw)
            rank = kw["context"].merge_rank if kw and kw["context"].merge_rank is not None else None
            order = out.pos.argsort(dim=1, stable=True)  # sort_by_pos, keeping the merge ranks aligned
            out = out.sort_by_pos()
            if rank is not None:
                rank = rank.gather(1, order)
            kept_pos = img_idx.gather(1, out.pos)  # position in the current sequence of each output token
            kept_pos = torch.where(out.mask, kept_pos, torch.full_like(kept_pos, n))
            flat_kept = torch.where(out.mask, bp[:, None] * n + kept_pos, torch.full_like(kept_pos, b * n))
            kept = torch.zeros(b * n + 1, dtype=torch.bool, device=dev).scatter_(0, flat_kept.reshape(-1), True)
            kept = kept[: b * n].view(b, n)
            prio = torch.where(vis & ~kept, torch.full_like(prio, 2), prio)
            merged = out.mask & (out.size != 1)
            if bool(merged.any()):
                a = out.assign  # [P, Nmax] output token of each image token, -1: dropped
                tgt = torch.where((a >= 0) & img_ok, kept_pos.gather(1, a.clamp(min=0)), torch.full_like(a, n))
                went = ar[None].expand(b, -1).clone()
                went.view(-1)[flat[img_ok]] = tgt[img_ok]
                d = hidden.shape[2]
                flat_m = torch.where(merged, flat_kept, torch.full_like(flat_kept, b * n)).reshape(-1)
                is_slot = torch.zeros(b * n + 1, dtype=torch.bool, device=dev).scatter_(0, flat_m, True)[: b * n]
                val = torch.zeros(b * n + 1, d, dtype=hidden.dtype, device=dev)
                val[flat_m] = out.x.reshape(-1, out.x.shape[2]).to(hidden.dtype)
                slots, slot_ok = _compact(is_slot.view(b, n))
                values = _gather_seq(val[: b * n].view(b, n, d), slots, 0, 1)
                if compact and rank is not None:
                    # the reference appends the merged tokens after the kept ones of their image, in cluster order
                    img_key = torch.where(img >= 0, torch.arange(b, device=dev)[:, None] * n_img + img,
                                          torch.full_like(img, b * n_img))
                    end = torch.full((b * n_img + 1,), -1, dtype=torch.long, device=dev)
                    end.scatter_reduce_(0, img_key.reshape(-1), ar[None].expand(b, -1).reshape(-1), reduce="amax")
                    seq_end = end[(bp * n_img + rp)]  # [P] last visual position of each image
                    mkey = seq_end[:, None] * (n + 1) + 1 + rank.clamp(min=0)
                    flat_k = torch.where(merged, flat_kept, torch.full_like(flat_kept, b * n)).reshape(-1)
                    sk = torch.cat([seqkey.reshape(-1), seqkey.new_zeros(1)])
                    sk[flat_k] = mkey.reshape(-1)
                    seqkey = sk[: b * n].view(b, n)
        real = (prio == 0).sum(1)
        new_len = int(real.max())
        chosen = (prio * (n + 1) + ar[None]).argsort(dim=1)[:, :new_len]  # real first, then pads, then dropped
        # in positional order (pads stay where they were: the last real token stays last), or in the new order
        rel = chosen.gather(1, seqkey.gather(1, chosen).argsort(dim=1)) if compact and slots is not None \
            else chosen.sort(dim=1).values
        new_ok = prio.gather(1, rel) == 0
        keep = cur.gather(1, rel)
        # not in positional order (merged tokens appended, now or at an earlier stage): masks are rebuilt causal
        reordered = bool((keep[:, 1:] < keep[:, :-1]).any()) if new_len > 1 else False
        fix = bool((~new_ok & run.pad_ok.gather(1, keep)).any())
        identity = new_len == n and bool((rel == ar[None]).all()) and slots is None and not fix
        if slots is not None:
            inv = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
            inv.scatter_(1, rel, torch.arange(new_len, device=dev).expand(b, -1).contiguous())
            slots = inv.gather(1, torch.where(slot_ok, slots, torch.full_like(slots, n)))
            slot_ok = slot_ok & (slots >= 0)
            slots = slots.clamp(min=0)
            into = inv.gather(1, went) if went is not None else None
        else:
            into = None
        prev_pid = self._current_pid(si)
        pid = shift = None
        prev = run.decisions.get(si - 1)
        if compact and not identity:
            # renumber: each row's real tokens get contiguous positions from its first real token's, in the new order
            first = torch.where(ok, ar[None], torch.full_like(cur, n)).amin(1, keepdim=True).clamp(max=n - 1)
            base = prev_pid.gather(1, first)
            pid = base + (new_ok.long().cumsum(1) - 1).clamp(min=0)
        elif prev is not None and prev.pid is not None:
            pid = prev.pid.gather(1, rel)
        if pid is not None:
            last_new = self._last(new_ok)
            shift = (run.pid0.gather(1, self._last(run.pad_ok)) - pid.gather(1, last_new)).squeeze(1)
            identity = False if prev is not None and prev.pid is not None else identity
        run.decisions[si] = _Decision(rel, keep, new_ok, fix, identity, slots, values, slot_ok, pid, shift, reordered,
                                      into)

    def _prune(self, si: int, hidden: Tensor) -> Tensor:
        d = self.run.decisions[si]
        if d.identity:
            return hidden
        rel = self._extend(d.rel, si)
        out = _gather_seq(hidden, rel, 0, 1)
        if d.slots is not None:
            cur = _gather_seq(out, d.slots, 0, 1)
            new = torch.where(d.slot_ok[..., None], d.values.to(out.dtype), cur)
            out = out.scatter(1, d.slots[..., None].expand(-1, -1, out.shape[2]), new)
        return out

    def _extend(self, idx: Tensor, si: int) -> Tensor:
        """In an uncached continuation, the positions after the prompt are appended (all kept)."""
        run = self.run
        extra = run.full - run.length
        if run.mode != "continue" or extra <= 0:
            return idx
        prev_len = run.length if si == 0 else run.decisions[si - 1].keep.shape[1]
        tail = torch.arange(prev_len, prev_len + extra, device=idx.device).expand(idx.shape[0], -1)
        return torch.cat([idx, tail], dim=1)

    # -------------------------------------------------------------------------------- kwargs of a layer
    def _renumbered(self, s: int, kwargs: dict, hidden: Tensor, pid: Tensor, j: int | None = None) -> dict:
        """Position ids ``pid [B, L]`` and their rotary embeddings, from the decoder's own ``rotary_emb`` (for layer
        ``j``'s type when the rotary embedding differs per layer type)."""
        run = self.run
        kind = None
        if self._rotary_typed and j is not None:
            kind = getattr(self.desc.llm_attention(self.layers[j]), "layer_type", None)
        if (s, kind) not in run.pe_cache:
            args = (hidden, pid, kind) if self._rotary_typed else (hidden, pid)
            run.pe_cache[(s, kind)] = self._rotary(*args)
        kwargs["position_embeddings"] = run.pe_cache[(s, kind)]
        if isinstance(kwargs.get("position_ids"), Tensor):
            kwargs["position_ids"] = None if "flash" in self._impl else pid
        return kwargs

    def _slice(self, s: int, kwargs: dict, hidden: Tensor, j: int | None = None) -> dict:
        """Layer ``j``'s kwargs for the sequence kept after stage ``s``: positions, rotary embeddings and mask."""
        run = self.run
        d = run.decisions[s]
        q_len = hidden.shape[1]
        if d.identity:
            return kwargs
        kwargs = dict(kwargs)
        b = d.keep.shape[0]
        dev = d.keep.device
        if run.mode == "decode":
            if d.pid is not None:
                pid = kwargs.get("position_ids")
                if not isinstance(pid, Tensor):
                    cp = kwargs.get("cache_position")
                    pid = cp[None] if isinstance(cp, Tensor) else torch.arange(run.past, run.past + q_len,
                                                                               device=dev)[None]
                kwargs = self._renumbered(s, kwargs, hidden, pid.expand(b, -1) - d.shift[:, None], j)
            mask = kwargs.get("attention_mask")
            kv = mask.shape[-1] if isinstance(mask, Tensor) else None
            if run.structured and j is not None and "flash" not in self._impl and (
                    kv is not None or d.fix or self._windows[j]):
                kwargs["attention_mask"] = self._decode_mask(d, j, kwargs, q_len, mask)
            elif kv is not None:
                tail = torch.arange(run.length, kv, device=dev).expand(b, -1)
                key_idx = torch.cat([d.keep, tail], dim=1)
                key_ok = torch.cat([d.ok, torch.ones_like(tail, dtype=torch.bool)], dim=1)
                mask = _gather_seq(mask, key_idx, 0, mask.dim() - 1)
                if d.fix:
                    mask = self._hide(mask, key_ok, q_len, diagonal=False)
                kwargs["attention_mask"] = mask
            elif d.fix:  # sdpa without padding passes no mask; fillers still have to be hidden
                tail = torch.arange(run.length, run.past + q_len, device=dev).expand(b, -1)
                key_ok = torch.cat([d.ok, torch.ones_like(tail, dtype=torch.bool)], dim=1)
                kwargs["attention_mask"] = self._hide(None, key_ok, q_len, diagonal=False)
            return kwargs
        full = run.full
        if run.mode == "continue" and run.full > run.length:
            tail = torch.arange(run.length, run.full, device=dev).expand(b, -1)
            keep = torch.cat([d.keep, tail], dim=1)
            ok = torch.cat([d.ok, run.pad_ok[:, run.length:]], dim=1)
        else:
            keep, ok = d.keep, d.ok
        if d.pid is not None:
            pid = d.pid
            if keep.shape[1] > pid.shape[1]:  # continuation: the generated tail keeps its stock positions - shift
                given = kwargs.get("position_ids")
                tail_pid = (given.expand(b, -1)[:, run.length:] if isinstance(given, Tensor) and given.shape[-1] == full
                            else torch.arange(run.length, full, device=dev).expand(b, -1)) - d.shift[:, None]
                pid = torch.cat([pid, tail_pid], dim=1)
            kwargs = self._renumbered(s, kwargs, hidden, pid, j)
        else:
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(_gather_seq(t, keep, 0, t.dim() - 2) for t in pe)
            pid = kwargs.get("position_ids")
            if isinstance(pid, Tensor) and pid.shape[-1] == full:
                # FlashAttention reads gapped position ids of a batch of one as packed sequences: drop them there
                # (positions travel in position_embeddings anyway).
                kwargs["position_ids"] = None if "flash" in self._impl else _gather_seq(pid, keep, pid.dim() - 2,
                                                                                         pid.dim() - 1)
        cp = kwargs.get("cache_position")
        if isinstance(cp, Tensor) and cp.shape[-1] == full:
            kwargs["cache_position"] = torch.arange(keep.shape[1], device=dev)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):
            if mask.dim() == 4:
                if mask.shape[-1] != full or mask.shape[-2] != full:
                    raise ValueError(f"expected a [B, 1, {full}, {full}] prefill mask; got {tuple(mask.shape)}")
                if d.reordered and run.structured:
                    # the layer's own mask at the kept tokens' positions (merged ones at their anchors), causal in the
                    # new order except where the stock mask is two-way (a bidirectional image block)
                    g = _gather_seq(_gather_seq(mask, keep, 0, 2), keep, 0, 3)
                    ga = _allowed(g)
                    n_k = keep.shape[1]
                    causal = torch.ones(n_k, n_k, dtype=torch.bool, device=dev).tril()
                    mask = _as_mask(ga & (causal | ga.transpose(-1, -2)), g)
                elif d.reordered:  # causal in the new order (merged tokens come after their image's kept tokens)
                    mask = self._hide(None, ok, keep.shape[1], diagonal=True, like=mask)
                else:
                    mask = _gather_seq(_gather_seq(mask, keep, 0, 2), keep, 0, 3)
                w = self._windows[j] if j is not None else None
                if w and run.structured and d.reordered:
                    # the layer's cache keeps its last window - 1 entries in ITS order: a key that many slots back is
                    # gone in decoding, so the window also counts slots (implied by positions when in positional order)
                    n_k = keep.shape[1]
                    ar_k = torch.arange(n_k, device=dev)
                    mask = _as_mask(_allowed(mask) & (ar_k[None, :] > ar_k[:, None] - w), mask)
            elif mask.dim() == 2:
                mask = _gather_seq(mask, keep, 0, 1)
            else:
                raise ValueError(f"unsupported attention mask of shape {tuple(mask.shape)}")
        elif mask is not None:
            raise ValueError(f"decoder-stage pruning supports tensor masks (eager, sdpa, flash); got "
                             f"{type(mask).__name__}")
        if d.fix:
            mask = self._hide(mask, ok, keep.shape[1], diagonal=True)
        kwargs["attention_mask"] = mask
        return kwargs

    def _decode_mask(self, d: _Decision, j: int, kwargs: dict, q_len: int, stock: Tensor | None) -> Tensor:
        """Decode-step mask ``[B, 1, q, keys]`` of layer ``j`` (from stage ``K`` on) when the layers' masks are not
        plain causal: built from the step's 2-D padding mask over the keys this layer's cache actually returns.

        The stock masks are sized for the first layer of each type, whose cache may be pruned or not (Gemma 3's first
        full-attention layer can come after ``K``), and a sliding-window layer caches only its last ``window - 1``
        entries. So: the layer's sequence is the prefill's kept tokens, then every generated one; its cache returns
        the last (cached + q) of them; each is visible iff real (not padding / filler), not after the query and, on a
        sliding layer, within the window in original positions -- what the stock model's layer sees, minus the
        dropped tokens. Decode queries are text, so no image block applies (the stock decode mask has none either)."""
        run = self.run
        b = d.keep.shape[0]
        dev = d.keep.device
        end = run.past + q_len
        tail = torch.arange(run.length, end, device=dev).expand(b, -1)
        seq = torch.cat([d.keep, tail], dim=1)
        seq_ok = torch.cat([d.ok, torch.ones_like(tail, dtype=torch.bool)], dim=1)
        n = seq.shape[1]
        cache = cache_in(kwargs)
        layers = getattr(cache, "layers", None)
        idx = getattr(self.desc.llm_attention(self.layers[j]), "layer_idx", j)
        keys = getattr(layers[idx], "keys", None) if layers is not None and idx < len(layers) else None
        if isinstance(keys, Tensor) and keys.dim() == 4:
            n = min(n, int(keys.shape[-2]) + q_len)
        key_abs, key_ok = seq[:, -n:], seq_ok[:, -n:]
        if run.dmask is not None:
            key_ok = key_ok & run.dmask.to(dev).gather(1, key_abs.clamp(max=run.dmask.shape[1] - 1))
        q_abs = torch.arange(run.past, end, device=dev)
        allowed = key_ok[:, None, None, :] & (key_abs[:, None, None, :] <= q_abs[None, None, :, None])
        w = self._windows[j]
        if w:
            allowed &= key_abs[:, None, None, :] > q_abs[None, None, :, None] - w
        return _as_mask(allowed, stock)

    def _hide(self, mask: Tensor | None, key_ok: Tensor, q_len: int, diagonal: bool, like: Tensor | None = None
              ) -> Tensor:
        """Hide filler keys (``key_ok`` False) in ``mask``; in the prefill each filler still sees itself.

        With ``mask=None`` a causal mask is built (bool, or in ``like``'s dtype: 0 / dtype minimum)."""
        b, kv = key_ok.shape
        dev = key_ok.device
        allowed = key_ok[:, None, None, :].expand(b, 1, q_len, kv)
        if diagonal:
            allowed = allowed | torch.eye(q_len, kv, dtype=torch.bool, device=dev)[None, None]
        if mask is None:
            if "flash" in self._impl and like is None:
                return key_ok.to(torch.long)
            causal = torch.ones(q_len, kv, dtype=torch.bool, device=dev).tril(kv - q_len)
            built = allowed & causal[None, None]
            if like is None or like.dtype == torch.bool:
                return built
            return torch.zeros((), dtype=like.dtype, device=dev).expand(built.shape).masked_fill(
                ~built, torch.finfo(like.dtype).min)
        if mask.dim() == 2:
            return mask * key_ok.to(mask.dtype)
        if mask.dtype == torch.bool:
            return mask & allowed
        return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def attach_decoder(model: nn.Module, methods: list[Compressor] | Compressor,
                   positions: str | None = None) -> DecoderHandle:
    """Prune visual tokens inside ``model``'s LLM with decoder-stage ``methods``; returns the handle.

    Each method gives its stage layers (``method.schedule(num_layers)``), which query rows it needs
    (``method.query``: ``"last"`` or ``"text"``), which layer they are read from (``method.signal_layer``:
    ``"previous"`` = ``K - 1``, ``"own"`` = ``K``) and signals (``method.needs``), and decides on
    :class:`~vtcompress.tokens.VisualTokens` per stage (``method.compress_stage(tokens, stage)``), one row per
    image. ``positions`` overrides every method's ``positions`` (``"original"`` / ``"compact"``). Call
    ``handle.remove()`` (or use ``with attach_decoder(...):``) to restore the model exactly.
    """
    if isinstance(methods, Compressor):
        methods = [methods]
    if not methods:
        raise ValueError("attach_decoder needs at least one decoder-stage method")
    return DecoderHandle(model, list(methods), positions=positions)
