"""Apply any method to a stock Hugging Face VLM: :func:`apply` (context manager / handle) and
:func:`compress_inputs` (the explicit form).

Projector stage, for every family (transformers 5.x):

1. run the model's own ``get_image_features`` (under :func:`~vtcompress.models.signals.capture_signals`
   when a method needs [CLS] attention or keys, under the encoder-stage merging when one is composed);
2. per image, the family's description describes the run of features that fills the image's placeholders
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
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..compressor import Compressor, get
from ..tokens import VisualTokens
from .description import ModelDescription, PositionScheme, TokenLayout
from .layout import ImageLayout
from .registry import adapter_for, list_families
from .sequence import placeholder_slots, shortened_inputs
from .signals import capture_signals

__all__ = [
    "CompressedInputs",
    "compress_inputs",
    "compress_features",
    "compresses_videos",
    "has_visual_inputs",
    "resolve_methods",
    "resolve_positions",
    "feature_signal_layer",
    "split_budget",
]

_STAGE_ORDER = {"encoder": 0, "projector": 1, "decoder": 2}


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
        video_tokens / video_sample / video_num_tokens: the same for the videos the projector stage compressed
            (families with :attr:`~vtcompress.models.description.ModelDescription.video_projector_stage`): one
            :class:`VisualTokens` per FRAME of each video, in its frame's grid.
    """

    inputs: dict
    tokens: list[list[VisualTokens]] = field(default_factory=list)
    keep: Tensor | None = None
    image_sample: Tensor | None = None
    num_tokens: Tensor | None = None
    video_tokens: list[list[VisualTokens]] = field(default_factory=list)
    video_sample: Tensor | None = None
    video_num_tokens: Tensor | None = None

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


def split_budget(budget, sizes: list[int]) -> list:
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


def _text_signal(model, ids: Tensor, mask: Tensor, image_id: int, samples: Tensor):
    """Input embeddings of each image's prompt (its sample's non-image tokens): ``[I, T, D]``, ``[I, T]``."""
    emb = model.get_input_embeddings()
    text_ok = (ids != image_id) & mask.bool()
    t = int(text_ok.sum(1).max()) if ids.numel() else 0
    order = torch.argsort((~text_ok).to(torch.int8), dim=1, stable=True)[:, :t]  # text tokens first, in order
    tid = ids.gather(1, order)
    tmask = text_ok.gather(1, order)
    return emb(tid)[samples], tmask[samples]


def compress_inputs(model: nn.Module, method, *, positions: str | None = None, for_generate: bool = False,
                    processor=None, **inputs) -> CompressedInputs:
    """Compress the images of ``inputs`` and return shortened inputs for ``model`` / ``model.generate``.

    ``method`` is a Compressor, a registered name or a list of them (encoder- and projector-stage methods run
    here; decoder-stage methods need :func:`apply`). ``for_generate=True`` builds the position ids the way
    ``generate`` does (from ``attention_mask``), ``False`` the way ``forward`` does. The returned
    :attr:`CompressedInputs.inputs` are ready to pass on; the surviving tokens are in
    :attr:`CompressedInputs.tokens` (not in ``inputs``), nested per image then per view:
    ``tokens[i][v]`` is one :class:`VisualTokens` (``res.tokens_of(i, v)``; a LLaVA-1.5 image has one view).
    ``processor``: as for :func:`~vtcompress.apply` (InternVL videos under a temporal method).
    """
    desc = adapter_for(model)
    methods = resolve_methods(method)
    if any(m.stage == "decoder" for m in methods):
        raise ValueError("decoder-stage methods act inside the LLM; use `with vtcompress.apply(model, method):`")
    return _compress(model, desc, methods, inputs, positions=positions, for_generate=for_generate,
                     processor=processor)


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



