"""Encoder-stage mechanics: token merging inside the model's own vision tower (ToMe, arXiv 2210.09461).

:func:`encoder_merging` puts hooks on the vision encoder's layers so that, while it is active, every run of
the tower merges tokens after each layer up to the feature layer the model reads, and the model's own
``get_image_features`` returns fewer tokens per image. Nothing else in the model changes; leaving the
context removes every hook. What runs per encoder layer ``l`` (``T = P + n`` tokens, ``P`` prefix tokens
such as CLIP's [CLS]):

1. forward pre-hook (``with_kwargs``): once tokens have been merged, add the proportional-attention bias
   ``log(size) [B, 1, 1, T]`` to the layer's additive 4-D ``attention_mask`` (created if ``None``), so the
   stock attention (SDPA or eager) weighs a token standing for ``s`` patches ``s`` times;
2. forward hook on ``self_attn.k_proj``: keep the head-mean keys ``[B, T, Dh]`` (ToMe's similarity metric);
3. forward hook on the layer (prepended, so the model's own ``hidden_states`` recorder sees the merged
   states): bipartite soft matching merges ``r_l`` patch tokens (size-weighted mean); the prefix tokens
   never merge. The schedule ``r_l`` comes from the method (:meth:`ToMeEncoder.schedule`).

Hidden-state index ``f`` (what ``vision_feature_layer`` selects) is the output of layer ``f - 1`` (index 0 is
the embeddings), so merging runs in layers ``0 .. f_min - 1``: the feature layer holds exactly the scheduled
number of patch tokens, and several feature layers (a list, concatenated by the model) hold the same tokens.
Layers after the feature layer still run (the stock tower computes them) on the merged tokens with the bias.

After a run, :attr:`EncoderMerging.tokens` holds the bookkeeping as :class:`~vtcompress.tokens.VisualTokens`
(one row per image / crop the tower saw): ``x`` the patch tokens at the feature layer(s) (prefix removed),
``keys`` their merged keys, ``size``, ``pos`` (anchor patch) and ``assign`` relative to the original grid.

Limits: the towers of LLaVA-NeXT / LLaVA-OneVision (anyres packing), Qwen2-VL (2x2 patch merger) and InternVL
(pixel shuffle) rebuild a full grid after the tower, so fewer tokens cannot flow through their stock
``get_image_features``; for them the tower-level merging still runs and is observable (``tokens``, the tower's
``hidden_states``), but the LLM path needs the full grid. Proportional attention needs an additive mask, so
``flash_attention_*`` vision attention is refused (use ``sdpa`` / ``eager``, or ``prop_attn=False``).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..tokens import VisualTokens
from .description import ModelDescription

__all__ = ["EncoderSpec", "EncoderMerging", "encoder_merging", "resolve_encoder_spec"]


# ------------------------------------------------------------------------------------------- where things are
@dataclass
class EncoderSpec:
    """Where a vision tower's pieces are, resolved for one model.

    Attributes:
        layers: the vision encoder layers, in order (``L`` modules, each called as ``layer(hidden, mask, ...)``).
        num_prefix_tokens: ``P`` tokens before the patches that never merge (1 for CLIP's [CLS], 0 for SigLIP).
        feature_layers: hidden-state indices the model reads, resolved to ``0 .. L`` (0 = embeddings).
        grid: ``(H, W)`` patch grid of one image / crop, or ``None`` to infer a square grid at run time.
        attention: the attention module of each layer (``None``: unknown), whose implementation decides whether
            proportional attention's additive bias can be taken.
        key_proj: the keys projection of each layer's attention (``None`` entries: none; ToMe's metric reads it).
    """

    layers: list[nn.Module]
    num_prefix_tokens: int
    feature_layers: tuple[int, ...]
    grid: tuple[int, int] | None = None
    attention: list[nn.Module | None] | None = None
    key_proj: list[nn.Module | None] | None = None

    @property
    def merge_layers(self) -> int:
        """Number of leading layers that merge (those up to the first feature layer)."""
        return min(self.feature_layers)


def _value(source: Any, name: str, model: nn.Module) -> Any:
    """``source.name`` (called with ``model`` when it is a method), or ``None`` if ``source`` has none."""
    if source is None or not hasattr(source, name):
        return None
    v = getattr(source, name)
    if callable(v) and not isinstance(v, (nn.Module, Tensor)):
        try:
            return v(model)
        except TypeError:
            return v()
    return v


def resolve_encoder_spec(
    model: nn.Module,
    adapter: Any = None,
    *,
    layers: Sequence[nn.Module] | None = None,
    num_prefix_tokens: int | None = None,
    feature_layer: int | Sequence[int] | None = None,
    grid: tuple[int, int] | None = None,
) -> EncoderSpec:
    """Resolve an :class:`EncoderSpec` from explicit arguments, else the ``adapter`` (the model family's
    :class:`~vtcompress.models.description.ModelDescription` when ``None``).

    The adapter provides ``vision_layers(model)``, ``num_prefix_tokens``, ``feature_layer`` and ``grid`` (each
    an attribute or a method taking the model), and, when it is a description, each layer's attention module and
    keys projection.
    """
    if adapter is None:
        from .registry import adapter_for

        adapter = adapter_for(model)
    if layers is None:
        layers = _value(adapter, "vision_layers", model)
    if layers is None:
        raise ValueError(f"{type(adapter).__name__} does not say where the vision layers are; pass layers=[...]")
    layers = list(layers)
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise ValueError(f"layers must be a non-empty list of nn.Module; got {layers!r}")
    if num_prefix_tokens is None:
        num_prefix_tokens = _value(adapter, "num_prefix_tokens", model)
    if num_prefix_tokens is None:
        num_prefix_tokens = 0
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0; got {num_prefix_tokens!r}")
    if feature_layer is None:
        feature_layer = _value(adapter, "feature_layer", model)
    if feature_layer is None:
        feature_layer = -1
    wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    n_states = len(layers) + 1
    resolved = []
    for f in wanted:
        if isinstance(f, bool) or not isinstance(f, int) or not -n_states <= f < n_states:
            raise ValueError(
                f"feature_layer {f!r} is out of range: the tower has {len(layers)} layers, so hidden-state indices "
                f"run from {-n_states} to {n_states - 1}"
            )
        resolved.append(f % n_states)
    if grid is None:
        grid = _value(adapter, "grid", model)
    if grid is not None:
        grid = (int(grid[0]), int(grid[1]))
    attention = key_proj = None
    if isinstance(adapter, ModelDescription):
        attention = [_or_none(adapter.attention_module, layer) for layer in layers]
        key_proj = [adapter.vision_key_proj(layer) for layer in layers]
    return EncoderSpec(layers=layers, num_prefix_tokens=num_prefix_tokens, feature_layers=tuple(resolved), grid=grid,
                       attention=attention, key_proj=key_proj)


def _or_none(fn, *args):
    try:
        return fn(*args)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- the hooks
@dataclass
class _RunState:
    """What one run of the tower has produced so far (reset at layer 0)."""

    vt: VisualTokens | None = None  # patch tokens after the latest merge
    size: Tensor | None = None  # [B, T] sizes of all tokens (prefix included), None while all are 1
    keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, T, Dh] head-mean keys
    features: dict[int, Tensor] = field(default_factory=dict)  # feature index -> [B, n, D] patch states


def _mask_position(layer: nn.Module) -> int | None:
    """Positional index of the ``attention_mask`` parameter of ``layer.forward`` (None if it has none)."""
    params = [p for p in inspect.signature(layer.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    return names.index("attention_mask") if "attention_mask" in names else None


class EncoderMerging:
    """Handle of an active encoder-stage merging; a context manager (also ``.remove()``).

    Build it with :func:`encoder_merging`. After each run of the vision tower, :attr:`tokens` holds the
    feature-layer :class:`VisualTokens`; :attr:`schedule` is the number of tokens merged after each layer and
    :attr:`num_patch_tokens` the patch tokens per image at the feature layer (the LLM receives these, plus the
    prefix tokens when the model keeps them, e.g. LLaVA's ``vision_feature_select_strategy="full"``).
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, method: Any) -> None:
        if getattr(method, "stage", None) != "encoder":
            raise ValueError(
                f"encoder_merging needs an encoder-stage method; {getattr(method, 'name', method)!r} has stage "
                f"{getattr(method, 'stage', None)!r}"
            )
        self.model = model
        self.spec = spec
        self.method = method
        self.tokens: VisualTokens | None = None
        self._state = _RunState()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

        grid = spec.grid
        if grid is None:
            raise ValueError("the patch grid is unknown; pass grid=(H, W) (the tower's image_size // patch_size)")
        self.num_patches = grid[0] * grid[1]
        n_merge = spec.merge_layers
        self.schedule: list[int] = list(method.schedule(self.num_patches, n_merge))
        if len(self.schedule) != n_merge or not all(isinstance(r, int) and r >= 0 for r in self.schedule) \
                or sum(self.schedule) >= self.num_patches:
            raise ValueError(
                f"{getattr(method, 'name', method)!r} returned the schedule {self.schedule}; expected {n_merge} "
                f"ints >= 0 (one per layer before the feature layer) summing to less than {self.num_patches} patches"
            )
        self.num_patch_tokens = self.num_patches - sum(self.schedule)
        self.prop_attn = bool(getattr(method, "prop_attn", True))
        self.use_keys = getattr(method, "metric", "keys") == "keys"
        if sum(self.schedule) > 0:
            self._check_layers()
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    # --------------------------------------------------------------------------- checks
    def _check_layers(self) -> None:
        first = next(i for i, r in enumerate(self.schedule) if r > 0)
        later = self.spec.layers[first + 1 :]
        if self.prop_attn:
            for i, layer in enumerate(later, start=first + 1):
                if _mask_position(layer) is None:
                    raise ValueError(
                        f"vision layer {i} ({type(layer).__name__}) takes no attention_mask, so proportional "
                        "attention cannot add its log(size) bias; use prop_attn=False"
                    )
                attn = self.spec.attention[i] if self.spec.attention is not None else None
                impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
                if isinstance(impl, str) and impl.startswith("flash"):
                    raise ValueError(
                        f"vision attention implementation {impl!r} takes no additive bias, which proportional "
                        "attention needs; switch the vision tower to 'sdpa' or 'eager', or use prop_attn=False"
                    )
        if self.use_keys:
            for i, r in enumerate(self.schedule):
                if r > 0 and self._key_proj(i) is None:
                    raise ValueError(
                        f"vision layer {i} ({type(self.spec.layers[i]).__name__}) has no keys projection (k_proj) to "
                        "read keys from; use metric='features'"
                    )

    def _key_proj(self, i: int) -> nn.Module | None:
        return self.spec.key_proj[i] if self.spec.key_proj is not None else None

    # --------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        # the hooks merge only the runs of the thread that entered (one call under apply): a concurrent call on the
        # same model from another thread sees the stock tower
        self._thread = threading.get_ident()
        spec = self.spec
        feature_after = {f - 1 for f in spec.feature_layers if f > 0}
        merges = [i for i, r in enumerate(self.schedule) if r > 0]
        for i, layer in enumerate(spec.layers):
            # layer 0 resets the per-run state; layers after the first merge get the log(size) bias
            if i == 0 or (self.prop_attn and merges and i > merges[0]):
                self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            r = self.schedule[i] if i < len(self.schedule) else 0
            if self.use_keys and r > 0:
                self._handles.append(self._key_proj(i).register_forward_hook(self._key_hook(i)))
            if r > 0 or i in feature_after:
                # prepend: the model's own hidden_states recorder (a forward hook too) must see merged states
                self._handles.append(layer.register_forward_hook(self._layer_hook(i, r, i in feature_after),
                                                                 prepend=True))

    def _pre_hook(self, i: int):
        pos = _mask_position(self.spec.layers[i])  # resolved once: the hook runs on every forward

        def hook(module, args, kwargs=None):
            if kwargs is None or threading.get_ident() != self._thread:  # another thread's call on the tower: stock
                return None
            if i == 0:
                self._state = _RunState()
                return None
            size = self._state.size
            if size is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            b, t = hidden.shape[:2]
            if tuple(size.shape) != (b, t):
                raise ValueError(
                    f"vision layer {i} got {tuple(hidden.shape[:2])} tokens but the merged sizes are "
                    f"{tuple(size.shape)}; the tower was not run from its first layer"
                )
            # proportional attention (ToMe eq. 3): softmax(q k^T / sqrt(d) + log s) over the keys
            bias = size.log().to(hidden.dtype)[:, None, None, :]
            if "attention_mask" in kwargs or pos is None or len(args) <= pos:
                mask = kwargs.get("attention_mask")
                kwargs = {**kwargs, "attention_mask": self._combine(mask, bias, i)}
            else:
                args = (*args[:pos], self._combine(args[pos], bias, i), *args[pos + 1 :])
            return args, kwargs

        return hook

    @staticmethod
    def _combine(mask: Tensor | None, bias: Tensor, i: int) -> Tensor:
        if mask is None:
            return bias
        if mask.dim() != 4 or mask.shape[-1] != bias.shape[-1]:
            raise ValueError(
                f"vision layer {i} received an attention mask of shape {tuple(mask.shape)}; merging needs none or "
                f"a 4-D mask over the {bias.shape[-1]} merged tokens"
            )
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=bias.dtype).masked_fill(~mask, torch.finfo(bias.dtype).min)
        return mask.to(bias.dtype) + bias

    def _key_hook(self, i: int):
        attn = self.spec.attention[i]

        def hook(module, args, output):
            if threading.get_ident() != self._thread:
                return None
            head_dim = getattr(attn, "head_dim", None) or output.shape[-1] // int(attn.num_heads)
            b, t, _ = output.shape
            # ToMe's metric: keys averaged over heads, [B, T, Dh]
            self._state.keys[i] = output.reshape(b, t, -1, head_dim).mean(2)

        return hook

    def _layer_hook(self, i: int, r: int, is_feature: bool):
        p = self.spec.num_prefix_tokens

        def hook(module, args, output):
            if threading.get_ident() != self._thread:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            st = self._state
            if st.vt is None:
                grid = self.spec.grid
                if hidden.shape[1] - p != grid[0] * grid[1]:
                    raise ValueError(
                        f"vision layer {i} output has {hidden.shape[1]} tokens; expected {p} prefix + "
                        f"{grid[0] * grid[1]} patches of grid {grid}"
                    )
                st.vt = VisualTokens.from_features(hidden[:, p:], grid=grid)
            if r > 0:
                keys = st.keys.pop(i, None)
                vt = st.vt.replace(x=hidden[:, p:], keys=keys[:, p:] if keys is not None else None)
                vt = self.method.merge_step(vt, r)
                prefix_size = torch.ones(hidden.shape[0], p, dtype=vt.size.dtype, device=vt.size.device)
                st.size = torch.cat([prefix_size, vt.size], dim=1)
                st.vt = vt
                hidden = torch.cat([hidden[:, :p], vt.x], dim=1)
            if is_feature:
                st.features[i + 1] = hidden[:, p:]
                self._finish()
            if r > 0:
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return None

        return hook

    def _finish(self) -> None:
        st = self._state
        if not all(f in st.features for f in self.spec.feature_layers):
            return
        x = torch.cat([st.features[f] for f in self.spec.feature_layers], dim=-1)
        self.tokens = st.vt.replace(x=x)

    # --------------------------------------------------------------------------- lifecycle
    def rows(self) -> list[VisualTokens]:
        """The last run's tokens, one :class:`VisualTokens` of batch one per image / crop."""
        if self.tokens is None:
            raise ValueError("no vision tower run has happened inside encoder_merging yet")
        return [self.tokens.row(b) for b in range(self.tokens.batch_size)]

    def remove(self) -> None:
        """Remove every hook this handle added (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._state = _RunState()

    def __enter__(self) -> EncoderMerging:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def encoder_merging(
    model: nn.Module,
    adapter: Any = None,
    method: Any = None,
    *,
    layers: Sequence[nn.Module] | None = None,
    num_prefix_tokens: int | None = None,
    feature_layer: int | Sequence[int] | None = None,
    grid: tuple[int, int] | None = None,
) -> EncoderMerging:
    """Merge tokens inside ``model``'s vision tower with an encoder-stage ``method`` (e.g. ``tome_encoder``).

    Returns an :class:`EncoderMerging` handle, usable as a context manager; hooks are in place from this call
    until the context exits (or ``.remove()``). Where things are comes from the explicit keyword arguments,
    else the ``adapter``, else the model's config (see :func:`resolve_encoder_spec`).

    With ``budget`` ``K`` (or a fraction of the ``N0`` patches), the feature layer holds exactly ``K`` patch
    tokens per image. A schedule that merges nothing only records (``tokens`` is then the identity), so the model
    runs bit-identically to the stock one.
    """
    if method is None:
        raise ValueError("encoder_merging needs a method, e.g. vtcompress.get('tome_encoder', budget=64)")
    if isinstance(method, str):
        from ..compressor import get

        method = get(method)
    spec = resolve_encoder_spec(model, adapter, layers=layers, num_prefix_tokens=num_prefix_tokens,
                                feature_layer=feature_layer, grid=grid)
    if spec.merge_layers == 0 and not _merges_nothing(method, spec):
        raise ValueError(
            f"feature layer(s) {spec.feature_layers} include the embeddings (index 0), which no encoder layer "
            "precedes, so nothing can merge; use a later vision_feature_layer"
        )
    return EncoderMerging(model, spec, method)


def _merges_nothing(method: Any, spec: EncoderSpec) -> bool:
    grid = spec.grid
    n0 = grid[0] * grid[1] if grid else 0
    try:
        return sum(method.schedule(n0, 0)) == 0
    except ValueError:
        return False

