"""Sequence surgery: the placeholder runs of a batch and the inputs shortened to the kept tokens.

What the projector stage does to the token sequence, for every family (the description says which ids are
placeholders, which inputs belong to the encoders and how positions are built):

* :func:`placeholder_slots`: the flat position of every image placeholder (row-major, the order the stock
  ``masked_scatter`` fills them) and the sample of each image;
* :func:`shorten`: drop the columns that were not kept from every sequence input (``input_ids``,
  ``attention_mask``, ``mm_token_type_ids``, ``token_type_ids``, ``labels``) and re-pad the rows on the batch's
  padding side; the returned ``move`` applies the same to any ``[..., B, S]`` tensor (position ids);
* :func:`full_positions`: the position ids of the FULL sequence as the stock model would build them (M-RoPE:
  the model's own ``get_rope_index``), and :func:`shortened_inputs`: the kept columns of them;
* :func:`continue_inputs` / :func:`continue_positions`: the next chat turn mapped onto a KV cache that holds
  the shortened prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .context import cache_in
from .description import ModelDescription, PositionScheme

__all__ = [
    "SEQUENCE_KEYS",
    "placeholder_runs",
    "runs_to_images",
    "placeholder_slots",
    "shorten",
    "shortened_inputs",
    "pad_id",
    "full_positions",
    "continue_inputs",
    "continue_positions",
]

#: the per-token inputs ``[B, S]`` that are shortened with ``input_ids``
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")


def placeholder_runs(ids: Tensor, token_id: int) -> tuple[Tensor, Tensor]:
    """The contiguous runs of ``token_id`` in ``ids [B, S]``, row-major: ``(starts, ends)``, each ``[R, 2]`` long
    ``(row, column)`` (``ends`` exclusive). Every stock family separates two images by at least one token."""
    is_ph = (ids == token_id).long()
    edge = torch.diff(torch.nn.functional.pad(is_ph, (1, 1)), dim=1)
    return (edge == 1).nonzero(), (edge == -1).nonzero()


def runs_to_images(ids: Tensor, placeholders: Tensor, starts: Tensor, closes: Tensor) -> Tensor:
    """Image index within its row (``[B, S]`` long, ``-1`` off ``placeholders``) of every placeholder, when an image
    is several runs: ``starts [R, 2]`` the runs (row-major), ``closes [R]`` bool the run that ends each image."""
    flag = torch.zeros_like(ids)
    flag[starts[:, 0], starts[:, 1]] = 1
    run_of = (flag.flatten().cumsum(0) - 1).view_as(ids)  # runs are row-major, as the flattened sequence
    rows = starts[:, 0]
    closed = torch.cumsum(closes.long(), 0) - closes.long()  # images closed before each run, whole batch
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    base = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    base[rows[first]] = closed[first]
    run_img = closed - base[rows]  # counted from the row's first image
    return torch.where(placeholders, run_img[run_of.clamp(min=0)], torch.full_like(ids, -1))


def placeholder_slots(ids: Tensor, image_id: int, lengths: list[int]) -> tuple[Tensor, Tensor]:
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


def shorten(inputs: dict, keep: Tensor, pad_id: int, left: bool):
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
    for key in SEQUENCE_KEYS:
        t = inputs.get(key)
        if isinstance(t, Tensor) and t.dim() == 2 and tuple(t.shape) == (b, s):
            fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
            out[key] = move(t, fill)
    return out, move


def shortened_inputs(model: nn.Module, desc: ModelDescription, inputs: dict, ids: Tensor, mask: Tensor, keep: Tensor,
                     positions: str, for_generate: bool) -> dict:
    """Inputs with the dropped placeholders removed (re-padded on the batch's padding side) and the kept
    tokens' original positions."""
    left = not bool((mask[:, -1] == 0).any())
    call_inputs = dict(inputs)
    call_inputs["attention_mask"] = mask
    new_inputs, move = shorten(call_inputs, keep, pad_id(model, ids, mask, desc.image_token_id(model)), left)
    pos = full_positions(model, desc, inputs, ids, mask, positions, for_generate)
    if pos is None:
        new_inputs.pop("position_ids", None)
        return new_inputs
    new_pos = move(pos, 0)
    if desc.position_scheme == PositionScheme.MROPE and for_generate:
        # row 0: the compact text position generate() prepends; a non-compact row 0 would switch on
        # packed-sequence masking
        m = new_inputs["attention_mask"].long()
        new_pos = torch.cat([((m.cumsum(-1) - 1).masked_fill(m == 0, 0))[None], new_pos], dim=0)
    new_inputs["position_ids"] = new_pos
    return new_inputs


def pad_id(model: nn.Module, ids: Tensor, mask: Tensor, image_id: int) -> int:
    """The id to pad shortened rows with: the batch's own padding, else the LLM's ``pad_token_id`` (0 if none)."""
    pads = ids[mask == 0]
    if pads.numel():
        return int(pads[0])
    cfg = getattr(model.config, "text_config", model.config)
    pid = getattr(cfg, "pad_token_id", None)
    if pid is None:
        pid = getattr(model.config, "pad_token_id", None)
    return int(pid) if pid is not None and int(pid) != image_id else 0


def full_positions(model: nn.Module, desc: ModelDescription, inputs: dict, ids: Tensor, mask: Tensor, positions: str,
                   for_generate: bool) -> Tensor | None:
    """Position ids of the FULL sequence, as the stock model would build them (``None``: let it)."""
    given = inputs.get("position_ids")
    if desc.position_scheme == PositionScheme.MROPE:
        if given is not None:
            return given[-3:] if given.dim() == 3 else given[None].expand(3, -1, -1)
        tt = inputs.get("mm_token_type_ids")
        if tt is None:  # what the processor returns: 1 for image, 2 for video placeholders
            video = desc.token_id(model, "video")
            tt = (ids == desc.image_token_id(model)).to(torch.int) + 2 * (ids == video).to(torch.int)
        grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                 if inputs.get(k) is not None}  # second_per_grid_ts: Qwen2.5-VL's video time scale
        return desc.rope_index(model, ids, tt, attention_mask=mask, **grids)
    if given is not None:
        return given.expand(ids.shape[0], -1) if given.shape[0] == 1 else given
    if positions == "compact":
        return None
    m = mask.long()
    if for_generate:  # what generate() builds from the attention mask
        return (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
    past = cache_in(inputs)
    start = past.get_seq_length() if past is not None else 0
    return (torch.arange(ids.shape[1], device=ids.device) + start)[None].expand(ids.shape[0], -1)


def continue_inputs(rec, kwargs: dict, desc: ModelDescription) -> tuple[dict, int, str]:
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
    visual = desc.visual_token_ids(rec.model())
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
    for k in desc.input_keys():  # the encoders' inputs: the images are in the cache already
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
        call["position_ids"] = continue_positions(rec.pos.to(ids.device), prefix_mask, mask_suffix)
    return call, prefix, coords


def continue_positions(pos: Tensor, prefix_mask: Tensor, suffix_mask: Tensor) -> Tensor:
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


