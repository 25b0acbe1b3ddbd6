"""Apply any method to a stock Hugging Face VLM: :func:`apply` (context manager / handle) and
:func:`compress_inputs` (the explicit form).

Projector stage, for every family (transformers 5.x):

1. run the model's own ``get_image_features`` (under :func:`~vtcompress.models.signals.capture_signals`
   when a method needs [CLS] attention or keys, under the encoder-stage merging when one is composed);
2. per image, the family's adapter describes the run of features that fills the image's placeholders
   (:class:`ImageLayout`: which *view* -- a base grid, an anyres high-resolution grid, an InternVL tile --
   and which patch of it each feature is; LLaVA-NeXT / OneVision ``image_newline`` separators);
3. each view becomes one row of :class:`~vtcompress.tokens.VisualTokens` (its own grid; views with the same
   grid and budget are batched) and the projector-stage methods compress it, in list order;
4. the placeholder run of each image in ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` /
   ``labels`` is shortened to the kept tokens (a newline stays when its row keeps a token), rows are
   re-padded on the batch's padding side, and the compressed features go to the model as
   ``mm_encoder_outputs``.

Positions. ``positions=None`` (default) uses the scheme the methods' references use
(``Compressor.positions``): every projector- and encoder-stage reference in the LLaVA code base simply feeds
the LLM fewer tokens, so their positions are ``"compact"`` (after FasterVLM keeps 64 of 576 tokens placed
after 13 prompt tokens, the last image position is 76, as in the reference, not 588); methods that declare
different schemes in one apply raise unless ``positions=`` is given. An explicit value overrides:

- M-RoPE (Qwen2-VL / Qwen2.5-VL) always keep their 3-D grid positions (the default there, whatever the
  methods declare; ``"compact"`` raises): the 3-D position of each kept token is its column of
  ``get_rope_index`` on the full ids; ``generate`` receives 4 rows whose row 0 is the compact text position
  (as stock generate builds it) and extends every row by +1 per new token, exactly as stock decoding does.
- 1-D RoPE (LLaVA, LLaVA-NeXT, OneVision, InternVL): ``"compact"`` renumbers the shortened sequence
  contiguously; ``"original"`` passes the original 1-D positions (with gaps where tokens were dropped, the text
  after the image does not move); ``generate`` continues from the last prompt position + 1.

Order. With compact positions the LLM receives an image's tokens in the order of the last projector method's
reference when it defines one (:meth:`llm_order`: VisionZip dominant then contextual, PruMerge by attention then
its summary token) on single-view images (LLaVA-1.5); otherwise, and always with ``"original"``, in spatial
order (every token at its anchor patch's slot).

Signal layer. Methods that read [CLS] attention / keys take them from ``signal_layer`` (a vision layer index,
negative from the end) or, when it is ``None``, from the layer whose OUTPUT the LLM reads: hidden-state index
``f = vision_feature_layer`` is the output of layer ``f`` when ``f < 0`` (``-2`` for LLaVA-1.5: layer -2) and of
layer ``f - 1`` when ``f > 0``; for a list of feature layers, the deepest of them. Qwen2-VL's merger and
InternVL read the tower's last layer. Head reduction: ``signal_heads`` (``"mean"``, or ``"full"``: one
full-width head, PruMerge's reference). The methods of one apply must agree on both.

Point of action (``acts_on``). VisionZip, PruMerge and PruMerge+ act, as their references, on the vision
tower's selected-layer features BEFORE the multimodal projector (``acts_on="vision"``); FasterVLM (selection
only: the same kept set either way) and the others on the projected features. ``"vision"`` works by
capturing the input of the model's own projector module (a forward pre-hook on ``multi_modal_projector``),
compressing those features, and running the model's projector on the survivors (the stock call still
projects every token once; the LLM never sees a dropped one):

- LLaVA-1.5: the projector input is one ``[N, C]`` row per image (``[CLS]`` included with strategy "full";
  a list of feature layers is concatenated along channels), 1:1 with the placeholders;
- LLaVA-NeXT / OneVision: the projector input per crop is packed the way the stock packer packs the
  projected features (the model's own ``pack_image_features`` on the vision features); the newlines are the
  model's ``image_newline``. This is 1:1 unless OneVision's anyres_max bilinear down-sizing (which the stock
  model applies AFTER the projector) blends an image's tokens: then that image alone (the others of a batch
  act as they do alone) is compressed in its projected features (interpolating vision features before the
  projector would change the model);
- Qwen2-VL / Qwen2.5-VL (the patch merger IS the projector, 2x2 patches into one token) and InternVL (pixel
  shuffle + ``mlp1``, 2x2 into one): no 1:1 map from the projector input to the LLM's tokens, so the methods
  act on the projected tokens (the signals are pooled over each token's patches);
- a composition acts in one space: the vision features when every projector method acts there, else the
  projected ones. With ``"vision"``, the ``tokens`` of :class:`CompressedInputs` carry vision features
  (projected ones for an image down-sized as above).

Budgets are per image: a fraction applies to every view; an int is split over an image's views in proportion
to their sizes (at least one each), and an image with fewer tokens than the int keeps them all.

Composition: the encoder-stage method (ToMe / FOLDER inside the vision tower,
:func:`vtcompress.models.encoder.encoder_merging`; LLaVA-1.5 only, since the other families rebuild a full grid
after the tower) runs first, then the projector-stage methods in list order, then the decoder stage, delegated to
:func:`vtcompress.models.decoder.attach_decoder` and installed after the projector-stage hooks so that it sees
the shortened ``input_ids``.

Videos pass through uncompressed (encoded here too, since the stock forward takes either pixels or encoder
outputs). Limits: the attention signal of a windowed Qwen2.5-VL layer is the mean
attention received within each window; a method must keep the feature width (the LLM's input width).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import weakref
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..compressor import Compressor, get
from ..tokens import VisualTokens
from .context import (
    CacheRecord,
    activate,
    activate_model_scope,
    active_handles,
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
from .signals import capture_signals

__all__ = [
    "Adapter",
    "ImageLayout",
    "CompressedInputs",
    "ApplyHandle",
    "apply",
    "compress_inputs",
    "compress_features",
    "adapter_for",
    "resolve_methods",
    "register_adapter",
    "supported_families",
]

_ADAPTERS: list[Adapter] = []
_STAGE_ORDER = {"encoder": 0, "projector": 1, "decoder": 2}
_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")


# ============================================================================== layout of one image's features
@dataclass
class ImageLayout:
    """Where each feature of one image's placeholder run comes from (``L`` features).

    Attributes:
        view: ``[L]`` long, the view (base grid, high-resolution grid, tile) of each feature; ``-1`` for a
            separator of a row without patches (see below).
        patch: ``[L]`` long, raster index of the feature in its view's grid, ``-1`` for features that are
            not patches (separators, prefix tokens).
        sep: ``[L]`` bool, row separators (``image_newline``) that close a row holding patches: kept when
            their row keeps a token.
        group: ``[L]`` long, the row each separator closes (and each patch belongs to), ``-1`` elsewhere.
        grids: ``(H, W)`` of each view that holds patches.

    Features with ``patch == -1`` and ``sep == False`` are always kept: a prefix token ([CLS] with
    ``vision_feature_select_strategy="full"``), and the newlines of a high-resolution grid that unpadding
    left without columns (LLaVA-NeXT / OneVision on an image much taller than wide: the stock packer then
    emits one ``image_newline`` per row and no patch; with nothing to prune they stay, as in the stock model).
    """

    view: Tensor
    patch: Tensor
    sep: Tensor
    group: Tensor
    grids: list[tuple[int, int]]

    @classmethod
    def single(cls, grid: tuple[int, int], n: int, device, prefix: int = 0) -> ImageLayout:
        """One view of ``grid`` whose ``H*W`` patches are the features after ``prefix`` always-kept ones."""
        patch = torch.arange(n, device=device) - prefix
        return cls(
            view=torch.zeros(n, dtype=torch.long, device=device),
            patch=torch.where(patch >= 0, patch, torch.full_like(patch, -1)),
            sep=torch.zeros(n, dtype=torch.bool, device=device),
            group=torch.full((n,), -1, dtype=torch.long, device=device),
            grids=[(int(grid[0]), int(grid[1]))],
        )

    @classmethod
    def tiles(cls, grid: tuple[int, int], tiles: int, device) -> ImageLayout:
        """``tiles`` views of the same ``grid``, one after the other (InternVL)."""
        per = grid[0] * grid[1]
        n = per * tiles
        ar = torch.arange(n, device=device)
        return cls(
            view=ar // per, patch=ar % per,
            sep=torch.zeros(n, dtype=torch.bool, device=device),
            group=torch.full((n,), -1, dtype=torch.long, device=device),
            grids=[(int(grid[0]), int(grid[1]))] * tiles,
        )

    @classmethod
    def from_views(cls, view: Tensor, sep: Tensor, base_grid: tuple[int, int],
                   sep_view: int | None = None) -> ImageLayout:
        """Layout of an anyres packed run from the view of each feature and the newline flags.

        Args:
            view: ``[L]`` long, the view of each feature (its value at a separator is ignored).
            sep: ``[L]`` bool, the newline flags.
            base_grid: ``(H, W)`` of view 0 (the base crop).
            sep_view: the view whose rows every separator closes (the stock packers put newlines only after
                the rows of the high-resolution grid, view 1, or, for a single-crop image, one after the base
                crop, view 0); ``None``: the view of the feature before each separator.

        View 0 is the base crop (``base_grid``); a later view's grid is (its rows, patches per row).
        ``group`` numbers the rows. A separator closing a row without patches (a zero-column unpadded grid)
        becomes an always-kept non-patch feature (``view`` ``-1``, ``sep`` False, ``group`` ``-1``).
        """
        n = view.shape[0]
        dev = view.device
        if sep_view is None:
            prev_view = torch.cat([view[:1], view[:-1]])
            view = torch.where(sep, prev_view, view)  # a newline closes the row of the feature before it
        else:
            view = torch.where(sep, torch.full_like(view, int(sep_view)), view)
        sep_l = sep.long()
        nl_before = torch.cumsum(sep_l, 0) - sep_l
        group = view * (n + 1) + nl_before
        is_patch = ~sep
        # rows that hold at least one patch; separators of the others are nothing to prune
        has_patch = torch.zeros(int(group.max()) + 1 if n else 0, dtype=torch.bool, device=dev)
        has_patch[group[is_patch]] = True
        empty = sep & ~has_patch[group]
        sep = sep & ~empty
        view = view.masked_fill(empty, -1)
        group = torch.where(is_patch | sep, group, torch.full_like(group, -1))
        patch = torch.full((n,), -1, dtype=torch.long, device=dev)
        grids = []
        for v in range(int(view.max()) + 1 if n else 0):  # a handful of views per image
            in_v = (view == v) & is_patch
            count = int(in_v.sum())
            patch[in_v] = torch.arange(count, device=dev)
            rows = int((sep & (view == v)).sum())
            if v == 0 or rows == 0:
                grid = base_grid if base_grid[0] * base_grid[1] == count else (1, count)
            else:
                grid = (rows, count // rows)
            if grid[0] * grid[1] != count:
                raise ValueError(f"view {v} has {count} patches, which do not form the grid {grid}")
            grids.append(grid)
        return cls(view=view, patch=patch, sep=sep, group=group, grids=grids)


# ============================================================================== adapter base
class Adapter:
    """Where things are in one model family; the mechanics live in this module.

    Subclasses set the class attributes and override the few methods whose answer differs by family.
    """

    family: str = ""
    #: class names of the top-level models (``...ForConditionalGeneration``) this adapter serves
    model_classes: tuple[str, ...] = ()
    #: ``"1d"`` (LLaMA-style RoPE) or ``"mrope"`` (Qwen2-VL 3-D M-RoPE)
    position_scheme: str = "1d"
    #: input keys only the vision encoder reads (dropped once features are passed as ``mm_encoder_outputs``)
    encoder_only_keys: tuple[str, ...] = ()

    # --- where things are -----------------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        # by class name (no transformers import at module load), subclasses included
        return any(c.__name__ in self.model_classes for c in type(model).__mro__)

    def base(self, model: nn.Module) -> nn.Module:
        """The ``...Model`` holding ``get_image_features`` and the language model."""
        return model.model

    def vision_config(self, model: nn.Module):
        return model.config.vision_config

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.base(model).vision_tower

    def vision_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.vision_tower(model).encoder.layers)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches in the vision encoder's sequence (1 for CLIP's [CLS], 0 for SigLIP)."""
        emb = getattr(self.vision_tower(model), "embeddings", None)
        if emb is None:
            emb = getattr(getattr(self.vision_tower(model), "vision_model", None), "embeddings", None)
        return 1 if getattr(emb, "class_embedding", None) is not None or getattr(emb, "cls_token", None) is not None \
            else 0

    def feature_layer(self, model: nn.Module) -> int | list[int]:
        return model.config.vision_feature_layer

    def grid(self, model: nn.Module) -> tuple[int, int]:
        """Patch grid of one crop / tile seen by the vision encoder."""
        cfg = self.vision_config(model)
        size, patch = cfg.image_size, cfg.patch_size
        size = size if isinstance(size, int) else size[0]
        patch = patch if isinstance(patch, int) else patch[0]
        return (size // patch, size // patch)

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    # --- mechanics hooks --------------------------------------------------------------------------
    def encoder_kwargs(self, model: nn.Module, inputs: dict) -> dict:
        """The inputs ``get_image_features`` takes (by its signature, as ``generate`` does)."""
        params = inspect.signature(self.base(model).get_image_features).parameters
        return {k: v for k, v in inputs.items() if k in params and k != "kwargs" and v is not None}

    def features(self, model: nn.Module, inputs: dict, out) -> list[Tensor]:
        """Per-image features ``[L_i, D]`` from ``get_image_features``' output, in placeholder order."""
        return list(out.pooler_output)

    def wrap(self, out, feats: list[Tensor]):
        """``mm_encoder_outputs["image"]`` carrying the compressed per-image features."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=list(feats))

    def layouts(self, model: nn.Module, inputs: dict, feats: list[Tensor]) -> list[ImageLayout]:
        raise NotImplementedError

    def signal_to_features(self, model: nn.Module, inputs: dict, records: list[Tensor], reduce: str,
                           feats: list[Tensor]) -> list[Tensor]:
        """Map signals recorded in the encoder's token order onto each image's features: ``[L_i, C]``.

        ``records`` are the per-call ``[B, T, C]`` tensors of the recorded attention module; ``reduce``
        (``"sum"`` for attention mass, ``"mean"`` for keys) pools tokens that the model merges into one.
        """
        raise NotImplementedError

    def supports_encoder_stage(self) -> bool:
        return False


def register_adapter(adapter: Adapter) -> Adapter:
    _ADAPTERS.append(adapter)
    return adapter


def _load_adapters() -> None:
    from . import internvl, llava, llava_next, onevision, qwen2_vl  # noqa: F401  (each registers its adapter)


def supported_families() -> list[str]:
    _load_adapters()
    return [a.family for a in _ADAPTERS]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family; ``ValueError`` listing the supported families otherwise."""
    _load_adapters()
    for a in _ADAPTERS:
        if a.matches(model):
            return a
    names = "; ".join(f"{a.family} ({', '.join(a.model_classes)})" for a in _ADAPTERS)
    raise ValueError(f"unsupported model {type(model).__name__}; supported families: {names}")


# ============================================================================== methods
def resolve_methods(method) -> list[Compressor]:
    """A method, a registered name or a list of them -> methods ordered encoder, projector (list order), decoder."""
    items = list(method) if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise ValueError("apply needs at least one method (a Compressor, a registered name, or a list of them)")
    out = []
    for m in items:
        if isinstance(m, str):
            m = get(m)
        if not isinstance(m, Compressor):
            raise ValueError(f"methods must be Compressor instances or registered names; got {type(m).__name__}")
        out.append(m)
    return sorted(out, key=lambda m: _STAGE_ORDER[m.stage])  # stable: list order within a stage


# ============================================================================== result
@dataclass
class CompressedInputs:
    """What :func:`compress_inputs` returns (and :attr:`ApplyHandle.last` holds).

    Attributes:
        inputs: the shortened inputs for ``model(**inputs)`` / ``model.generate(**inputs)``.
        tokens: a list with one entry per IMAGE of the batch (placeholder order: sample by sample, images in
            prompt order; :attr:`image_sample` gives each image's sample), each a list with one
            :class:`VisualTokens` (a batch of one row) per VIEW of that image: one view for LLaVA-1.5 and
            Qwen2-VL; the base crop then the high-resolution grid for LLaVA-NeXT / OneVision (one view for a
            crop without a high-resolution grid); one per tile for InternVL. Each holds the survivors of that
            view, with ``pos`` / ``size`` / ``assign`` in the view's own grid. So ``tokens[i][v]`` is view
            ``v`` of image ``i``; :meth:`tokens_of` does the same with range checks, and ``tokens[0][0]`` is
            the one :class:`VisualTokens` of a single-image LLaVA prompt.
        keep: ``[B, S]`` bool over the ORIGINAL sequence: which columns survived (pads included).
        image_sample: ``[num_images]`` long, the sample each image belongs to.
        num_tokens: ``[num_images, 2]`` long, placeholder tokens per image before and after.
    """

    inputs: dict
    tokens: list[list[VisualTokens]] = field(default_factory=list)
    keep: Tensor | None = None
    image_sample: Tensor | None = None
    num_tokens: Tensor | None = None

    def tokens_of(self, image: int = 0, view: int = 0) -> VisualTokens:
        """The surviving tokens of view ``view`` of image ``image`` (both in placeholder order):
        ``tokens[image][view]``, a :class:`VisualTokens` of batch 1; ``ValueError`` naming the valid range."""
        if not self.tokens:
            raise ValueError("no image was compressed in this call (text-only inputs): tokens is empty")
        if isinstance(image, bool) or not isinstance(image, int) or not -len(self.tokens) <= image < len(self.tokens):
            raise ValueError(f"image={image!r}; this call has {len(self.tokens)} image(s): "
                             f"0 .. {len(self.tokens) - 1}")
        views = self.tokens[image]
        if isinstance(view, bool) or not isinstance(view, int) or not -len(views) <= view < len(views):
            raise ValueError(f"view={view!r}; image {image} has {len(views)} view(s): 0 .. {len(views) - 1}")
        return views[view]


# ============================================================================== the mechanics
def feature_signal_layer(feature_layer: int | Sequence[int], n_layers: int) -> int:
    """The vision layer (index into the tower's ``n_layers`` layers, ``0 .. n_layers - 1``) whose output the
    LLM reads: hidden-state index ``f < 0`` is the output of layer ``n_layers + f``, ``f > 0`` of layer ``f - 1``
    (index 0 is the embeddings, which no attention layer produces); for a list, the deepest listed layer."""
    wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not wanted:
        raise ValueError("vision_feature_layer is an empty list; it must name at least one hidden-state index")
    out = []
    for f in wanted:
        f = int(f)
        layer = n_layers + f if f < 0 else f - 1
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"vision_feature_layer {f} names no attention layer of a {n_layers}-layer vision tower (hidden-state "
                f"indices 1 .. {n_layers} or -1 .. -{n_layers}; 0 is the embeddings); set signal_layer on the method")
        out.append(layer)
    return max(out)