def _check_positions(positions: str | None, desc: ModelDescription) -> None:
    if positions not in (None, "original", "compact"):
        raise ValueError(f"positions={positions!r}; allowed: None (the methods' reference scheme), 'original', "
                         "'compact'")
    if positions == "compact" and desc.position_scheme == PositionScheme.MROPE:
        raise ValueError("positions='compact' is not available for M-RoPE models (Qwen2-VL / Qwen2.5-VL): "
                         "their 3-D positions come from the image grid; use positions='original'")


def resolve_positions(positions: str | None, methods: Sequence[Compressor], desc: ModelDescription) -> str:
    """The position scheme of one call: the explicit one, else the one the encoder- / projector-stage methods'
    references use (``Compressor.positions``); M-RoPE models keep their 3-D grid positions."""
    _check_positions(positions, desc)
    if positions is not None:
        return positions
    if desc.position_scheme == PositionScheme.MROPE:
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


def compresses_videos(desc: ModelDescription, methods: Sequence[Compressor], inputs: dict) -> bool:
    """Whether this call's videos go through the projector-stage methods: the family compresses videos frame by
    frame (:attr:`ModelDescription.video_projector_stage`) and every projector-stage method reads the features
    alone, or vision signals the family captures for video frames (:attr:`ModelDescription.video_signals`:
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL). Elsewhere, under a method that reads them, the videos pass through
    untouched (as on the families without video compression) while the images are compressed;
    ``handle.summary()`` then shows no video stage."""
    video = desc.video if desc is not None else None
    proj = [m for m in methods if m.stage == "projector"]
    needs = _needs(proj) if proj else set()
    readable = not needs or (desc.video_signals and needs <= {"cls_attn", "keys"})
    return (video is not None and desc.video_projector_stage and inputs.get(video.pixel_key) is not None
            and bool(proj) and readable)


def has_visual_inputs(desc: ModelDescription, methods: Sequence[Compressor], inputs: dict) -> bool:
    """Whether a call under the encoder / projector-stage ``methods`` has anything to compress."""
    return inputs.get("pixel_values") is not None or compresses_videos(desc, methods, inputs)


