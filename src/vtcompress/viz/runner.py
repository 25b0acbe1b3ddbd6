"""Running a method on one image for a token map: the model's own inputs, the vision tower and LLM re-run under
the method (``vtcompress.compress_inputs`` / the decoder-stage hooks), or raw pixel patches with no model.

Returns :class:`~vtcompress.tokens.VisualTokens` per stage and view; :mod:`vtcompress.viz.render` draws them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..compressor import Stage
from ..loading import LoadedModel
from ..tokens import VisualTokens
from .render import (
    DIM_FACTOR,
    TARGET_SIDE,
    clip_strip,
    panel_grid,
    panel_title,
    patch_states,
    to_pil,
    token_map,
)

__all__ = [
    "DEFAULT_QUESTION",
    "PIXEL_PATCH",
    "model_inputs",
    "pixel_tokens",
    "method_stages",
    "model_view",
    "build_methods",
    "method_panels",
    "gallery",
    "clip_tokens",
    "clip_strips",
]

# ----------------------------------------------------------------------------------------------- models

#: prompt used when the user gives none (text-guided methods read it): neutral, so that a photo is not asked a
#: testbed question; every word is in the testbed's vocabulary. ``vtcompress show --sample N`` asks sample N's
#: own question instead.
DEFAULT_QUESTION = "what is there ?"
#: ``--model none``: the image is cut into this many pixels per patch side and the raw patches are the features.
PIXEL_PATCH = 8


def model_inputs(loaded: LoadedModel, image: Image.Image, question: str = DEFAULT_QUESTION) -> dict[str, torch.Tensor]:
    """The inputs of one (image, question) for ``loaded``'s model, built like its training / processor does.

    Testbed-style models (no processor): the image resized to the tower's ``image_size`` (bicubic) and
    CLIP-normalised exactly as ``vtcompress.testbed.encode`` does, with the testbed prompt.
    """
    model = loaded.model
    if loaded.processor is not None:
        proc = loaded.processor
        text = None
        if getattr(proc, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = proc.apply_chat_template(messages, add_generation_prompt=True)
        if text is None:
            token = getattr(proc, "image_token", None) or "<image>"
            text = f"{token}\n{question}"
        enc = proc(images=[image], text=[text], return_tensors="pt")
        return {k: v.to(model.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
    from ..testbed.model import build_prompt, pixel_values_from_images

    size = loaded.image_size
    arr = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC) if image.size != (size, size) else image)
    n_img = int(getattr(model.config, "image_seq_length", 0) or 0)
    if n_img <= 0:
        raise ValueError("the model config has no image_seq_length; save it with an AutoProcessor instead")
    enc = loaded.tokenizer([build_prompt(question, n_img)], return_tensors="pt", add_special_tokens=False)
    dtype = next(model.parameters()).dtype
    return {
        "input_ids": enc["input_ids"].to(model.device),
        "attention_mask": enc["attention_mask"].to(model.device),
        "pixel_values": pixel_values_from_images([arr]).to(device=model.device, dtype=dtype),
    }


def pixel_tokens(image: Image.Image, grid: tuple[int, int], patch: int = PIXEL_PATCH) -> VisualTokens:
    """No model: ``VisualTokens`` whose features are the raw RGB patches, ``x [1, H*W, 3*patch*patch]`` in [0, 1]."""
    gh, gw = grid
    arr = np.asarray(image.resize((gw * patch, gh * patch), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    x = arr.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(1, gh * gw, -1)
    return VisualTokens.from_features(torch.from_numpy(np.ascontiguousarray(x)), grid=grid)


def _no_model_check(method) -> None:
    if method.stage != Stage.PROJECTOR:
        raise ValueError(
            f"method {method.name!r} acts in the {method.stage} stage and needs a model; --model none only gives "
            "pixel features (use --model testbed or --model DIR)"
        )
    if method.needs:
        raise ValueError(
            f"method {method.name!r} needs the {', '.join(repr(s) for s in method.needs)} signal from a model; "
            "--model none only gives pixel features (use --model testbed or --model DIR)"
        )


def _stages_of(result: Any) -> list[tuple[str, Any, int]]:
    """Normalise what a compression returned into ``[(stage title or "", tokens or kept mask, view), ...]``."""
    if isinstance(result, VisualTokens):
        return [("", result, 0)]
    if isinstance(result, Mapping):
        return [(f"layer {k}", v, 0) for k, v in result.items()]
    if isinstance(result, (list, tuple)):
        return [(str(item[0]), item[1], int(item[2]) if len(item) > 2 else 0) for item in result]
    raise ValueError(f"cannot draw a compression result of type {type(result).__name__}")


def method_stages(
    loaded: LoadedModel | None,
    method,
    image: Image.Image,
    question: str = DEFAULT_QUESTION,
    grid: tuple[int, int] = (12, 12),
    inputs: dict[str, torch.Tensor] | None = None,
) -> list[tuple[str, Any, int]]:
    """Run ``method`` (a built :class:`~vtcompress.compressor.Compressor`) on one image.

    Returns ``[(stage title, tokens, view)]``: one entry for a projector / encoder-stage method (title ``""``),
    one per pruning layer for a decoder-stage method (``"layer K"``); models with several views per image
    (anyres grids, tiles) give one entry per view (``"view v"``, ``"layer K, view v"``). ``loaded`` is
    ``None`` for no model (pixel features on ``grid``; methods needing a model signal raise ``ValueError``).
    ``inputs``: the model inputs of ``image`` if already built by :func:`model_inputs`.
    """
    if loaded is None:
        _no_model_check(method)
        return _stages_of(method(pixel_tokens(image, grid)))
    inputs = model_inputs(loaded, image, question) if inputs is None else inputs
    return _stages_of(_compress_with_model(loaded.model, method, inputs))


def model_view(
    loaded: LoadedModel | None,
    image: Image.Image,
    inputs: dict[str, torch.Tensor] | None,
    view: int = 0,
    num_views: int = 1,
) -> Image.Image:
    """The image as the model saw it in ``view`` (of ``num_views``), to draw that view's map on.

    With a processor that hands the model whole crops (``pixel_values [.., crops, 3, H, W]``: CLIP's centre
    crop, InternVL tiles, the base crop of anyres models), the view's crop un-normalised with the processor's
    mean and std: view ``v`` is crop ``v`` when there are as many views as crops (tiles), else view 0 is the
    first crop and later views (anyres high-resolution grids, which span the image) the input image. Without
    a processor (testbed: a plain resize) or with flattened patches (Qwen2-VL), the input image.
    """
    if loaded is None or loaded.processor is None or inputs is None:
        return image
    pv = inputs.get("pixel_values")
    if not isinstance(pv, torch.Tensor) or pv.dim() not in (4, 5) or pv.shape[-3] != 3:
        return image
    crops = pv.reshape(-1, *pv.shape[-3:])
    if num_views == crops.shape[0]:
        crop = crops[view]
    elif view == 0:
        crop = crops[0]
    else:
        return image
    crop = crop.detach().float().cpu()
    ip = getattr(loaded.processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if mean is None or std is None:
        return to_pil(crop)  # min-max stretched
    crop = crop * torch.tensor(std).reshape(3, 1, 1) + torch.tensor(mean).reshape(3, 1, 1)
    return to_pil(crop.clamp(0, 1))


@torch.no_grad()
def _compress_with_model(model, method, inputs: dict[str, torch.Tensor]) -> Any:
    """Encoder / projector stage: ``compress_inputs`` and the image's ``VisualTokens`` (one per view: anyres
    models have a base view and a high-resolution view). Decoder stage: one kept mask per pruning layer."""
    if method.stage == Stage.DECODER:
        return _decoder_stages(model, method, inputs)
    from ..models.apply import compress_inputs

    try:
        res = compress_inputs(model, method, **inputs)
    except ValueError:
        # e.g. pixel_unshuffle widens the features beyond what this model's LLM takes: the model cannot run
        # it, but which patches go where is still the method's decision on the model's features; draw that
        if method.stage != Stage.PROJECTOR or method.needs:
            raise
        tokens = _features_only(model, method, inputs)
        if tokens is None:
            raise
        return [("features only", tokens, 0)]
    views = res.tokens[0] if res.tokens else []
    if not views:
        raise ValueError(f"{type(model).__name__} returned no visual tokens for the image")
    if len(views) == 1:
        return views[0]
    return [(f"view {i}", v, i) for i, v in enumerate(views)]


def _features_only(model, method, inputs: dict[str, torch.Tensor]) -> VisualTokens | None:
    """``method`` applied to the first image's features when they form one plain grid (``None`` otherwise)."""
    feats, layout = _first_image_features(model, inputs)
    grid = layout.grids[0]
    if len(layout.grids) != 1 or bool(layout.sep.any()) or feats.shape[0] != grid[0] * grid[1]:
        return None
    return method(VisualTokens.from_features(feats[None].float(), grid=grid))


