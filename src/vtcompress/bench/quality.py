"""Quality side of the benchmark: accuracy on the testbed, and what the model really computed.

:class:`TokenProbe` watches a stock VLM through forward (pre-)hooks on its own modules — the multimodal
base model, the vision tower's layers and the LLM's decoder layers, where its family's description says —
and records, per
forward call, how many tokens each part really processed. It is registered AFTER ``vtcompress.apply`` has
installed its hooks, so it sees the shortened inputs; it changes nothing (every hook returns ``None``).
From one record:

* image tokens into the LLM per sequence: placeholders (``image_token_id``) left in the ``input_ids`` the
  base model receives; text tokens: the rest of the attention mask;
* the sequence length entering every decoder layer (padded batch length): a decoder-stage method that
  drops ``d`` image tokens per sequence at layer ``K`` shortens layers ``>= K`` by ``d``, so the image
  tokens kept from ``K`` on are ``image_tokens - (length[0] - length[K])``;
* the patch tokens entering every vision layer (prefix tokens such as [CLS] excluded): encoder-stage
  merging (ToMe inside the tower) shows up here.

:func:`evaluate_method` runs the testbed's own :func:`~vtcompress.testbed.evaluate` with a method applied
and the probe on, and returns accuracy (overall and per skill), the predictions, the token counts, and the
analytic prefill FLOPs (:func:`~vtcompress.bench.flops.prefill_flops`) of exactly the computation measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CallRecord", "TokenProbe", "evaluate_method", "schedule_of", "flops_of_record", "kv_of_record"]


@dataclass
class CallRecord:
    """Token counts of one forward call (batch ``B``)."""

    text: list[int]  # [B] non-image tokens of each sequence (attention mask minus placeholders)
    image: list[int]  # [B] image tokens into the LLM of each sequence
    images: list[int]  # [B] images in each sequence (0 if unknown)
    llm_lengths: list[int] = field(default_factory=list)  # padded length entering each decoder layer
    vision_lengths: list[int] = field(default_factory=list)  # patch tokens entering each vision layer


def _hidden(args, kwargs) -> Tensor | None:
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, Tensor) else None


class TokenProbe:
    """Record the tokens each part of a stock LLaVA-style VLM processes (see the module docstring).

    Use as a context manager around forward calls; :attr:`records` holds one :class:`CallRecord` per call
    of the base model that carried ``input_ids``.
    """

    def __init__(self, model: nn.Module):
        from ..models.registry import adapter_for

        self.model = model
        try:  # where things are: the family's description
            desc = adapter_for(model)
        except ValueError as e:
            raise ValueError(f"TokenProbe needs a stock VLM of a supported family; {e}") from e
        self.base = desc.base(model)
        self.llm_layers = desc.llm_layers(model)
        self.vision_layers = desc.vision_layers(model)
        self.prefix = desc.num_prefix_tokens(model)
        self.image_id = desc.token_id(model, "image")
        self.records: list[CallRecord] = []
        self._handles: list = []
        self._vision: list[int] = []
        self._llm: list[int] = []
        self._pending: CallRecord | None = None

    # ----------------------------------------------------------------------------------------- hooks
    def _base_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor) or self.image_id is None:
            self._pending = None
            return None
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        img = (ids == self.image_id) & (mask > 0)
        image = img.sum(1)
        text = (mask > 0).sum(1) - image
        # images per sequence: runs of placeholders (a run starts where the previous token is not one)
        starts = img & ~torch.cat([torch.zeros_like(img[:, :1]), img[:, :-1]], dim=1)
        self._pending = CallRecord(text=text.tolist(), image=image.tolist(), images=starts.sum(1).tolist())
        self._llm = []
        return None

    def _base_post(self, module, args, kwargs, output):
        if self._pending is not None:
            rec = self._pending
            rec.llm_lengths = self._llm[-len(self.llm_layers):]
            n = len(self.vision_layers)
            rec.vision_lengths = self._vision[-n:] if n and len(self._vision) >= n else []
            self.records.append(rec)
        self._pending = None
        self._vision, self._llm = [], []
        return None

    def _llm_pre(self, module, args, kwargs):
        h = _hidden(args, kwargs)
        if h is not None:
            self._llm.append(int(h.shape[1]))

    def _vision_pre(self, module, args, kwargs):
        h = _hidden(args, kwargs)
        if h is not None and h.dim() == 3:  # [B, T, D]; Qwen2-VL's blocks take one packed [T, D] sequence
            self._vision.append(int(h.shape[1]) - self.prefix)

    def __enter__(self) -> TokenProbe:
        self._handles.append(self.base.register_forward_pre_hook(self._base_pre, with_kwargs=True))
        self._handles.append(self.base.register_forward_hook(self._base_post, with_kwargs=True))
        for layer in self.llm_layers:
            self._handles.append(layer.register_forward_pre_hook(self._llm_pre, with_kwargs=True))
        for layer in self.vision_layers:
            self._handles.append(layer.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------------------- FLOPs of a record


def schedule_of(record: CallRecord, row: int) -> list[tuple[int, int]]:
    """Decoder-stage schedule ``[(K, image tokens kept per image), ...]`` of sequence ``row`` of a record."""
    lengths = record.llm_lengths
    if not lengths:
        return []
    image, images = record.image[row], max(record.images[row], 1)
    out = []
    for k in range(1, len(lengths)):
        if lengths[k] < lengths[k - 1]:
            kept = max(image - (lengths[0] - lengths[k]), 0)
            out.append((k, kept // images))
    return out


def flops_of_record(arch, record: CallRecord, logits: str | int = "last", selection_rows: int = 1) -> list[int]:
    """Analytic prefill FLOPs of each sequence of a record (its own text and image counts, schedule, tower).

    Per sequence WITHOUT its padding (a per-sample cost, independent of how the batch was padded); a
    decoder-stage schedule counts ``selection_rows`` query rows of scoring per pruning layer (the last token of
    FastV / PyramidDrop; SparseVLM's several raters cost a little more than counted).
    """
    from .flops import prefill_flops

    full_vision = arch.vision.patches
    vis = record.vision_lengths if len(record.vision_lengths) == arch.vision.layers else None
    if vis is not None and any(not 1 <= n <= full_vision for n in vis):
        vis = None
    out = []
    for b in range(len(record.text)):
        images = max(record.images[b], 1)
        per_image = min(record.image[b] // images, arch.image_tokens)
        out.append(prefill_flops(arch, text_tokens=record.text[b], image_tokens=per_image, images=images,
                                 schedule=schedule_of(record, b), vision_tokens=vis, logits=logits,
                                 selection_rows=selection_rows).total)
    return out


def kv_of_record(arch, record: CallRecord, bytes_per_value: int = 2) -> list[int]:
    """KV-cache bytes each sequence of a record leaves after prefill (unpadded, its own schedule)."""
    from .flops import kv_cache_bytes

    out = []
    for b in range(len(record.text)):
        images = max(record.images[b], 1)
        per_image = min(record.image[b] // images, arch.image_tokens)
        out.append(kv_cache_bytes(arch, record.text[b], per_image, images, schedule_of(record, b),
                                  bytes_per_value=bytes_per_value))
    return out


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_method(model, tokenizer, method, samples, batch_size: int = 32, arch=None) -> dict:
    """Accuracy and measured token counts of ``method`` (``None``: the uncompressed model) on ``samples``.

    Returns a dict: ``accuracy``, ``per_skill``, ``predictions``, ``correct`` (from the testbed's evaluate),
    ``tokens_in`` (mean image tokens per image into the LLM), ``tokens_after`` (mean image tokens per image
    after the last decoder-stage pruning layer; equal to ``tokens_in`` without one), ``tokens_avg`` (mean image
    tokens per image over the decoder layers: what decoder-stage methods are compared by), ``prune_layers`` (the
    decoder layers where tokens were dropped), ``vision_tokens`` (mean patch tokens per vision layer), and
    ``flops`` (mean analytic prefill FLOPs per sample) and ``kv_bytes`` (mean KV-cache bytes per sample after
    prefill, at 2 bytes per value: bf16 / fp16), both ``None`` if ``arch`` is ``None``.
    """
    from ..models.apply import apply
    from ..testbed import evaluate

    with torch.no_grad():
        if method is None:
            with TokenProbe(model) as probe:
                res = evaluate(model, tokenizer, samples, batch_size=batch_size)
        else:
            with apply(model, method), TokenProbe(model) as probe:
                res = evaluate(model, tokenizer, samples, batch_size=batch_size)
    recs = probe.records
    if not recs:
        raise RuntimeError("the probe saw no forward call of the base model: is this a stock LLaVA-style VLM?")
    images = np.array([max(i, 1) for r in recs for i in r.images], dtype=np.float64)
    tokens_in = np.array([i for r in recs for i in r.image], dtype=np.float64) / images
    after, avg, layers = [], [], set()
    for r in recs:
        n_layers = max(len(r.llm_lengths), 1)
        for b in range(len(r.image)):
            sched = schedule_of(r, b)
            layers.update(k for k, _ in sched)
            per_image = r.image[b] / max(r.images[b], 1)
            after.append(sched[-1][1] if sched else per_image)
            # image tokens per image in each decoder layer, averaged over the layers (LLM work per layer)
            per_layer = [per_image] * n_layers
            for k, kept in sched:
                per_layer[k:] = [kept] * (n_layers - k)
            avg.append(float(np.mean(per_layer)))
    vis = [r.vision_lengths for r in recs if r.vision_lengths]
    flops = kv = None
    if arch is not None:
        flops = float(np.mean([f for r in recs for f in flops_of_record(arch, r)]))
        kv = float(np.mean([f for r in recs for f in kv_of_record(arch, r)]))
    return {
        **res,
        "tokens_in": float(tokens_in.mean()),
        "tokens_after": float(np.mean(after)),
        "tokens_avg": float(np.mean(avg)),
        "prune_layers": sorted(layers),
        "vision_tokens": np.mean(np.array(vis, dtype=np.float64), axis=0).tolist() if vis else [],
        "flops": flops,
        "kv_bytes": kv,
    }