def _compress(model, desc: ModelDescription, methods: list[Compressor], inputs: dict, *, positions: str | None,
              for_generate: bool, processor=None) -> CompressedInputs:
    positions = resolve_positions(positions, methods, desc)
    has_images = inputs.get("pixel_values") is not None
    proj_methods = [m for m in methods if m.stage == "projector"]
    temporal = [m for m in proj_methods if m.temporal]
    if temporal and not (desc.video_projector_stage or desc.frames_as_images):
        raise ValueError(
            f"method {temporal[0].name!r} is temporal (it compresses videos across frames), and the {desc.family} "
            "description does not compress videos at the projector stage; temporal methods run on: "
            + ", ".join(f.family for f in list_families() if f.video_stage))
    if (temporal and _needs(proj_methods) and desc.video is not None and inputs.get(desc.video.pixel_key) is not None
            and not compresses_videos(desc, methods, inputs)):
        raise ValueError(
            f"methods {[m.name for m in proj_methods]} read the vision signals {sorted(_needs(proj_methods))}, which "
            "are not captured for video frames, so the videos would pass the temporal method "
            f"{temporal[0].name!r} untouched; use feature-only settings (e.g. fastvid saliency='features')")
    videos = compresses_videos(desc, methods, inputs)
    if not has_images and not videos:
        return CompressedInputs(inputs=dict(inputs))
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("compressing images needs input_ids [B, S] (to find the image placeholders); "
                         f"got {type(ids).__name__ if not isinstance(ids, Tensor) else tuple(ids.shape)}")
    if inputs.get("mm_encoder_outputs"):
        raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
    # images have no time axis: the temporal methods pass them through, the others compress them
    image_methods = [m for m in methods if not m.temporal]
    image_proj = [m for m in proj_methods if not m.temporal]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    keep = torch.ones_like(ids, dtype=torch.bool)
    mm: dict = {}
    tokens, samples, counts = [], None, []
    if has_images:
        image_id = desc.image_token_id(model)
        clips = _frame_clips(model, desc, methods, inputs, processor) if temporal else []
        out, feats, enc_rows, signals, vision = _encode(model, desc, methods if clips else image_methods, inputs)
        flat, samples = placeholder_slots(ids, image_id, [int(f.shape[0]) for f in feats])
        if "text" in _needs(image_proj):
            signals.text, signals.text_mask = _text_signal(model, ids, mask, image_id, samples)
        layouts = desc.layouts(model, inputs, feats)
        work = feats if vision is None else vision.feats  # the features the methods act on
        if clips:
            views = None
            new_feats, kept_slots, tokens = _compress_frames_and_images(model, clips, layouts, work, signals,
                                                                        proj_methods, positions)
        else:
            views = _views(layouts, image_proj)
            results, orders = _compress_views(model, views, layouts, work, signals, enc_rows, image_proj,
                                              space=None if vision is None else vision.ok)
            new_feats, kept_slots, tokens = _kept_features(layouts, views, results, work,
                                                           orders if positions == "compact" else None)
        if vision is not None:
            new_feats = vision.project(new_feats, kept_slots, feats)
        if kept_slots:
            keep.view(-1)[flat] = torch.cat(kept_slots).to(ids.device)
        extra = desc.extra_features(model, out)
        if extra:
            if vision is not None or enc_rows is not None or clips:
                raise ValueError(f"{desc.family} features carry extra per-token levels, which follow the projected "
                                 "features only: use projector-stage methods that act on the projected features")
            mm["image"] = desc.wrap(out, new_feats, _follow(model, views, layouts, work, signals, image_proj,
                                                            extra, new_feats, positions == "compact", kept_slots))
        else:
            mm["image"] = desc.wrap(out, new_feats)
        counts = [(int(k.numel()), int(k.sum())) for k in kept_slots]
    video = desc.video
    video_keys, video_tokens, video_sample, video_counts = [], [], None, []
    if videos:
        vout, vfeats, vkept, video_tokens, vflat, video_sample, vextra = _compress_videos(model, desc, proj_methods,
                                                                                          inputs, ids)
        if vkept:
            keep.view(-1)[vflat] = torch.cat(vkept).to(ids.device)
        mm["video"] = desc.wrap_video(vout, vfeats, vextra)
        video_counts = [(int(k.numel()), int(k.sum())) for k in vkept]
        video_keys = list(desc.encoder_kwargs(model, inputs, "video"))
    elif video is not None and inputs.get(video.pixel_key) is not None and desc.encode_fn(model, "video") is not None:
        # the stock forward takes either raw pixels or encoder outputs: videos not compressed are encoded here too
        mm["video"] = desc.encode(model, inputs, "video")
        video_keys = list(desc.encoder_kwargs(model, inputs, "video"))
    new_inputs = shortened_inputs(model, desc, inputs, ids, mask, keep, positions, for_generate)
    image_keys = list(desc.encoder_kwargs(model, inputs)) + list(desc.encoder_only_keys) if has_images else []
    for k in image_keys + video_keys:
        new_inputs.pop(k, None)
    new_inputs["mm_encoder_outputs"] = mm
    return CompressedInputs(inputs=new_inputs, tokens=tokens, keep=keep, image_sample=samples,
                            num_tokens=torch.tensor(counts, dtype=torch.long).reshape(-1, 2),
                            video_tokens=video_tokens, video_sample=video_sample,
                            video_num_tokens=torch.tensor(video_counts, dtype=torch.long).reshape(-1, 2))