def _first_image_features(model, inputs: dict[str, torch.Tensor]):
    """The first image's features ``[L, D]`` (the model's own ``get_image_features``) and the adapter's
    :class:`~vtcompress.models.apply.ImageLayout` of them: for each placeholder token, the view (base grid,
    high-resolution grid, tile) and the patch it stands for."""
    from ..models.apply import adapter_for

    adapter = adapter_for(model)
    out = adapter.base(model).get_image_features(**adapter.encoder_kwargs(model, inputs))
    feats = adapter.features(model, inputs, out)
    return feats[0], adapter.layouts(model, inputs, feats)[0]


def _decoder_stages(model, method, inputs: dict[str, torch.Tensor]) -> list[tuple[str, VisualTokens]]:
    """Run one prefill with the decoder-stage ``method`` attached.

    Returns, per pruning layer (and per view of the first image, for anyres / tiled models), the patches
    whose placeholder tokens are still in the sequence from that layer on, as a selection of the view's full
    grid (without a projector-stage method, each placeholder is one patch; row separators are not drawn).
    """
    from ..models.decoder import attach_decoder, visual_token_ids

    _, layout = _first_image_features(model, inputs)
    ids = inputs["input_ids"]
    vis = torch.isin(ids[0], torch.tensor(visual_token_ids(model.config), device=ids.device))
    n = layout.view.shape[0]
    vis_pos = vis.nonzero().squeeze(1)[:n]  # the first image's placeholders come first
    if vis_pos.numel() != n:
        raise ValueError(f"the prompt has {vis_pos.numel()} image placeholders, fewer than the {n} features of "
                         "its first image")
    view, patch = layout.view.cpu(), layout.patch.cpu()
    stages = []
    with attach_decoder(model, [method]) as handle:
        model(**inputs)
        for i, stage in enumerate(handle.stages):
            kept = torch.isin(vis_pos, handle.kept_visual(i)[0].to(vis_pos.device)).cpu() & (patch >= 0)
            for v, grid in enumerate(layout.grids):
                idx = patch[kept & (view == v)].sort().values
                # as VisualTokens (a selection of the view's full grid), so the stage carries its grid
                full = VisualTokens.from_features(torch.zeros(1, grid[0] * grid[1], 1), grid=grid)
                title = f"layer {stage.layer}" + (f", view {v}" if len(layout.grids) > 1 else "")
                stages.append((title, full.select(idx[None]), v))
    return stages