def _signal_layer(methods: Sequence[Compressor], n_layers: int, feature_layer=None) -> tuple[int, str]:
    """``(layer, heads)`` of the vision attention signal the methods need: each method's ``signal_layer``
    (``None``: :func:`feature_signal_layer` of the model's ``vision_feature_layer``) and ``signal_heads``;
    they must agree."""
    picks = {}
    for m in methods:
        if not set(m.needs) & {"cls_attn", "keys"}:
            continue
        layer = getattr(m, "signal_layer", None)
        if layer is None:
            layer = feature_signal_layer(-2 if feature_layer is None else feature_layer, n_layers)
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"signal_layer={layer} is out of range for a vision encoder of {n_layers} layers")
        picks[m.name or type(m).__name__] = (layer % n_layers, getattr(m, "signal_heads", "mean"))
    if not picks:
        return feature_signal_layer(-2 if feature_layer is None else feature_layer, n_layers), "mean"
    if len(set(picks.values())) > 1:
        desc = ", ".join(f"{k}: layer {v[0]}, heads {v[1]!r}" for k, v in picks.items())
        raise ValueError(f"the methods of one apply read the vision attention signal from different layers / head "
                         f"reductions ({desc}); one capture serves them all: set the same signal_layer and "
                         "signal_heads on each")
    return next(iter(picks.values()))


