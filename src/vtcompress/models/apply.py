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

Positions. Every kept token keeps the position it had in the full sequence, so the LLM sees each survivor
where it was and the text after the image does not move (as FastV keeps its position ids):

- M-RoPE (Qwen2-VL / Qwen2.5-VL): the 3-D position of each kept token is its column of ``get_rope_index``
  on the full ids; ``generate`` receives 4 rows whose row 0 is the compact text position (as stock generate
  builds it) and extends every row by +1 per new token, exactly as stock decoding does.
- 1-D RoPE (LLaVA, LLaVA-NeXT, OneVision, InternVL): ``positions="original"`` (default) passes the original
  1-D positions (with gaps where tokens were dropped); ``generate`` continues from the last prompt position
  + 1, like the uncompressed model. ``positions="compact"`` instead renumbers the shortened sequence
  contiguously (what reference implementations of projector-stage pruning do, since they simply feed fewer
  tokens).

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
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..compressor import Compressor, get
from ..tokens import VisualTokens
from .signals import capture_signals

__all__ = [
    "Adapter",
    "ImageLayout",
    "CompressedInputs",
    "ApplyHandle",
    "apply",
    "compress_inputs",
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
def _signal_layer(methods: Sequence[Compressor], n_layers: int) -> int:
    layer = -2
    for m in methods:
        if set(m.needs) & {"cls_attn", "keys"} and getattr(m, "signal_layer", None) is not None:
            layer = int(m.signal_layer)
            break
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"signal_layer={layer} is out of range for a vision encoder of {n_layers} layers")
    return layer


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