def _frame_clips(model, desc: ModelDescription, methods: list[Compressor], inputs: dict, processor) -> list[list[int]]:
    """The images of a :attr:`~ModelDescription.frames_as_images` family that are the frames of a video, grouped
    per video (``[]`` on the other families: their images have no time axis and pass temporal methods)."""
    if not desc.frames_as_images:
        return []
    temporal = next(m for m in methods if m.temporal)
    if processor is None:
        raise ValueError(
            f"method {temporal.name!r} is temporal; {desc.family} receives a video as frames among the images "
            "(frame prompts 'Frame1: <img>...'), so pass its processor (or tokenizer) to read them: "
            "vtcompress.apply(model, method, processor=processor)")
    clips = desc.image_clips(model, inputs, processor)
    if clips:
        proj = [m for m in methods if m.stage == "projector"]
        bad = [m.name for m in methods if m.stage == "encoder"]
        if bad or "text" in _needs(proj):
            raise ValueError(
                f"the frames of a {desc.family} video go through {[m.name for m in proj]} as one clip, which takes "
                "projector-stage methods reading the features or the vision signals; got "
                + (f"encoder-stage {bad}" if bad else "a method reading the prompt ('text')"))
    return clips


def _compress_frames_and_images(model, clips: list[list[int]], layouts: list[ImageLayout], feats: list[Tensor],
                                signals: _Signals, proj_methods: list[Compressor], positions: str):
    """:func:`_kept_features`' per-image result when some images are the frames of videos (``clips``: image
    indices per video): each video's frames go through every projector-stage method as one clip
    (:func:`_compress_clips`), the other images through the spatial ones (temporal methods pass them). A frame
    receives the kept tokens whose slot is in it; its ``tokens`` entry is its video's clip row."""
    n = len(feats)
    new_feats: list = [None] * n
    kept_slots: list = [None] * n
    tokens: list = [None] * n
    in_clip = {i for c in clips for i in c}
    rest = [i for i in range(n) if i not in in_clip]

    def pick(values, idx):
        return [values[i] for i in idx] if values else None

    if rest:
        lay, fs = [layouts[i] for i in rest], [feats[i] for i in rest]
        spatial = [m for m in proj_methods if not m.temporal]
        views = _views(lay, spatial)
        results, orders = _compress_views(model, views, lay, fs, _Signals(attn=pick(signals.attn, rest),
                                                                          keys=pick(signals.keys, rest)),
                                          None, spatial)
        for i, f, k, t in zip(rest, *_kept_features(lay, views, results, fs,
                                                   orders if positions == "compact" else None), strict=True):
            new_feats[i], kept_slots[i], tokens[i] = f, k, t
    vlay, vfeats = [], []
    for c in clips:
        grids = {g for i in c for g in layouts[i].grids}
        if len(grids) != 1 or any(len(layouts[i].grids) != 1 for i in c):
            raise ValueError(f"the frames {c} of a video have grids {sorted(grids)}; a clip needs one tile of one "
                             "grid per frame")
        vlay.append(ImageLayout.tiles(grids.pop(), len(c), feats[c[0]].device))
        vfeats.append(torch.cat([feats[i] for i in c]))
    cat = (lambda values: [torch.cat([values[i] for i in c]) for c in clips] if values else None)
    views = _clip_views(vlay, proj_methods)
    results = _compress_clips(model, views, vlay, vfeats, proj_methods,
                              _Signals(attn=cat(signals.attn), keys=cat(signals.keys)))
    for c, f, k, t in zip(clips, *_kept_features(vlay, views, results, vfeats, None), strict=True):
        ks = torch.split(k, [int(feats[i].shape[0]) for i in c])
        for i, kf, ff in zip(c, ks, torch.split(f, [int(x.sum()) for x in ks]), strict=True):
            new_feats[i], kept_slots[i], tokens[i] = ff, kf, t
    return new_feats, kept_slots, tokens