# ----------------------------------------------------------------------------------------------- gallery / CLI


def _as_loaded(model, tokenizer) -> LoadedModel | None:
    if model is None or isinstance(model, LoadedModel):
        return model
    if tokenizer is not None and hasattr(tokenizer, "image_processor"):
        return LoadedModel(model, processor=tokenizer)
    size = getattr(getattr(model.config, "vision_config", None), "image_size", None)
    return LoadedModel(model, tokenizer=tokenizer, image_size=size if isinstance(size, int) else None)


def build_methods(methods: Sequence[Any], budget, params: dict | None) -> list:
    """Build every method; ``params`` keys are ``"key"`` (every method with that field) or ``"method.key"``.

    A parameter no listed method has raises ``ValueError`` (a typo must not pass silently).
    """
    import dataclasses

    from ..compressor import Compressor, get, method_class

    defaults = []
    for m in methods:
        if not isinstance(m, (str, Compressor)):
            raise ValueError(f"methods are given by name or as Compressor instances; got {type(m).__name__}")
        defaults.append(m if isinstance(m, Compressor) else method_class(m))  # fields and name, nothing built yet
    params = dict(params or {})
    names = [d.name for d in defaults]
    used: set[str] = set()
    built = []
    for m, d in zip(methods, defaults, strict=True):
        fields = {f.name for f in dataclasses.fields(d) if f.init}
        mine = {}
        for key, value in params.items():
            prefix, dot, field = key.rpartition(".")
            if dot and prefix == d.name:
                mine[field] = value  # get() rejects a field the method lacks, naming its fields
                used.add(key)
            elif not dot and key in fields:
                mine[key] = value
                used.add(key)
        if budget is not None and not (isinstance(m, Compressor) and m.budget == budget):
            mine.setdefault("budget", budget)
        # an instance is used as given when nothing changes: rebuilding it would re-initialise trained modules
        built.append(get(m, **mine) if mine or not isinstance(m, Compressor) else m)
    unused = [k for k in params if k not in used]
    if unused:
        raise ValueError(
            f"parameter(s) {', '.join(unused)} match no method among {', '.join(names)} "
            "(give KEY=VALUE for a field of a method, or METHOD.KEY=VALUE)"
        )
    return built