def compress_inputs(model: nn.Module, method, *, positions: str = "original", for_generate: bool = False,
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


def _check_positions(positions: str, adapter: Adapter) -> None:
    if positions not in ("original", "compact"):
        raise ValueError(f"positions={positions!r}; allowed: 'original', 'compact'")
    if positions == "compact" and adapter.position_scheme == "mrope":
        raise ValueError("positions='compact' is not available for M-RoPE models (Qwen2-VL / Qwen2.5-VL): "
                         "their 3-D positions come from the image grid; use positions='original'")


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


def _compress(model, adapter: Adapter, methods: list[Compressor], inputs: dict, *, positions: str,
              for_generate: bool) -> CompressedInputs:
    _check_positions(positions, adapter)
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

    out, feats, enc_rows, signals = _encode(model, adapter, methods, inputs)
    flat, samples = _placeholder_slots(ids, image_id, [int(f.shape[0]) for f in feats])
    if "text" in _needs(proj_methods):
        signals.text, signals.text_mask = _text_signal(model, ids, mask, image_id, samples)
    layouts = adapter.layouts(model, inputs, feats)
    views = _views(layouts, proj_methods)
    results = _compress_views(model, views, layouts, feats, signals, enc_rows, proj_methods)
    new_feats, kept_slots, tokens = _kept_features(layouts, views, results, feats)

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
    signal_layer = _signal_layer(proj_methods, len(layers)) if (want_attn or want_keys) else None
    merging = rec = None
    with ExitStack() as stack:
        if enc_methods:
            merging = stack.enter_context(_encoder_merging(model, adapter, enc_methods))
        elif signal_layer is not None:  # with a merged tower, keys come from the merge itself
            rec = stack.enter_context(capture_signals(
                model, adapter.vision_config(model), adapter.attention_module(layers[signal_layer]),
                has_cls=adapter.num_prefix_tokens(model) > 0, attn=want_attn, keys=want_keys))
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
    return out, feats, enc_rows, signals


def _views(layouts: list[ImageLayout], proj_methods: list[Compressor]) -> list[_View]:
    """Every view of every image, with each method's budget split over the views of an image."""
    views = []
    for i, lay in enumerate(layouts):
        index = []
        for v in range(len(lay.grids)):
            idx = ((lay.view == v) & (lay.patch >= 0)).nonzero().squeeze(1)
            index.append(idx[torch.argsort(lay.patch[idx])])
        per_method = [_split_budget(m.budget, [int(x.numel()) for x in index]) for m in proj_methods]
        views += [_View(i, v, idx, tuple(b[v] for b in per_method)) for v, idx in enumerate(index)]
    return views


def _compress_views(model, views: list[_View], layouts, feats, signals: _Signals, enc_rows, proj_methods):
    """Run the projector-stage methods; views with the same grid and budgets go through as one batch."""
    groups: dict[tuple, list[int]] = {}
    for u, view in enumerate(views):
        groups.setdefault((layouts[view.image].grids[view.view], view.budgets), []).append(u)
    results: dict[int, VisualTokens] = {}
    for (grid, budgets), members in groups.items():
        tok = _start_tokens([views[u] for u in members], feats, grid, signals, enc_rows)
        d = tok.x.shape[-1]
        for m, b in zip(proj_methods, budgets, strict=True):
            tok = (m if b == m.budget else dataclasses.replace(m, budget=b))(tok)
            if tok.x.shape[-1] != d:
                raise ValueError(
                    f"method {m.name!r} changed the feature width from {d} to {tok.x.shape[-1]}; the LLM of "
                    f"{type(model).__name__} takes {d}-wide image features (a width-changing method needs a "
                    "trained projector after it)")
        tok = tok.sort_by_pos()
        for r, u in enumerate(members):
            results[u] = tok.row(r)
    return [results[u] for u in range(len(views))]


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


def _kept_features(layouts: list[ImageLayout], views: list[_View], results: list[VisualTokens], feats):
    """Per image: the features the LLM receives (kept / merged tokens at their anchor's slot, plus the
    newlines of rows that keep a token), the kept flag of each original slot, and the per-view tokens."""
    new_feats, kept_slots, tokens = [], [], [[] for _ in feats]
    by_image: list[list[tuple[_View, VisualTokens]]] = [[] for _ in feats]
    for view, row in zip(views, results, strict=True):
        by_image[view.image].append((view, row))
        tokens[view.image].append(row)
    for i, lay in enumerate(layouts):
        full = feats[i].clone()
        kept = (lay.patch < 0) & ~lay.sep  # non-patch features (a kept [CLS]) always stay
        for view, row in by_image[i]:
            where = view.index[row.pos[0]]
            full[where] = row.x[0].to(full.dtype)  # merged features sit at their anchor patch
            kept[where] = True
        if bool(lay.sep.any()):
            row_kept = torch.zeros(int(lay.group.max()) + 1, dtype=torch.bool, device=kept.device)
            row_kept[lay.group[kept & (lay.patch >= 0)]] = True
            kept |= lay.sep & row_kept[lay.group.clamp(min=0)]
        new_feats.append(full[kept])
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

    While active, ``model(**inputs)`` and ``model.generate(**inputs)`` run with the methods applied (the
    top-level model: calls to ``model.model`` directly are not compressed). One apply per model at a time;
    compose methods by passing a list.
    :attr:`last` holds the :class:`CompressedInputs` of the latest call (its ``tokens`` show which tokens
    survived). ``generate`` returns the ORIGINAL prompt ids followed by the new tokens, so slicing by the
    prompt length works as without compression. ``model(**inputs)`` returns logits over the SHORTENED
    sequence (``last.keep`` maps its columns to the original ones).
    """

    def __init__(self, model: nn.Module, methods: list[Compressor], positions: str = "original",
                 restore_prompt: bool = True):
        self.model = model
        self.methods = methods
        # decoder-only methods need no adapter (attach_decoder also serves plain causal LMs)
        self.adapter = adapter_for(model) if self._compressing else None
        if self.adapter is not None:
            _check_positions(positions, self.adapter)
        self.positions = positions
        self.restore_prompt = restore_prompt
        self.last: CompressedInputs | None = None
        self._hooks: list = []
        self._decoder = None
        self._had_generate = "generate" in vars(model)
        base = self._base()
        # runtime state stock generate() keeps on the model (Qwen2-VL's rope_deltas), put back on exit
        self._rope_deltas = getattr(base, "rope_deltas", None) if hasattr(base, "rope_deltas") else _MISSING
        self._install()

    def _base(self) -> nn.Module:
        return self.adapter.base(self.model) if self.adapter is not None else getattr(self.model, "model", self.model)

    @property
    def _compressing(self) -> bool:
        return any(m.stage in ("encoder", "projector") for m in self.methods)

    def _install(self) -> None:
        model = self.model
        try:
            if self._compressing:
                self._hooks.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                if self._had_generate:
                    raise ValueError(f"{type(model).__name__} instance already has its own `generate` attribute "
                                     "(another apply is active?); nest methods as a list instead")
                model.generate = self._generate
            decoder = [m for m in self.methods if m.stage == "decoder"]
            if decoder:
                try:
                    from .decoder import attach_decoder
                except ImportError as e:
                    raise NotImplementedError(
                        "decoder-stage methods need vtcompress.models.decoder.attach_decoder, which is not "
                        "available in this build") from e
                self._decoder = attach_decoder(model, decoder)
        except BaseException:
            self.remove()
            raise

    def _pre_hook(self, module, args, kwargs):
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

    def _generate(self, *args, **kwargs):
        gen = type(self.model).generate.__get__(self.model)
        if len(args) > 1:
            raise ValueError("with vtcompress.apply, pass generate's arguments after input_ids by keyword")
        if args:
            if "input_ids" in kwargs or "inputs" in kwargs:
                raise ValueError("input_ids given twice")
            kwargs["input_ids"], args = args[0], ()
        if "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        if kwargs.get("pixel_values") is None:
            return gen(*args, **kwargs)
        orig = kwargs["input_ids"]
        res = _compress(self.model, self.adapter, self.methods, kwargs, positions=self.positions,
                        for_generate=True)
        self.last = res
        out = gen(*args, **res.inputs)
        if not self.restore_prompt:
            return out
        seqs = out if isinstance(out, Tensor) else out.sequences
        s_new = res.inputs["input_ids"].shape[1]
        prompt = orig.repeat_interleave(seqs.shape[0] // orig.shape[0], dim=0).to(seqs.device)
        full = torch.cat([prompt, seqs[:, s_new:]], dim=1)
        if isinstance(out, Tensor):
            return full
        out.sequences = full
        return out

    def remove(self) -> None:
        """Remove every hook, the instance ``generate`` and the decoder stage; restore runtime state."""
        if self._decoder is not None:
            from .stats import decoder_record

            self._decoder_record = decoder_record(self._decoder)  # counts for summary() after the block
            self._decoder.remove()
            self._decoder = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if not self._had_generate and vars(self.model).get("generate") == self._generate:
            del self.model.generate
        base = self._base()
        if self._rope_deltas is not _MISSING:
            base.rope_deltas = self._rope_deltas

    def summary(self):
        """What the last call under this handle saved (also after the ``with`` block):
        :class:`~vtcompress.models.stats.Savings` -- tokens in / out per stage (before the LLM: per image;
        each decoder stage: per sample) and the analytic prefill FLOPs vs the uncompressed model; ``print`` it."""
        from .stats import summarize

        return summarize(self)

    def __enter__(self) -> ApplyHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_MISSING = object()


def apply(model: nn.Module, method, *, positions: str = "original", restore_prompt: bool = True) -> ApplyHandle:
    """Apply ``method`` to ``model`` until the returned handle is removed (or its ``with`` block ends).

    Args:
        model: a stock ``...ForConditionalGeneration`` of a supported family (see :func:`supported_families`).
        method: a Compressor, a registered name, or a list of them (composition: encoder stage first, then
            the projector-stage methods in list order, then the decoder stage).
        positions: ``"original"`` (kept tokens keep their positions) or ``"compact"`` (1-D RoPE models only:
            renumber the shortened sequence).
        restore_prompt: ``generate`` returns the original prompt ids followed by the new tokens.

    Example::

        with vtcompress.apply(model, vtcompress.get("fastervlm", budget=64)):
            out = model.generate(**inputs, max_new_tokens=20)
    """
    return ApplyHandle(model, resolve_methods(method), positions=positions, restore_prompt=restore_prompt)