def _compress_videos(model, desc: ModelDescription, proj_methods: list[Compressor], inputs: dict, ids: Tensor):
    """The projector-stage methods on every frame of every video (one view per frame, so an int budget is split
    over the clip's frames and a fraction applies to each frame; :func:`split_budget`). Returns the stock video
    output, the kept features per video, the kept flag of each placeholder slot per video, the per-frame tokens,
    the placeholders' flat positions, each video's sample and the per-token levels that follow the features
    (Qwen3-VL's DeepStack: ``[level][video]``, compressed alike by :func:`_follow`; ``None`` without)."""
    out, feats, signals = _encode_videos(model, desc, proj_methods, inputs)
    flat, sample = placeholder_slots(ids, desc.token_id(model, "video"), [int(f.shape[0]) for f in feats])
    layouts = desc.video_layouts(model, inputs, feats)
    clips = any(m.temporal for m in proj_methods)
    if clips:
        views = _clip_views(layouts, proj_methods)
        results = _compress_clips(model, views, layouts, feats, proj_methods, signals)
    else:
        views = _views(layouts, proj_methods)
        results, _ = _compress_views(model, views, layouts, feats, signals, None, proj_methods)
    new_feats, kept_slots, tokens = _kept_features(layouts, views, results, feats, None)
    extra = desc.extra_features(model, out)
    levels = _follow(model, views, layouts, feats, signals, proj_methods, extra, new_feats, False, kept_slots,
                     clips=clips) if extra else None
    return out, new_feats, kept_slots, tokens, flat, sample, levels


def _encode_videos(model, desc: ModelDescription, proj_methods: list[Compressor], inputs: dict):
    """The model's own ``get_video_features``, under the signal capture the methods need (families with
    :attr:`ModelDescription.video_signals`). Returns its output, the per-video features and the signals."""
    needs = _needs(proj_methods)
    want_attn, want_keys = "cls_attn" in needs, "keys" in needs
    signals = _Signals()
    if not (want_attn or want_keys):
        out = desc.encode(model, inputs, "video")
        return out, desc.video_features(model, inputs, out), signals
    layers = desc.vision_layers(model)
    layer, heads = _signal_layer(proj_methods, len(layers), desc.feature_layer(model))
    with capture_signals(model, desc.vision_config(model), desc.attention_module(layers[layer]),
                         has_cls=desc.num_prefix_tokens(model) > 0, attn=want_attn, keys=want_keys,
                         heads=heads) as rec:
        out = desc.encode(model, inputs, "video")
    feats = desc.video_features(model, inputs, out)
    if want_attn:
        signals.attn = desc.signal_to_features(model, inputs, [a[..., None] for a in rec.attn], "sum", feats,
                                               modality="video")
    if want_keys:
        signals.keys = desc.signal_to_features(model, inputs, rec.keys, "mean", feats, modality="video")
    return out, feats, signals


def _clip_views(layouts: list[ImageLayout], proj_methods: list[Compressor]) -> list[_View]:
    """One view per video, its frames' patches frame after frame (under a temporal method the video is one clip:
    :class:`VisualTokens` with ``frames = T``; every budget counts per clip)."""
    views = []
    for i, lay in enumerate(layouts):
        if len(set(lay.grids)) != 1:
            raise ValueError(f"video {i} has frames of different grids {sorted(set(lay.grids))}; a clip for a "
                             "temporal method needs one grid for every frame")
        views.append(_View(i, 0, torch.cat(_view_indices(lay)), tuple(m.budget for m in proj_methods)))
    return views


def _compress_clips(model, views: list[_View], layouts: list[ImageLayout], feats: list[Tensor],
                    proj_methods: list[Compressor], signals: _Signals | None = None) -> list[VisualTokens]:
    """The projector-stage methods on each video as one clip (spatial methods frame by frame, temporal ones
    across frames); clips of one shape and budgets go through as one batch. Returns one clip row per video."""
    groups: dict[tuple, list[int]] = {}
    for u, view in enumerate(views):
        lay = layouts[view.image]
        groups.setdefault((lay.grids[0], len(lay.grids), view.budgets), []).append(u)
    results: dict[int, VisualTokens] = {}
    for (grid, frames, _budgets), members in groups.items():
        vs = [views[u] for u in members]
        sig = signals or _Signals()
        tok = VisualTokens.from_features(
            torch.stack([feats[v.image][v.index] for v in vs]), grid, frames=frames,
            cls_attn=torch.stack([sig.attn[v.image][v.index, 0] for v in vs]) if sig.attn else None,
            keys=torch.stack([sig.keys[v.image][v.index] for v in vs]) if sig.keys else None)
        d = tok.x.shape[-1]
        for m in proj_methods:
            tok = m(tok)
            if tok.x.shape[-1] != d:
                raise ValueError(f"method {m.name!r} changed the feature width from {d} to {tok.x.shape[-1]}; the "
                                 f"LLM of {type(model).__name__} takes {d}-wide video features")
        tok = tok.sort_by_pos()
        for r, u in enumerate(members):
            results[u] = tok.row(r)
    return [results[u] for u in range(len(views))]