def _needs(methods: Sequence[Compressor]) -> set[str]:
    needs = set()
    for m in methods:
        needs.update(m.needs)
    unknown = needs - {"cls_attn", "keys", "text"}
    if unknown:
        raise ValueError(f"signal(s) {sorted(unknown)} cannot be provided by vtcompress.apply; it provides "
                         "cls_attn, keys, text")
    return needs


def _split_budget(budget, sizes: list[int]) -> list:
    """An int per-image ``budget`` split over views in proportion to their sizes (largest remainder, >= 1).

    Images differ in size (anyres grids, InternVL tiles, Qwen2-VL resolutions), so an int budget at least an
    image's token count keeps all of that image's tokens.
    """
    if not isinstance(budget, int) or isinstance(budget, bool):
        return [budget] * len(sizes)
    total = sum(sizes)
    if budget >= total:
        return [max(1, s) for s in sizes]
    raw = [budget * s / total for s in sizes]
    base = [int(r) for r in raw]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - base[i], reverse=True)
    for i in order[: budget - sum(base)]:
        base[i] += 1
    return [max(1, min(b, s)) for b, s in zip(base, sizes, strict=True)]


def _placeholder_slots(ids: Tensor, image_id: int, lengths: list[int]) -> tuple[Tensor, Tensor]:
    """Flat positions of every placeholder (row-major, as ``masked_scatter`` fills them) and the sample of
    each image."""
    flat = (ids == image_id).flatten().nonzero().squeeze(1)
    if flat.numel() != sum(lengths):
        raise ValueError(
            f"input_ids hold {flat.numel()} image placeholder tokens (id {image_id}) but the images give "
            f"{sum(lengths)} features ({lengths}); pass the processor's input_ids unchanged"
        )
    starts = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0)
    sample = (flat[starts.to(flat.device)] // ids.shape[1]) if lengths else flat.new_zeros(0)
    return flat, sample


def _text_signal(model, ids: Tensor, mask: Tensor, image_id: int, samples: Tensor):
    """Input embeddings of each image's prompt (its sample's non-image tokens): ``[I, T, D]``, ``[I, T]``."""
    emb = model.get_input_embeddings()
    text_ok = (ids != image_id) & mask.bool()
    t = int(text_ok.sum(1).max()) if ids.numel() else 0
    order = torch.argsort((~text_ok).to(torch.int8), dim=1, stable=True)[:, :t]  # text tokens first, in order
    tid = ids.gather(1, order)
    tmask = text_ok.gather(1, order)
    return emb(tid)[samples], tmask[samples]


def _shorten(inputs: dict, keep: Tensor, pad_id: int, left: bool):
    """Drop columns where ``keep [B, S]`` is False from every sequence input; re-pad rows on one side.

    Returns the new inputs and ``move(t [..., B, S], fill)``, which applies the same to any tensor.
    """
    b, s = keep.shape
    n = keep.sum(1)
    s_new = int(n.max()) if b else 0
    offset = (s_new - n) if left else torch.zeros_like(n)
    dest = torch.where(keep, offset[:, None] + keep.long().cumsum(1) - 1, torch.full_like(keep, -1, dtype=torch.long))
    rows, cols = keep.nonzero(as_tuple=True)
    new_cols = dest[rows, cols]

    def move(t: Tensor, fill) -> Tensor:
        out = torch.full((*t.shape[:-2], b, s_new), fill, dtype=t.dtype, device=t.device)
        out[..., rows, new_cols] = t[..., rows, cols]
        return out

    out = dict(inputs)
    for key in _SEQ_KEYS:
        t = inputs.get(key)
        if isinstance(t, Tensor) and t.dim() == 2 and tuple(t.shape) == (b, s):
            fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
            out[key] = move(t, fill)
    return out, move


def compress_inputs(model: nn.Module, method, *, positions: str | None = None, for_generate: bool = False,
                    **inputs) -> CompressedInputs:
    """Compress the images of ``inputs`` and return shortened inputs for ``model`` / ``model.generate``.

    ``method`` is a Compressor, a registered name or a list of them (encoder- and projector-stage methods run
    here; decoder-stage methods need :func:`apply`). ``for_generate=True`` builds the position ids the way
    ``generate`` does (from ``attention_mask``), ``False`` the way ``forward`` does. The returned
    :attr:`CompressedInputs.inputs` are ready to pass on; the surviving tokens are in
    :attr:`CompressedInputs.tokens` (not in ``inputs``), nested per image then per view:
    ``tokens[i][v]`` is one :class:`VisualTokens` (``res.tokens_of(i, v)``; a LLaVA-1.5 image has one view).
    """
    adapter = adapter_for(model)
    methods = resolve_methods(method)
    if any(m.stage == "decoder" for m in methods):
        raise ValueError("decoder-stage methods act inside the LLM; use `with vtcompress.apply(model, method):`")
    return _compress(model, adapter, methods, inputs, positions=positions, for_generate=for_generate)


def compress_features(host, layouts: list[ImageLayout], feats: list[Tensor], methods: list[Compressor], *,
                      attn: list[Tensor] | None = None, keys: list[Tensor] | None = None,
                      positions: str = "compact") -> tuple[list[Tensor], list[Tensor], list[list[VisualTokens]]]:
    """The projector stage on per-image features a host already computed (the mechanics :func:`apply` runs after
    ``get_image_features``), for hosts other than a transformers model (the vLLM plugin).

    Args:
        host: the model the features come from (named in error messages).
        layouts: per image, :class:`ImageLayout` of its ``L_i`` features.
        feats: per image ``[L_i, D]`` features the methods act on.
        methods: projector-stage methods, applied in list order.
        attn, keys: per image ``[L_i, 1]`` attention signal / ``[L_i, Dk]`` keys aligned with ``feats``.
        positions: ``"compact"`` (the LLM receives the tokens in the last method's reference order when it
            defines one) or ``"original"`` (spatial order).

    Returns:
        per image the features the LLM receives ``[M_i, D]``, the kept flag of each original feature ``[L_i]``,
        and the surviving tokens per view (as :attr:`CompressedInputs.tokens`).
    """
    proj = [m for m in methods if m.stage == "projector"]
    views = _views(layouts, proj)
    results, orders = _compress_views(host, views, layouts, feats, _Signals(attn=attn, keys=keys), None, proj)
    return _kept_features(layouts, views, results, feats, orders if positions == "compact" else None)


def _check_positions(positions: str | None, adapter: Adapter) -> None:
    if positions not in (None, "original", "compact"):
        raise ValueError(f"positions={positions!r}; allowed: None (the methods' reference scheme), 'original', "
                         "'compact'")
    if positions == "compact" and adapter.position_scheme == "mrope":
        raise ValueError("positions='compact' is not available for M-RoPE models (Qwen2-VL / Qwen2.5-VL): "
                         "their 3-D positions come from the image grid; use positions='original'")


def _resolve_positions(positions: str | None, methods: Sequence[Compressor], adapter: Adapter) -> str:
    """The position scheme of one call: the explicit one, else the one the encoder- / projector-stage methods'
    references use (``Compressor.positions``); M-RoPE models keep their 3-D grid positions."""
    _check_positions(positions, adapter)
    if positions is not None:
        return positions
    if adapter.position_scheme == "mrope":
        return "original"
    declared = {m.name or type(m).__name__: getattr(m, "positions", "compact") for m in methods
                if m.stage in ("encoder", "projector")}
    schemes = set(declared.values())
    if not schemes:
        return "original"
    if len(schemes) > 1:
        raise ValueError(f"the methods declare different reference position schemes ({declared}); pass "
                         "positions='compact' or positions='original' to apply")
    scheme = schemes.pop()
    if scheme not in ("original", "compact"):
        raise ValueError(f"a method declares positions={scheme!r}; allowed: 'original', 'compact'")
    return scheme


@dataclass
class _View:
    """One view of one image: the feature indices of its patches (raster order) and its budget per method."""

    image: int
    view: int
    index: Tensor
    budgets: tuple


@dataclass
class _Signals:
    """Per-image signals aligned with the features (``[L_i, 1]`` attention, ``[L_i, Dk]`` keys, prompt)."""

    attn: list[Tensor] | None = None
    keys: list[Tensor] | None = None
    text: Tensor | None = None
    text_mask: Tensor | None = None


def _compress(model, adapter: Adapter, methods: list[Compressor], inputs: dict, *, positions: str | None,
              for_generate: bool) -> CompressedInputs:
    positions = _resolve_positions(positions, methods, adapter)
    if inputs.get("pixel_values") is None:
        return CompressedInputs(inputs=dict(inputs))
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("compressing images needs input_ids [B, S] (to find the image placeholders); "
                         f"got {type(ids).__name__ if not isinstance(ids, Tensor) else tuple(ids.shape)}")
    if inputs.get("mm_encoder_outputs"):
        raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
    proj_methods = [m for m in methods if m.stage == "projector"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    image_id = adapter.image_token_id(model)

    out, feats, enc_rows, signals, vision = _encode(model, adapter, methods, inputs)
    flat, samples = _placeholder_slots(ids, image_id, [int(f.shape[0]) for f in feats])
    if "text" in _needs(proj_methods):
        signals.text, signals.text_mask = _text_signal(model, ids, mask, image_id, samples)
    layouts = adapter.layouts(model, inputs, feats)
    views = _views(layouts, proj_methods)
    work = feats if vision is None else vision.feats  # the features the methods act on
    results, orders = _compress_views(model, views, layouts, work, signals, enc_rows, proj_methods,
                                      space=None if vision is None else vision.ok)
    new_feats, kept_slots, tokens = _kept_features(layouts, views, results, work,
                                                   orders if positions == "compact" else None)
    if vision is not None:
        new_feats = vision.project(new_feats, kept_slots, feats)

    keep = torch.ones_like(ids, dtype=torch.bool)
    if kept_slots:
        keep.view(-1)[flat] = torch.cat(kept_slots).to(ids.device)
    new_inputs = _shortened_inputs(model, adapter, inputs, ids, mask, keep, positions, for_generate)
    mm = {"image": adapter.wrap(out, new_feats)}
    # the stock forward takes either raw pixels or encoder outputs: videos (not compressed) are encoded here too
    video_fn = getattr(adapter.base(model), "get_video_features", None)
    video_keys = []
    if inputs.get("pixel_values_videos") is not None and video_fn is not None:
        params = inspect.signature(video_fn).parameters
        video_kwargs = {k: v for k, v in inputs.items() if k in params and k != "kwargs" and v is not None}
        mm["video"] = video_fn(**video_kwargs, return_dict=True)
        video_keys = list(video_kwargs)
    for k in list(adapter.encoder_kwargs(model, inputs)) + list(adapter.encoder_only_keys) + video_keys:
        new_inputs.pop(k, None)
    new_inputs["mm_encoder_outputs"] = mm
    counts = [(int(k.numel()), int(k.sum())) for k in kept_slots]
    return CompressedInputs(inputs=new_inputs, tokens=tokens, keep=keep, image_sample=samples,
                            num_tokens=torch.tensor(counts, dtype=torch.long).reshape(-1, 2))


def _encode(model, adapter: Adapter, methods: list[Compressor], inputs: dict):
    """Run the model's own ``get_image_features`` under the signal capture / encoder-stage merging the methods
    need. Returns its output, the per-image features, the encoder's rows (merging only) and the signals."""
    enc_methods = [m for m in methods if m.stage == "encoder"]
    proj_methods = [m for m in methods if m.stage == "projector"]
    needs = _needs(proj_methods)
    want_attn, want_keys = "cls_attn" in needs, "keys" in needs
    layers = adapter.vision_layers(model)
    signal = None
    if want_attn or want_keys:
        signal = _signal_layer(proj_methods, len(layers), adapter.feature_layer(model))
    # the vision space: when every projector method acts there, on a family with a 1:1 map (see the docstring)
    projector = _projector(model, adapter) if (
        proj_methods and not enc_methods and all(_acts_on(m) == "vision" for m in proj_methods)) else None
    captured: list[Tensor] = []
    merging = rec = None
    with ExitStack() as stack:
        if enc_methods:
            merging = stack.enter_context(_encoder_merging(model, adapter, enc_methods))
        elif signal is not None:  # with a merged tower, keys come from the merge itself
            rec = stack.enter_context(capture_signals(
                model, adapter.vision_config(model), adapter.attention_module(layers[signal[0]]),
                has_cls=adapter.num_prefix_tokens(model) > 0, attn=want_attn, keys=want_keys, heads=signal[1]))
        if projector is not None:
            me = threading.get_ident()  # a concurrent call on the model (another thread) runs this projector too
            hook = projector.register_forward_pre_hook(
                lambda _mod, args: captured.append(args[0]) if threading.get_ident() == me else None)
            stack.callback(hook.remove)
        # the caller's grad mode holds: a projector (or a trainable compressor) can be trained through apply
        out = adapter.base(model).get_image_features(**adapter.encoder_kwargs(model, inputs), return_dict=True)
    feats = adapter.features(model, inputs, out)
    enc_rows = None
    if merging is not None:
        feats, enc_rows = _encoder_features(merging, feats, want_attn, want_keys)
    signals = _Signals()
    if rec is not None and want_attn:
        signals.attn = adapter.signal_to_features(model, inputs, [a[..., None] for a in rec.attn], "sum", feats)
    if rec is not None and want_keys:
        signals.keys = adapter.signal_to_features(model, inputs, rec.keys, "mean", feats)
    vision = _VisionSpace.build(model, adapter, inputs, projector, captured, feats) if projector is not None else None
    return out, feats, enc_rows, signals, vision


def _acts_on(m: Compressor) -> str:
    where = getattr(m, "acts_on", "projected")
    if where not in ("vision", "projected"):
        raise ValueError(f"method {m.name!r}: acts_on={where!r}; allowed: 'vision', 'projected'")
    return where


def _projector(model, adapter: Adapter) -> nn.Module | None:
    """The model's own multimodal projector when the family maps its input 1:1 onto the LLM's image tokens
    (LLaVA-1.5, LLaVA-NeXT, OneVision); ``None`` (act on the projected features) otherwise."""
    if adapter.family not in ("llava", "llava_next", "onevision"):
        return None
    return getattr(adapter.base(model), "multi_modal_projector", None)


@dataclass
class _VisionSpace:
    """The projector's input laid out like the projected features: ``feats`` per image ``[L_i, C_v]`` (zeros
    at the newlines), ``newline`` per image ``[L_i]`` bool, and the model's projector / ``image_newline``.

    ``ok`` per image: its tokens map 1:1 onto the projector input. An image that does not (OneVision's
    anyres_max down-sizing) keeps its projected features ``[L_i, D]`` in ``feats`` and is compressed there, so
    each image gets what it gets alone, whatever the other images of the batch."""

    feats: list[Tensor]
    newline: list[Tensor]
    projector: nn.Module
    image_newline: Tensor | None
    ok: list[bool]

    @classmethod
    def build(cls, model, adapter: Adapter, inputs, projector, captured: list[Tensor], feats: list[Tensor]):
        if len(captured) != 1:
            return None  # the projector ran 0 or several times: no 1:1 map to rely on
        x = captured[0]
        base = adapter.base(model)
        if adapter.family == "llava":
            if x.dim() != 3 or x.shape[0] != len(feats):
                return None  # features of several images in one row (image_sizes): not handled, act projected
            vis = list(x)
            newline = [torch.zeros(int(f.shape[0]), dtype=torch.bool, device=f.device) for f in feats]
            ok = [True] * len(feats)
            image_newline = None
        else:  # anyres: pack the projector input as the stock packer packs the projected crops
            crops = adapter.crops(model, inputs)
            if x.dim() != 3 or x.shape[0] != sum(crops):
                return None
            t = x.shape[1]
            ids = torch.arange(x.shape[0] * t, device=x.device, dtype=torch.float32).reshape(-1, t, 1)
            packed_ids = adapter.pack(model, inputs, list(torch.split(ids, crops)), torch.full((1,), -1.0,
                                                                                                  device=x.device))
            vis, newline, ok = [], [], []
            flat = x.reshape(-1, x.shape[-1])
            for p, f in zip(packed_ids, feats, strict=True):
                v = p[:, 0]
                nl = v < -0.5
                idx = v[~nl]
                # 1:1 only if every packed token is one projector-input token, each at most once (OneVision's
                # anyres_max interpolation blends them: act on this image's projected features)
                if p.shape[0] != f.shape[0] or not bool((idx == idx.round()).all()) or \
                        idx.unique().numel() != idx.numel():
                    vis.append(f)
                    newline.append(nl)
                    ok.append(False)
                    continue
                ok.append(True)
                out = flat.new_zeros(p.shape[0], flat.shape[-1])
                out[~nl] = flat[idx.long()]
                vis.append(out)
                newline.append(nl)
            image_newline = getattr(base, "image_newline", None)
        for v, f in zip(vis, feats, strict=True):
            if v.shape[0] != f.shape[0]:
                return None
        if not any(ok):
            return None
        return cls(feats=vis, newline=newline, projector=projector, image_newline=image_newline, ok=ok)

    def project(self, new_feats: list[Tensor], kept_slots: list[Tensor], feats: list[Tensor]) -> list[Tensor]:
        """The model's projector on the surviving vision features; newlines become ``image_newline``."""
        out = []
        for x, kept, nl, f, ok in zip(new_feats, kept_slots, self.newline, feats, self.ok, strict=True):
            if not ok:  # compressed in the projected space already
                out.append(x)
                continue
            y = self.projector(x[None])[0].to(f.dtype) if x.shape[0] else f.new_zeros(0, f.shape[-1])
            sep = nl[kept]
            if bool(sep.any()):
                y = torch.where(sep[:, None], self.image_newline.to(y.dtype)[None], y)
            out.append(y)
        return out


def _views(layouts: list[ImageLayout], proj_methods: list[Compressor]) -> list[_View]:
    """Every view of every image, with each method's budget split over the views of an image."""
    views = []
    for i, lay in enumerate(layouts):
        index = []
        for v in range(len(lay.grids)):
            idx = ((lay.view == v) & (lay.patch >= 0)).nonzero().squeeze(1)
            index.append(idx[torch.argsort(lay.patch[idx])])
        sizes = [int(x.numel()) for x in index]
        per_method = [_split_budget(m.budget, sizes) for m in proj_methods]
        for m, b in zip(proj_methods, per_method, strict=True):
            if getattr(m, "trainable", False) and any(v != m.budget for v in b):
                # a copy at another budget would be a freshly built module: the caller's weights silently unused
                raise ValueError(
                    f"method {m.name!r} has learned weights for budget={m.budget!r} per view; an int budget is "
                    f"split over an image's views and capped at their token counts ({sizes} here -> per-view "
                    f"budgets {b}), which those weights do not serve: pass a float budget (the fraction kept "
                    "of every view), or an int no larger than the tokens of an image with one view")
        views += [_View(i, v, idx, tuple(b[v] for b in per_method)) for v, idx in enumerate(index)]
    return views


def _compress_views(model, views: list[_View], layouts, feats, signals: _Signals, enc_rows, proj_methods,
                    space: list[bool] | None = None):
    """Run the projector-stage methods; views with the same grid, budgets and feature space (``space``: per
    image, True for vision features; ``None``: all one space) go through as one batch."""
    groups: dict[tuple, list[int]] = {}
    for u, view in enumerate(views):
        where = space[view.image] if space is not None else None
        groups.setdefault((layouts[view.image].grids[view.view], view.budgets, where), []).append(u)
    results: dict[int, VisualTokens] = {}
    orders: dict[int, Tensor] = {}
    for (grid, budgets, _where), members in groups.items():
        tok = _start_tokens([views[u] for u in members], feats, grid, signals, enc_rows)
        d = tok.x.shape[-1]
        order = None
        for m, b in zip(proj_methods, budgets, strict=True):
            mb = m if b == m.budget else dataclasses.replace(m, budget=b)
            before, tok = tok, mb(tok)
            # the reference's LLM order of the last method's output, when it defines one
            order = mb.llm_order(before, tok) if hasattr(mb, "llm_order") else None
            if tok.x.shape[-1] != d:
                raise ValueError(
                    f"method {m.name!r} changed the feature width from {d} to {tok.x.shape[-1]}; the LLM of "
                    f"{type(model).__name__} takes {d}-wide image features (a width-changing method needs a "
                    "trained projector after it)")
        srt = torch.where(tok.mask, tok.pos, torch.full_like(tok.pos, tok.num_patches + 1)).argsort(dim=1, stable=True)
        tok = tok.sort_by_pos()
        for r, u in enumerate(members):
            results[u] = tok.row(r)
            if order is not None:
                orders[u] = order.gather(1, srt)[r : r + 1, : int(tok.counts[r])]
    return [results[u] for u in range(len(views))], [orders.get(u) for u in range(len(views))]


def _start_tokens(views: list[_View], feats, grid, signals: _Signals, enc_rows) -> VisualTokens:
    """The tokens of same-grid views as one batch: the full grid, or the encoder-merged tokens."""
    if enc_rows is not None:
        # merged inside the vision tower: the features sit at their anchor patches; start from the encoder's
        # bookkeeping (pos / size / assign / merged keys) with the projected features
        rows = [enc_rows[v.image] for v in views]
        x = torch.stack([feats[v.image][v.index][r.pos[0]] for v, r in zip(views, rows, strict=True)])
        tok = VisualTokens(
            x=x, mask=torch.cat([r.mask for r in rows]), pos=torch.cat([r.pos for r in rows]), grid=grid,
            size=torch.cat([r.size for r in rows]), assign=torch.cat([r.assign for r in rows]), layout=None,
            keys=torch.cat([r.keys for r in rows]) if rows[0].keys is not None else None,
        )
    else:
        tok = VisualTokens.from_features(
            torch.stack([feats[v.image][v.index] for v in views]), grid,
            cls_attn=torch.stack([signals.attn[v.image][v.index, 0] for v in views]) if signals.attn else None,
            keys=torch.stack([signals.keys[v.image][v.index] for v in views]) if signals.keys else None)
    if signals.text is not None:
        tok = tok.replace(text=signals.text[[v.image for v in views]],
                          text_mask=signals.text_mask[[v.image for v in views]])
    return tok


def _kept_features(layouts: list[ImageLayout], views: list[_View], results: list[VisualTokens], feats,
                   orders: list[Tensor | None] | None = None):
    """Per image: the features the LLM receives (kept / merged tokens at their anchor's slot, plus the
    newlines of rows that keep a token), the kept flag of each original slot, and the per-view tokens.

    ``orders`` (compact positions only): per view, ``[1, M]`` keys of the reference's LLM order of its tokens
    (``None``: spatial). Applied to single-view images without separators (LLaVA-1.5), non-patch prefix
    features ([CLS]) first; other layouts keep the spatial order their packing defines."""
    new_feats, kept_slots, tokens = [], [], [[] for _ in feats]
    by_image: list[list[tuple[_View, VisualTokens, Tensor | None]]] = [[] for _ in feats]
    orders = orders if orders is not None else [None] * len(views)
    for view, row, order in zip(views, results, orders, strict=True):
        by_image[view.image].append((view, row, order))
        tokens[view.image].append(row)
    for i, lay in enumerate(layouts):
        full = feats[i].clone()
        kept = (lay.patch < 0) & ~lay.sep  # non-patch features (a kept [CLS]) always stay
        slot_key = None
        reorder = len(by_image[i]) == 1 and by_image[i][0][2] is not None and not bool(lay.sep.any())
        if reorder:
            slot_key = torch.full(kept.shape, float("inf"), dtype=torch.float64, device=kept.device)
            slot_key[kept] = -1.0  # prefix features first
        for view, row, order in by_image[i]:
            where = view.index[row.pos[0]]
            full[where] = row.x[0].to(full.dtype)  # merged features sit at their anchor patch
            kept[where] = True
            if reorder:
                slot_key[where] = order[0].to(slot_key.device, torch.float64)
        if bool(lay.sep.any()):
            row_kept = torch.zeros(int(lay.group.max()) + 1, dtype=torch.bool, device=kept.device)
            row_kept[lay.group[kept & (lay.patch >= 0)]] = True
            kept |= lay.sep & row_kept[lay.group.clamp(min=0)]
        sel = full[kept]
        if reorder:
            sel = sel[slot_key[kept].argsort(stable=True)]
        new_feats.append(sel)
        kept_slots.append(kept)
    return new_feats, kept_slots, tokens


def _shortened_inputs(model, adapter, inputs, ids, mask, keep, positions, for_generate) -> dict:
    """Inputs with the dropped placeholders removed (re-padded on the batch's padding side) and the kept
    tokens' original positions."""
    left = not bool((mask[:, -1] == 0).any())
    call_inputs = dict(inputs)
    call_inputs["attention_mask"] = mask
    new_inputs, move = _shorten(call_inputs, keep, _pad_id(model, ids, mask, adapter.image_token_id(model)), left)
    pos = _positions(model, adapter, inputs, ids, mask, positions, for_generate)
    if pos is None:
        new_inputs.pop("position_ids", None)
        return new_inputs
    new_pos = move(pos, 0)
    if adapter.position_scheme == "mrope" and for_generate:
        # row 0: the compact text position generate() prepends; a non-compact row 0 would switch on
        # packed-sequence masking
        m = new_inputs["attention_mask"].long()
        new_pos = torch.cat([((m.cumsum(-1) - 1).masked_fill(m == 0, 0))[None], new_pos], dim=0)
    new_inputs["position_ids"] = new_pos
    return new_inputs


def _pad_id(model, ids: Tensor, mask: Tensor, image_id: int) -> int:
    pads = ids[mask == 0]
    if pads.numel():
        return int(pads[0])
    cfg = getattr(model.config, "text_config", model.config)
    pid = getattr(cfg, "pad_token_id", None)
    if pid is None:
        pid = getattr(model.config, "pad_token_id", None)
    return int(pid) if pid is not None and int(pid) != image_id else 0


def _positions(model, adapter, inputs, ids, mask, positions, for_generate) -> Tensor | None:
    """Position ids of the FULL sequence, as the stock model would build them (``None``: let it)."""
    given = inputs.get("position_ids")
    if adapter.position_scheme == "mrope":
        if given is not None:
            return given[-3:] if given.dim() == 3 else given[None].expand(3, -1, -1)
        tt = inputs.get("mm_token_type_ids")
        if tt is None:  # what the processor returns: 1 for image, 2 for video placeholders
            video = getattr(model.config, "video_token_id", None)
            tt = (ids == adapter.image_token_id(model)).to(torch.int) + 2 * (ids == video).to(torch.int)
        pos, _ = adapter.base(model).get_rope_index(ids, tt, image_grid_thw=inputs.get("image_grid_thw"),
                                     video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
        return pos
    if given is not None:
        return given.expand(ids.shape[0], -1) if given.shape[0] == 1 else given
    if positions == "compact":
        return None
    m = mask.long()
    if for_generate:  # what generate() builds from the attention mask
        return (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
    past = inputs.get("past_key_values")
    start = past.get_seq_length() if past is not None else 0
    return (torch.arange(ids.shape[1], device=ids.device) + start)[None].expand(ids.shape[0], -1)


# ============================================================================== encoder stage seam
def _encoder_merging(model, adapter: Adapter, methods: list[Compressor]):
    if len(methods) > 1:
        raise ValueError(f"only one encoder-stage method can run at a time; got {[m.name for m in methods]}")
    if not adapter.supports_encoder_stage():
        raise ValueError(
            f"encoder-stage methods ({methods[0].name!r}) change the number of tokens the vision tower returns, "
            f"which the stock {adapter.family} feature path cannot carry (it rebuilds a full grid after the tower); "
            "encoder-stage methods are supported on: "
            + ", ".join(a.family for a in _ADAPTERS if a.supports_encoder_stage())
        )
    try:
        from .encoder import encoder_merging
    except ImportError as e:  # pragma: no cover - the module is written in parallel
        raise NotImplementedError("encoder-stage methods need vtcompress.models.encoder") from e
    return encoder_merging(model, adapter, methods[0])


def _encoder_features(merging, feats: list[Tensor], want_attn: bool, want_keys: bool):
    """Encoder-merged features placed at their anchor patches of the full grid (placeholder order), and
    the encoder's per-image bookkeeping rows."""
    if want_attn:
        raise ValueError("an encoder-stage merge cannot be combined with a method that needs the [CLS] attention "
                         "signal (the tower's attention then covers merged tokens); use a keys- or feature-based "
                         "projector method after it")
    rows = merging.rows()
    if want_keys and (not rows or rows[0].keys is None):
        raise ValueError(f"the encoder-stage method {merging.method.name!r} does not provide merged keys, which "
                         "the projector-stage method after it needs")
    n0 = merging.num_patches
    out = []
    for f, row in zip(feats, rows, strict=True):
        prefix = int(f.shape[0]) - int(row.x.shape[1])
        full = f.new_zeros(prefix + n0, f.shape[1])
        full[:prefix] = f[:prefix]
        full[prefix + row.pos[0]] = f[prefix:]
        out.append(full)
    return out, rows


# ============================================================================== apply
class ApplyHandle:
    """Returned by :func:`apply`: a context manager and a handle with :meth:`remove`.

    While installed, ``model(**inputs)`` and ``model.generate(**inputs)`` run with the methods applied (the
    top-level model: calls to ``model.model`` directly are not compressed) -- for the calls made in the context
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
                 restore_prompt: bool = True, scope: str = "context"):
        if not isinstance(restore_prompt, bool):
            raise ValueError(f"restore_prompt={restore_prompt!r}; allowed: True, False")
        if scope not in ("context", "model"):
            raise ValueError(f"scope={scope!r}; allowed: 'context' (the calls of this thread / task, or of the "
                             "with block) or 'model' (every call on the model, from any thread, until removed)")
        self.scope = scope
        self.model = model
        self.methods = methods
        # decoder-only methods need no adapter (attach_decoder also serves plain causal LMs)
        self.adapter = adapter_for(model) if self._compressing else None
        self._positions_arg = positions  # the caller's choice, for the decoder stage too (None: each reference's)
        if self.adapter is not None:
            positions = _resolve_positions(positions, methods, self.adapter)  # None: the methods' references
        elif positions is not None and not _decoder_takes_positions():
            raise ValueError(
                f"positions={positions!r} sets how encoder- / projector-stage methods number the shortened prompt; "
                f"{self.describe()} only has decoder-stage methods, which keep every token's original position: "
                "drop the argument")
        if self._decoding:
            _check_sliding_window(model, [m for m in methods if m.stage == "decoder"])
        self.positions = positions
        self.restore_prompt = restore_prompt
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
        if not args and kwargs.get("pixel_values") is None:
            return self._explicit_mask(kwargs)
        if args:
            if len(args) > 1 or not isinstance(args[0], Tensor):
                raise ValueError("with vtcompress.apply, call the model with keyword arguments (input_ids=..., "
                                 "pixel_values=...)")
            kwargs = {"input_ids": args[0], **kwargs}
        if kwargs.get("pixel_values") is None:
            return self._explicit_mask(kwargs) or ((), kwargs)
        res = _compress(self.model, self.adapter, self.methods, kwargs, positions=self.positions,
                        for_generate=False)
        self.last = res
        return (), res.inputs

    def _explicit_mask(self, kwargs):
        """Give a call with 1-D position ids but no attention mask an explicit all-ones mask.

        ``generate`` drops an all-ones mask; without a mask and without a cache (``use_cache=False``) the
        stock mask builder reads gaps in ``position_ids`` -- which kept original positions have -- as
        packed-sequence boundaries. An all-ones mask is numerically the same as none and stops that.
        """
        pos = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is not None or pos is None or self.adapter.position_scheme == "mrope":
            return None
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            return None
        past = kwargs.get("past_key_values")
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
        past = kwargs.get("past_key_values")
        rec = record_of(past)
        decoders = [h._decoder for h in handles if getattr(h, "_decoder", None) is not None]
        if rec is not None:  # the next turn of a conversation whose cache was filled under compression
            if not rec.governed():
                raise rec.outside_error()
            call, prefix, coords = _continue_inputs(rec, kwargs, self.adapter)
            for d, run in rec.decoder_runs.items():
                if d in decoders:
                    d.run = run  # the decoder stage's decision for this cache (another prefill may have run since)
            orig = kwargs["input_ids"] if coords == "orig" else None
        elif self._compressing and kwargs.get("pixel_values") is not None:
            if past is not None and past.get_seq_length() > 0:
                raise ValueError("under vtcompress.apply, images go with an empty cache (or none): this "
                                 "past_key_values already holds tokens that vtcompress did not compress")
            orig = kwargs["input_ids"]
            res = _compress(model, self.adapter, self.methods, kwargs, positions=self.positions, for_generate=True)
            self.last = res
            call = dict(res.inputs)
        else:  # nothing to compress: decoder-stage methods only, or a text-only call
            orig, call = None, dict(kwargs)
        shaped = orig is not None or bool(decoders) or rec is not None  # the cache will differ from stock
        if shaped and past is None and _returns_cache(model, call):
            call["past_key_values"] = new_cache(model)
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
        cache = call.get("past_key_values")
        if cache is None and not isinstance(out, Tensor):
            cache = getattr(out, "past_key_values", None)
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


def _continue_inputs(rec, kwargs: dict, adapter: Adapter | None) -> tuple[dict, int, str]:
    """Map the next turn's ``input_ids`` (the previous call's ids, the new tokens after them) onto the cache's
    coordinates: the known prefix is replaced by its shortened form, the rest follows unchanged; position ids
    continue after the prefix's last position (+1 per token, as ``generate`` extended them).

    Returns the inputs for the stock ``generate``, the prefix length in the caller's ids and ``"orig"`` / ``"short"``
    (whether the caller wrote the prefix in original or in shortened coordinates)."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("continuing a KV cache filled under vtcompress.apply needs input_ids [B, S]: the previous "
                         "output's sequences followed by the new tokens")
    for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "inputs_embeds"):
        if kwargs.get(k) is not None:
            raise ValueError(f"{k} given with a past_key_values that already holds the conversation's images (the "
                             "stock model refuses this too); pass only input_ids / attention_mask for the next turn")
    if rec.rows != rec.orig.shape[0]:
        raise ValueError(f"this KV cache has {rec.rows} rows for {rec.orig.shape[0]} returned sequences (beam "
                         "search keeps every beam): it cannot be continued")
    if ids.shape[0] != rec.orig.shape[0]:
        raise ValueError(f"input_ids have {ids.shape[0]} rows; the KV cache was filled for {rec.orig.shape[0]}")
    orig, short = rec.orig.to(ids.device), rec.short.to(ids.device)
    if ids.shape[1] >= orig.shape[1] and torch.equal(ids[:, : orig.shape[1]], orig):
        prefix, coords = orig.shape[1], "orig"
    elif ids.shape[1] >= short.shape[1] and torch.equal(ids[:, : short.shape[1]], short):
        prefix, coords = short.shape[1], "short"
    else:
        raise ValueError("input_ids do not start with the ids this KV cache was filled from: pass the previous "
                         "generate's output sequences followed by the new tokens")
    if kwargs.get("position_ids") is not None:
        raise ValueError("position_ids cannot be given when continuing a KV cache filled under vtcompress.apply "
                         "(they are continued from the compressed prompt's positions); drop them")
    suffix = ids[:, prefix:]
    model = rec.model()
    cfg = getattr(model, "config", None)
    visual = [v for v in (getattr(cfg, n, None) for n in ("image_token_id", "image_token_index", "video_token_id",
                                                          "video_token_index")) if isinstance(v, int) and v >= 0]
    if visual and bool(torch.isin(suffix, torch.tensor(visual, device=ids.device)).any()):
        raise ValueError("the new tokens hold image / video placeholders: a new image in a conversation continued "
                         "from a compressed KV cache is not supported; run the whole conversation again without "
                         "past_key_values")
    mask = kwargs.get("attention_mask")
    mask_suffix = mask[:, prefix:] if mask is not None else torch.ones_like(suffix)
    call = dict(kwargs)
    call["input_ids"] = torch.cat([short, suffix], dim=1)
    prefix_mask = rec.seq["attention_mask"].to(ids.device)
    call["attention_mask"] = torch.cat([prefix_mask, mask_suffix.to(prefix_mask.dtype)], dim=1)
    for k in (*(adapter.encoder_only_keys if adapter is not None else ()), "image_grid_thw", "video_grid_thw",
              "image_sizes", "batch_num_images"):
        call.pop(k, None)
    for k in ("mm_token_type_ids", "token_type_ids"):
        t = kwargs.get(k)
        if t is None:
            continue
        if k not in rec.seq or t.shape[-1] != ids.shape[1]:
            call.pop(k)  # positions are explicit (M-RoPE) or the key plays no role for the text
            continue
        call[k] = torch.cat([rec.seq[k].to(t.device), t[:, prefix:]], dim=1)
    if rec.pos is not None:
        call["position_ids"] = _continue_positions(rec.pos.to(ids.device), prefix_mask, mask_suffix)
    return call, prefix, coords


def _continue_positions(pos: Tensor, prefix_mask: Tensor, suffix_mask: Tensor) -> Tensor:
    """Positions of ``prefix + suffix``: the prefix's own (``[R, S']``, ``[3, R, S']`` or ``[4, R, S']`` whose row 0
    is the compact text position), then the last real prefix position + 1, + 2, ... per real suffix token."""
    real = prefix_mask.bool()
    body = pos[1:] if pos.dim() == 3 and pos.shape[0] == 4 else pos
    low = torch.iinfo(body.dtype).min
    last = body.masked_fill(~real.expand_as(body), low).amax(dim=-1)  # [R] or [rows, R]
    if body.dim() == 3:
        last = last.amax(dim=0)  # M-RoPE: text after the prompt continues from the largest position
    steps = suffix_mask.long().cumsum(-1)
    tail = (last[:, None] + steps).masked_fill(suffix_mask == 0, 0).to(body.dtype)
    if body.dim() == 3:
        tail = tail[None].expand(body.shape[0], -1, -1)
    out = torch.cat([body, tail], dim=-1)
    if pos.dim() == 3 and pos.shape[0] == 4:
        m = torch.cat([prefix_mask, suffix_mask.to(prefix_mask.dtype)], dim=1).long()
        row0 = (m.cumsum(-1) - 1).masked_fill(m == 0, 0).to(out.dtype)
        out = torch.cat([row0[None], out], dim=0)
    return out


def _check_sliding_window(model: nn.Module, methods: list[Compressor]) -> None:
    """Decoder-stage pruning does not handle sliding-window attention layers (the window would count kept
    tokens): refuse at apply time, from the text config's ``layer_types`` / ``sliding_window``."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
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
          scope: str = "context") -> ApplyHandle:
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
                       scope=scope)