def method_panels(
    loaded: LoadedModel | None,
    image: Image.Image,
    methods: Sequence[Any],
    budget: int | float | None,
    question: str = DEFAULT_QUESTION,
    grid: tuple[int, int] = (12, 12),
    params: dict | None = None,
    cell: int | None = None,
    input_panel: bool = False,
    skip_errors: bool = False,
) -> list[tuple[str, Image.Image]]:
    """One titled token map per method (and per pruning layer of a decoder-stage method); with
    ``input_panel`` first the image as the model saw it, titled with the question.

    ``skip_errors``: a method that raises ``ValueError`` / ``NotImplementedError`` while running (e.g. a budget
    its structure cannot reach on this model) gets a fully dimmed panel titled with the reason instead of
    stopping the whole grid. Unknown names and parameters always raise.
    """
    built = build_methods(methods, budget, params)  # bad names / parameters fail before any model run
    inputs = model_inputs(loaded, image, question) if loaded is not None else None
    shown = model_view(loaded, image, inputs)
    panels: list[tuple[str, Image.Image | None]] = []
    for method in built:
        try:
            stages = method_stages(loaded, method, image, question, grid, inputs)
        except (ValueError, NotImplementedError) as exc:
            if not skip_errors:
                raise
            reason = str(exc) if len(str(exc)) <= 90 else str(exc)[:87] + "..."
            panels.append((f"{method.name}  budget {method.budget}\nnot drawn: {reason}", None))
            continue
        num_views = max(v for _, _, v in stages) + 1
        for stage, tokens, v in stages:
            g, _, anchor, _ = patch_states(tokens)
            kept = int(tokens.counts[0]) if isinstance(tokens, VisualTokens) else int(anchor.sum())
            label = method.name + (" [untrained]" if getattr(method, "untrained", False) else "")
            title = panel_title(label + (f" ({stage})" if stage else ""), method.budget, kept, g[0] * g[1])
            view_image = shown if v == 0 else model_view(loaded, image, inputs, v, num_views)
            panels.append((title, token_map(view_image, tokens, cell=cell)))
    drawn = [im for _, im in panels if im is not None]
    size = drawn[0].size if drawn else (TARGET_SIDE, TARGET_SIDE)
    exact = size[0] % shown.width == 0 and size[1] % shown.height == 0
    plain = shown.resize(size, Image.Resampling.NEAREST if exact else Image.Resampling.BICUBIC)
    dimmed = Image.fromarray(np.rint(np.asarray(plain, dtype=np.float32) * DIM_FACTOR).astype(np.uint8), "RGB")
    out = [(t, im if im is not None else dimmed) for t, im in panels]
    if input_panel:
        out.insert(0, (f"input\n{question}" if loaded is not None else "input", plain))
    return out


def gallery(
    model,
    tokenizer,
    image: Any,
    methods: Sequence[Any],
    budget: int | float,
    *,
    question: str = DEFAULT_QUESTION,
    cols: int | None = None,
    cell: int | None = None,
    params: dict[str, Any] | None = None,
    skip_errors: bool = False,
) -> Image.Image:
    """Every method in ``methods`` at one ``budget`` on one image, as a titled grid of token maps.

    ``model, tokenizer``: a loaded VLM and its tokenizer (testbed-style) or processor; ``model=None`` runs the
    methods on pixel features (those needing a model signal raise ``ValueError``). ``image``: see
    :func:`to_pil`. Each panel is titled with the method, the budget and the tokens kept; a decoder-stage
    method gives one panel per pruning layer. ``params``: hyper-parameters, ``{"key": v}`` for every method
    with that field or ``{"method.key": v}`` for one. ``skip_errors``: a method that cannot run here gets a
    dimmed panel titled with the reason instead of raising (see :func:`method_panels`).
    """
    pil = to_pil(image)
    panels = method_panels(_as_loaded(model, tokenizer), pil, methods, budget, question, params=params, cell=cell,
                           skip_errors=skip_errors)
    return panel_grid(panels, cols if cols is not None else min(len(panels), 4))


# ----------------------------------------------------------------------------------------------- clips