def _encode(model, desc: ModelDescription, methods: list[Compressor], inputs: dict):
    """Run the model's own ``get_image_features`` under the signal capture / encoder-stage merging the methods
    need. Returns its output, the per-image features, the encoder's rows (merging only) and the signals."""
    enc_methods = [m for m in methods if m.stage == "encoder"]
    proj_methods = [m for m in methods if m.stage == "projector"]
    needs = _needs(proj_methods)
    want_attn, want_keys = "cls_attn" in needs, "keys" in needs
    layers = desc.vision_layers(model)
    signal = None
    if want_attn or want_keys:
        signal = _signal_layer(proj_methods, len(layers), desc.feature_layer(model))
    # the vision space: when every projector method acts there, on a family with a 1:1 map (see the docstring)
    projector = _projector(model, desc) if (
        proj_methods and not enc_methods and all(_acts_on(m) == "vision" for m in proj_methods)) else None
    captured: list[Tensor] = []
    merging = rec = None
    with ExitStack() as stack:
        if enc_methods:
            merging = stack.enter_context(_encoder_merging(model, desc, enc_methods))
        elif signal is not None:  # with a merged tower, keys come from the merge itself
            rec = stack.enter_context(capture_signals(
                model, desc.vision_config(model), desc.attention_module(layers[signal[0]]),
                has_cls=desc.num_prefix_tokens(model) > 0, attn=want_attn, keys=want_keys, heads=signal[1]))
        if projector is not None:
            me = threading.get_ident()  # a concurrent call on the model (another thread) runs this projector too
            hook = projector.register_forward_pre_hook(
                lambda _mod, args: captured.append(args[0]) if threading.get_ident() == me else None)
            stack.callback(hook.remove)
        # the caller's grad mode holds: a projector (or a trainable compressor) can be trained through apply
        out = desc.encode(model, inputs, "image")
    feats = desc.features(model, inputs, out)
    enc_rows = None
    if merging is not None:
        feats, enc_rows = _encoder_features(merging, feats, want_attn, want_keys)
    signals = _Signals()
    if rec is not None and want_attn:
        signals.attn = desc.signal_to_features(model, inputs, [a[..., None] for a in rec.attn], "sum", feats)
    if rec is not None and want_keys:
        signals.keys = desc.signal_to_features(model, inputs, rec.keys, "mean", feats)
    vision = _VisionSpace.build(model, desc, inputs, projector, captured, feats) if projector is not None else None
    return out, feats, enc_rows, signals, vision


def _acts_on(m: Compressor) -> str:
    where = getattr(m, "acts_on", "projected")
    if where not in ("vision", "projected"):
        raise ValueError(f"method {m.name!r}: acts_on={where!r}; allowed: 'vision', 'projected'")
    return where


def _projector(model, desc: ModelDescription) -> nn.Module | None:
    """The model's own multimodal projector when the family maps its input 1:1 onto the LLM's image tokens
    (``projector_one_to_one``: LLaVA-1.5, LLaVA-NeXT, OneVision); ``None`` (act on the projected features)
    otherwise."""
    if not desc.projector_one_to_one:
        return None
    return desc.projector(model)