@torch.no_grad()
def clip_tokens(
    loaded: LoadedModel | None,
    images: Sequence[Image.Image],
    question: str = DEFAULT_QUESTION,
    grid: tuple[int, int] = (12, 12),
) -> VisualTokens:
    """The clip ``VisualTokens`` (one row, ``frames = len(images)``) of ``images`` as frames of one video.

    Each frame is encoded exactly as the model encodes an image (its inputs by :func:`model_inputs`, the
    model's own ``get_image_features``: vision tower and projector) and its patch features (a [CLS] feature
    left out) are the frame's grid; ``loaded=None``: the raw pixel patches on ``grid`` (:func:`pixel_tokens`).
    Models whose image is several views (anyres grids, tiles) or has row separators are refused
    (``ValueError``): a frame must be one grid.
    """
    if not images:
        raise ValueError("a clip needs at least one frame image")
    per_frame, fgrid = [], None
    for image in images:
        if loaded is None:
            tokens = pixel_tokens(image, grid)
            feats, g = tokens.x[0], tokens.grid
        else:
            feats, layout = _first_image_features(loaded.model, model_inputs(loaded, image, question))
            if len(layout.grids) != 1 or bool(layout.sep.any()):
                raise ValueError(f"{type(loaded.model).__name__} encodes an image as {len(layout.grids)} view(s) "
                                 "with separators; --clip draws models whose image is one grid of patches")
            g = layout.grids[0]
            patch = layout.patch.to(feats.device)
            keep = patch >= 0
            order = patch[keep].argsort()
            feats = feats[keep][order]
            if feats.shape[0] != g[0] * g[1]:
                raise ValueError(f"the image features have {feats.shape[0]} patches, not the {g[0] * g[1]} of "
                                 f"their grid {g}")
        if fgrid is not None and g != fgrid:
            raise ValueError(f"the frames have different grids ({fgrid} and {g}); a clip is one grid per frame")
        fgrid = g
        per_frame.append(feats.float().cpu())
    x = torch.cat(per_frame)[None]
    return VisualTokens.from_features(x, grid=fgrid, frames=len(images))


def _run_on_clip(method, clip: VisualTokens, no_model: bool) -> VisualTokens:
    if method.stage == Stage.DECODER:
        raise ValueError(f"method {method.name!r} prunes inside the LLM (decoder stage); a clip strip draws "
                         "projector-, encoder-stage and temporal methods")
    if no_model:
        _no_model_check(method)
    if method.needs:
        raise ValueError(f"method {method.name!r} reads the {', '.join(repr(n) for n in method.needs)} signal; "
                         "a clip strip runs the method on the clip's features alone (no tower pass), so it draws "
                         "methods that read the features alone")
    out = method(clip)
    if not isinstance(out, VisualTokens) or out.frames != clip.frames:
        raise ValueError(f"method {method.name!r} did not return clip tokens of {clip.frames} frames")
    return out


def clip_strips(
    loaded: LoadedModel | None,
    images: Sequence[Image.Image],
    methods: Sequence[Any],
    budget: int | float | None,
    question: str = DEFAULT_QUESTION,
    grid: tuple[int, int] = (12, 12),
    params: dict | None = None,
    cell: int | None = None,
    cols: int | None = None,
    input_strip: bool = False,
    skip_errors: bool = False,
) -> list[Image.Image]:
    """One :func:`~vtcompress.viz.render.clip_strip` per method on the clip of ``images`` (frames encoded by
    :func:`clip_tokens`); a spatial method acts frame by frame, a temporal one across the frames. Each strip is
    titled ``"<method>  budget <b>: k / N0 tokens kept (T frames)"``. ``input_strip``: first the plain frames.
    ``skip_errors``: a method that raises ``ValueError`` / ``NotImplementedError`` gets a strip of dimmed frames
    titled with the reason (unknown names and parameters always raise)."""
    built = build_methods(methods, budget, params)
    clip = clip_tokens(loaded, images, question, grid)
    frames = [image.resize((loaded.image_size,) * 2, Image.Resampling.BICUBIC)
              if loaded is not None and loaded.image_size and image.size != (loaded.image_size,) * 2 else image
              for image in images]
    t = clip.frames
    strips = []
    if input_strip:
        strips.append(clip_strip(frames, clip, cell=cell, cols=cols, legend=False,
                                 title=f"input: {t} frames, {clip.num_patches} patches"))
    for method in built:
        label = method.name + (" [untrained]" if getattr(method, "untrained", False) else "")
        try:
            out = _run_on_clip(method, clip, loaded is None)
        except (ValueError, NotImplementedError) as exc:
            if not skip_errors:
                raise
            reason = str(exc) if len(str(exc)) <= 120 else str(exc)[:117] + "..."
            none = clip.select(torch.zeros(1, 0, dtype=torch.long))
            strips.append(clip_strip(frames, none, cell=cell, cols=cols, legend=False,
                                     title=f"{label}  budget {method.budget}: not drawn: {reason}"))
            continue
        title = (f"{label}  budget {method.budget}: {int(out.counts[0])} / {out.num_patches} tokens kept "
                 f"({t} frames)")
        strips.append(clip_strip(frames, out, cell=cell, cols=cols, title=title))
    return strips