@dataclass
class _VisionSpace:
    """The projector's input laid out like the projected features: ``feats`` per image ``[L_i, C_v]`` (zeros
    at the newlines), ``newline`` per image ``[L_i]`` bool, the model's projector and its row separator
    (``image_newline``).

    ``ok`` per image: its tokens map 1:1 onto the projector input. An image that does not (OneVision's
    anyres_max down-sizing) keeps its projected features ``[L_i, D]`` in ``feats`` and is compressed there, so
    each image gets what it gets alone, whatever the other images of the batch."""

    feats: list[Tensor]
    newline: list[Tensor]
    projector: nn.Module
    separator: Tensor | None
    ok: list[bool]

    @classmethod
    def build(cls, model, desc: ModelDescription, inputs, projector, captured: list[Tensor], feats: list[Tensor]):
        if len(captured) != 1:
            return None  # the projector ran 0 or several times: no 1:1 map to rely on
        x = captured[0]
        layout = desc.image.layout
        if layout is TokenLayout.GRID:
            if x.dim() != 3 or x.shape[0] != len(feats):
                return None  # features of several images in one row (image_sizes): not handled, act projected
            vis = list(x)
            newline = [torch.zeros(int(f.shape[0]), dtype=torch.bool, device=f.device) for f in feats]
            ok = [True] * len(feats)
            image_newline = None
        elif layout is TokenLayout.ANYRES:  # pack the projector input as the stock packer packs the projected crops
            crops = desc.crops(model, inputs)
            if x.dim() != 3 or x.shape[0] != sum(crops):
                return None
            t = x.shape[1]
            ids = torch.arange(x.shape[0] * t, device=x.device, dtype=torch.float32).reshape(-1, t, 1)
            packed_ids = desc.pack(model, inputs, list(torch.split(ids, crops)), torch.full((1,), -1.0,
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
            image_newline = desc.image_newline(model)
        else:
            return None  # no 1:1 map for this layout: act on the projected features
        for v, f in zip(vis, feats, strict=True):
            if v.shape[0] != f.shape[0]:
                return None
        if not any(ok):
            return None
        return cls(feats=vis, newline=newline, projector=projector, separator=image_newline, ok=ok)

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
                y = torch.where(sep[:, None], self.separator.to(y.dtype)[None], y)
            out.append(y)
        return out


def _view_indices(lay: ImageLayout) -> list[Tensor]:
    """Per view of one image (or frame of one video): the feature indices of its patches, in raster order."""
    index = []
    for v in range(len(lay.grids)):
        idx = ((lay.view == v) & (lay.patch >= 0)).nonzero().squeeze(1)
        index.append(idx[torch.argsort(lay.patch[idx])])
    return index


def _views(layouts: list[ImageLayout], proj_methods: list[Compressor]) -> list[_View]:
    """Every view of every image, with each method's budget split over the views of an image."""
    views = []
    for i, lay in enumerate(layouts):
        index = _view_indices(lay)
        sizes = [int(x.numel()) for x in index]
        per_method = [split_budget(m.budget, sizes) for m in proj_methods]
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


# ============================================================================== features that follow (DeepStack)
def _follow(model, views: list[_View], layouts: list[ImageLayout], feats: list[Tensor], signals: _Signals,
            proj_methods: list[Compressor], extra: list[list[Tensor]], new_feats: list[Tensor],
            compact: bool, kept_slots: list[Tensor], clips: bool = False) -> list[list[Tensor]]:
    """``extra[level][image]`` (``[L_i, D]``, token for token with ``feats``) through the compression the image
    features just went through: the same operation with the same decisions (kept indices, merge groups and
    weights, pooling cells), per level.

    Computed as the forward-mode derivative of the methods along each level (``torch.autograd.forward_ad``: the
    chain runs again on ``feats`` carrying that level as tangent; the decisions come from the primal ``feats``,
    signals and grid, as in the first run). This is the methods' own operation applied to the level wherever
    their output is linear in the features once decided -- selection, size-weighted means, sums, pooling,
    bilinear resize, VisionZip's and PruMerge's merges -- and that is checked on every call: the chain's
    derivative along ``feats`` itself must give back its output (``J(x) x = f(x)``, which a learned non-linear
    map breaks: ``ValueError``). The rerun must reproduce ``new_feats`` exactly (deterministic methods).

    When every image's output IS its input features at the kept slots (``kept_slots[i]``, ``[L_i]`` bool: pure
    selection, in slot order), the levels are gathered at those slots with no rerun -- the same result, and most
    of the cost saved for FasterVLM, DivPrune, random or uniform pruning (``benchmarks/deepstack_follow.py``).

    ``clips``: the views are videos as clips (:func:`_clip_views`) under a temporal method.

    Returns ``[level][image]`` tensors ``[K_i, D]``, row for row with ``new_feats``."""
    import torch.autograd.forward_ad as fwad

    if all(nf.shape[0] == int(k.sum()) and torch.equal(nf, f[k.to(f.device)])
           for nf, f, k in zip(new_feats, feats, kept_slots, strict=True)):
        return [[t[k.to(t.device)] for t, k in zip(level, kept_slots, strict=True)] for level in extra]

    def rerun(tangents: list[Tensor]) -> list[Tensor]:
        dual = [fwad.make_dual(f, t.to(device=f.device, dtype=f.dtype)) for f, t in zip(feats, tangents, strict=True)]
        if clips:  # videos as clips under a temporal method
            results, orders = _compress_clips(model, views, layouts, dual, proj_methods, signals), None
        else:
            results, orders = _compress_views(model, views, layouts, dual, signals, None, proj_methods)
        kept = _kept_features(layouts, views, results, dual, orders if compact else None)[0]
        out = []
        for k, ref in zip(kept, new_feats, strict=True):
            primal, tangent = fwad.unpack_dual(k)
            if not torch.equal(primal, ref):
                raise ValueError("the projector-stage methods gave a different result on a second run of the same "
                                 "inputs; features that follow the image features (DeepStack levels) need "
                                 "deterministic methods")
            out.append(torch.zeros_like(primal) if tangent is None else tangent)
        return out

    names = ", ".join(m.name or type(m).__name__ for m in proj_methods)
    # inference mode switches forward-mode AD off (tangents come back None): the rerun leaves it
    with torch.inference_mode(False), fwad.dual_level():
        check = rerun(feats)
        for c, ref in zip(check, new_feats, strict=True):
            tol = 1e-5 if ref.dtype in (torch.float32, torch.float64) else 1e-2
            scale = float(ref.detach().abs().max().clamp(min=1)) if ref.numel() else 1.0
            if not torch.allclose(c.float(), ref.float(), rtol=tol, atol=tol * scale):
                raise ValueError(f"the projector-stage method(s) {names} are not linear in the image features once "
                                 "their decisions are made (a learned or non-linear map), so the features that "
                                 "follow them token for token (Qwen3-VL's DeepStack levels) cannot be compressed "
                                 "alike: use a selection, merging or pooling method")
        return [rerun(level) for level in extra]


# ============================================================================== encoder stage seam
def _encoder_merging(model, desc: ModelDescription, methods: list[Compressor]):
    if len(methods) > 1:
        raise ValueError(f"only one encoder-stage method can run at a time; got {[m.name for m in methods]}")
    if not desc.supports_encoder_stage():
        raise ValueError(
            f"encoder-stage methods ({methods[0].name!r}) change the number of tokens the vision tower returns, "
            f"which the stock {desc.family} feature path cannot carry (it rebuilds a full grid after the tower); "
            "encoder-stage methods are supported on: "
            + ", ".join(f.family for f in list_families() if f.encoder_stage)
        )
    try:
        from .encoder import encoder_merging
    except ImportError as e:  # pragma: no cover - the module is written in parallel
        raise NotImplementedError("encoder-stage methods need vtcompress.models.encoder") from e
    return encoder_merging(model, desc, methods[0])


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


