"""What the last call under :func:`vtcompress.apply` saved: tokens per stage and the analytic prefill FLOPs.

``handle.summary()`` (:meth:`ApplyHandle.summary`) returns a :class:`Savings` for the latest
``model(**inputs)`` / ``model.generate(**inputs)`` under the handle (the prefill: decode steps add no visual
token), with a readable ``str``::

    with vtcompress.apply(model, [get("visionzip", budget=64), get("fastv", budget=0.5, layer=2)]) as handle:
        model.generate(**inputs, max_new_tokens=20)
    print(handle.summary())
    # on LLaVA-1.5-7B, one image and a prompt of 20 text tokens:
    # vtcompress savings of the last call: 1 sample, 1 image; visionzip(budget=64) + fastv(budget=0.5)
    #   projector  visionzip (per image) 576 -> 64 image tokens  (11.1 % kept)
    #   decoder    layer 2, fastv (per sample) 64 -> 32 visual tokens  (50.0 % kept)
    #   prefill FLOPs (analytic) 1.11 T vs 8.31 T uncompressed: ratio 0.134

What is counted:

* the stage(s) before the LLM (encoder- and projector-stage methods; what :attr:`ApplyHandle.last`'s
  ``num_tokens`` holds): per image, the placeholder tokens of the uncompressed prompt and those left (an
  anyres image counts its ``image_newline`` tokens, as its placeholder run does);
* every decoder stage (layer ``K``): per sample, the visual tokens entering the stage and those kept from layer
  ``K`` on (with beams / ``num_return_sequences``, the first copy of each sample: the copies are identical);
* FLOPs: :func:`vtcompress.bench.flops.sequence_prefill_flops` per sample (without padding), summed over the
  samples, for what ran and for the uncompressed model on the same prompts: the vision tower on every image
  (fewer tokens in its layers under encoder-stage merging), the projector, every decoder layer on the text plus
  the visual tokens it kept, one query row of selection per decoder stage (FastV / PyramidDrop's last token; as
  ``vtcompress bench`` counts it), the ``lm_head`` on the last position (generation's prefill). The analytic
  model covers LLaVA-style configs (``model_type`` ``"llava"``: LLaVA-1.5 and the embedded testbed); for the
  other families :attr:`Savings.flops` is ``None`` and :attr:`Savings.note` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StageSavings", "Savings", "DecoderRecord", "decoder_record", "summarize"]


@dataclass(frozen=True)
class StageSavings:
    """Tokens one stage of the last call took in and kept.

    Attributes:
        stage: ``"projector"``, ``"encoder"``, ``"encoder+projector"`` (the stages before the LLM, counted
            together on each image's placeholder run) or ``"decoder"``.
        methods: names of the stage's methods, in the order they ran.
        per: ``"image"`` / ``"video"`` (placeholder order) or ``"sample"`` (batch order): what one entry of
            ``tokens_in`` / ``tokens_out`` counts.
        tokens_in: tokens entering the stage, one int per image / sample.
        tokens_out: tokens it kept (decoder: present from ``layer`` on).
        layer: the decoder layer ``K`` of a decoder stage (``None`` before the LLM).
    """

    stage: str
    methods: tuple[str, ...]
    per: str
    tokens_in: tuple[int, ...]
    tokens_out: tuple[int, ...]
    layer: int | None = None

    @property
    def total_in(self) -> int:
        return sum(self.tokens_in)

    @property
    def total_out(self) -> int:
        return sum(self.tokens_out)

    @property
    def kept_fraction(self) -> float:
        """``total_out / total_in`` (1.0 when the stage saw no token)."""
        return self.total_out / self.total_in if self.total_in else 1.0

    def __str__(self) -> str:
        where = f"layer {self.layer}, {'+'.join(self.methods)}" if self.layer is not None else "+".join(self.methods)
        what = "visual tokens" if self.stage == "decoder" else f"{'video' if self.per == 'video' else 'image'} tokens"
        pairs = [f"{a} -> {b}" for a, b in zip(self.tokens_in, self.tokens_out, strict=True)]
        shown = ", ".join(pairs[:6]) + (f", ... ({len(pairs)} {self.per}s)" if len(pairs) > 6 else "")
        total = f"; total {self.total_in} -> {self.total_out}" if len(pairs) > 1 else ""
        return (f"{self.stage:<10} {where} (per {self.per}) {shown} {what}{total}  "
                f"({100 * self.kept_fraction:.1f} % kept)")


@dataclass(frozen=True)
class Savings:
    """What the last call under an apply handle saved (see the module docstring for what is counted).

    Attributes:
        methods: the applied methods, as ``name(budget=...)``, in the order they run.
        samples: sequences of the call (before ``generate``'s expansion for beams / several returns).
        image_sample: the sample of each image (placeholder order); empty without a stage before the LLM.
        text_tokens: per sample, the tokens into the LLM that are not visual tokens (padding excluded).
        visual_full: per sample, the visual tokens of the uncompressed prompt.
        visual_kept: per sample, the visual tokens the LLM's last layer still sees.
        stages: one :class:`StageSavings` per stage that ran, in order.
        flops: analytic prefill FLOPs of what ran (sum over samples), ``None`` where not modelled.
        flops_full: the same for the uncompressed model on the same prompts.
        note: why ``flops`` is ``None`` (empty otherwise).
        sample_flops: per sample, the analytic prefill FLOPs of what ran (``flops`` is their sum; empty where
            ``flops`` is ``None``).
        sample_flops_full: per sample, the same for the uncompressed model.
    """

    methods: tuple[str, ...]
    samples: int
    image_sample: tuple[int, ...]
    text_tokens: tuple[int, ...]
    visual_full: tuple[int, ...]
    visual_kept: tuple[int, ...]
    stages: tuple[StageSavings, ...]
    flops: int | None = None
    flops_full: int | None = None
    note: str = ""
    sample_flops: tuple[int, ...] = ()
    sample_flops_full: tuple[int, ...] = ()

    @property
    def flops_ratio(self) -> float | None:
        """``flops / flops_full``: the prefill compute relative to the uncompressed model."""
        if self.flops is None or not self.flops_full:
            return None
        return self.flops / self.flops_full

    @property
    def tokens_kept_fraction(self) -> float:
        """Visual tokens the LLM's last layer sees, over those of the uncompressed prompt (all samples)."""
        full = sum(self.visual_full)
        return sum(self.visual_kept) / full if full else 1.0

    def __str__(self) -> str:
        n_img = len(self.image_sample)
        head = (f"vtcompress savings of the last call: {self.samples} sample{'s' * (self.samples != 1)}"
                + (f", {n_img} image{'s' * (n_img != 1)}" if n_img else "") + "; " + " + ".join(self.methods))
        lines = [head] + [f"  {s}" for s in self.stages]
        if not self.stages:
            lines.append("  no visual token was compressed (no call with images yet?)")
        if self.flops is not None:
            lines.append(f"  prefill FLOPs (analytic) {_si(self.flops)} vs {_si(self.flops_full)} uncompressed: "
                         f"ratio {self.flops_ratio:.3f}")
        elif self.note:
            lines.append(f"  prefill FLOPs: not computed: {self.note}")
        return "\n".join(lines)


def _si(x: int) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return str(x)


def _method_label(m) -> str:
    budget = getattr(m, "budget", None)
    return f"{m.name}(budget={budget})" if budget is not None else str(m.name)


# ============================================================================== gathering
@dataclass
class DecoderRecord:
    """Plain counts of the decoder stage's last prefill, kept by the apply handle when it is removed (so that
    ``handle.summary()`` also works after the ``with`` block).

    Attributes:
        ids: ``[R, L0]`` the prefill's ``input_ids`` (``R`` rows: with beams, every copy).
        placeholders: ``[R, L0]`` bool, image / video placeholders (padding excluded).
        visual: ``[R, L0]`` bool, the prunable visual tokens among them (anyres ``image_newline`` excluded).
        real: ``[R, L0]`` bool, not padding.
        stages: ``(layer K, method name, visual tokens kept per row)`` of each stage that ran.
    """

    ids: Tensor
    placeholders: Tensor
    visual: Tensor
    real: Tensor
    stages: list[tuple[int, str, list[int]]]


def decoder_record(dec, strict: bool = False) -> DecoderRecord | None:
    """The :class:`DecoderRecord` of a :class:`~vtcompress.models.decoder.DecoderHandle`'s last prefill.

    ``ApplyHandle.remove`` calls it with ``strict=False``: a state it cannot read then gives ``None`` (the summary
    after the block has no decoder stage) rather than a restoration that fails half-way; :func:`summarize` on a
    live handle is strict (the error propagates).
    """
    try:
        run = getattr(dec, "run", None) if dec is not None else None
        if run is None or not run.decisions:
            return None
        real = run.pad_ok[:, : run.length].bool()
        ph = getattr(run, "ph", None)
        ph = (run.vis if ph is None else ph) & real
        stages = [(int(st.layer), str(st.method.name), [int(k.numel()) for k in dec.kept_visual(i)])
                  for i, st in enumerate(dec.stages) if i in run.decisions]
        return DecoderRecord(ids=run.ids, placeholders=ph, visual=run.vis & real, real=real, stages=stages)
    except Exception:
        if strict:
            raise
        return None


def summarize(handle) -> Savings:
    """The :class:`Savings` of the last call under ``handle`` (an :class:`~vtcompress.models.apply.ApplyHandle`)."""
    model = handle.model
    methods = list(handle.methods)
    labels = tuple(_method_label(m) for m in methods)
    before = [m for m in methods if m.stage in ("encoder", "projector")]
    rec = decoder_record(getattr(handle, "_decoder", None), strict=True) or getattr(handle, "_decoder_record", None)
    last = handle.last if before else None
    if last is not None and last.num_tokens is None:
        last = None
    ids = mask = None
    if last is not None:
        ids, mask = last.inputs["input_ids"], last.inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
    expand = 1
    if rec is not None and last is not None:
        # the decoder stage saw the projector's shortened ids (repeated per beam / returned sequence); anything
        # else means the projector record is from an earlier call (the last one had no image)
        b = ids.shape[0]
        expand = rec.ids.shape[0] // b if b and rec.ids.shape[0] % b == 0 else 0
        same = expand > 0 and tuple(rec.ids.shape) == (b * expand, ids.shape[1]) and torch.equal(
            rec.ids.cpu(), ids.repeat_interleave(expand, dim=0).cpu())
        if not same:
            last, expand = None, 1
    if last is None and rec is None:
        return Savings(methods=labels, samples=0, image_sample=(), text_tokens=(), visual_full=(), visual_kept=(),
                       stages=(), note="no call with visual tokens has run under this handle yet")
    stages: list[StageSavings] = []

    # --- before the LLM: per image
    if last is not None:
        visual_ids = [handle.adapter.image_token_id(model)]
        counts = last.num_tokens.tolist() if last.num_tokens is not None else []
        video_counts = last.video_num_tokens.tolist() if last.video_num_tokens is not None else []
        kinds = sorted({m.stage for m in before}, key=("encoder", "projector").index)
        names = tuple(m.name for m in before)
        if counts:
            stages.append(StageSavings(stage="+".join(kinds), methods=names, per="image",
                                       tokens_in=tuple(c[0] for c in counts), tokens_out=tuple(c[1] for c in counts)))
        if video_counts:  # videos compressed at the projector stage count as visual tokens too
            visual_ids.append(handle.adapter.token_id(model, "video"))
            stages.append(StageSavings(stage="projector", methods=tuple(m.name for m in before
                                                                        if m.stage == "projector"), per="video",
                                       tokens_in=tuple(c[0] for c in video_counts),
                                       tokens_out=tuple(c[1] for c in video_counts)))
        image_sample = tuple(int(s) for s in last.image_sample.tolist()) if last.image_sample is not None else ()
        video_sample = tuple(int(s) for s in last.video_sample.tolist()) if last.video_sample is not None else ()
        samples = int(ids.shape[0])
        is_ph = torch.isin(ids, torch.tensor(visual_ids, device=ids.device)) & mask.bool()
        into_llm = is_ph.sum(1).tolist()
        text = (mask.bool().sum(1) - is_ph.sum(1)).tolist()
        full = list(into_llm)  # a sample without an image: what entered the LLM is what its prompt had
        for s in sorted(set(image_sample) | set(video_sample)):
            full[s] = 0
        for (n0, _), s in zip(counts + video_counts, image_sample + video_sample, strict=True):
            full[s] += n0
    else:
        image_sample = ()
        samples = int(rec.ids.shape[0])
        into_llm = rec.placeholders.sum(1).tolist()
        text = (rec.real.sum(1) - rec.placeholders.sum(1)).tolist()
        full = list(into_llm)

    # --- decoder stages: per sample (the first copy of each sample expanded for beams / several returns)
    at_layer = [list(into_llm)]  # visual tokens per sample the LLM sees from each decoder stage on
    layers_k: list[int] = []
    if rec is not None:
        prunable = rec.visual.sum(1).tolist()[::expand]
        fixed = [a - p for a, p in zip(into_llm, prunable, strict=True)]  # never pruned (anyres newlines)
        prev = list(prunable)
        for layer, name, kept in rec.stages:
            out = kept[::expand]
            stages.append(StageSavings(stage="decoder", methods=(name,), per="sample", tokens_in=tuple(prev),
                                       tokens_out=tuple(out), layer=layer))
            at_layer.append([f + k for f, k in zip(fixed, out, strict=True)])
            layers_k.append(layer)
            prev = out

    per_sample, per_sample_full, note = _flops(handle, samples, text, full, at_layer, layers_k)
    flops = sum(per_sample) if per_sample is not None else None
    flops_full = sum(per_sample_full) if per_sample_full is not None else None
    return Savings(methods=labels, samples=samples, image_sample=image_sample, text_tokens=tuple(int(t) for t in text),
                   visual_full=tuple(int(f) for f in full), visual_kept=tuple(int(v) for v in at_layer[-1]),
                   stages=tuple(stages), flops=flops, flops_full=flops_full, note=note,
                   sample_flops=tuple(per_sample or ()), sample_flops_full=tuple(per_sample_full or ()))


def _flops(handle, samples, text, full, visual_at, layers_k):
    """Analytic prefill FLOPs of what ran and of the uncompressed model, one entry per sample."""
    from ..bench.flops import VLMArch, sequence_prefill_flops

    try:
        arch = VLMArch.from_config(handle.model.config)
    except ValueError as e:
        return None, None, str(e)
    per_image = arch.image_tokens
    if any(f % per_image for f in full):
        return None, None, (f"a sample's {full} visual tokens are not a multiple of the {per_image} tokens of one "
                            "image (video or hand-built prompts are not modelled)")
    vision_tokens, note = _encoder_vision_tokens(handle, arch)
    if note:
        return None, None, note
    n_layers = arch.text.layers
    total, total_full = [], []
    for s in range(samples):
        images = full[s] // per_image
        visual = [visual_at[0][s]] * n_layers
        for k, kept in zip(layers_k, visual_at[1:], strict=True):
            visual[k:] = [kept[s]] * (n_layers - k)
        total.append(sequence_prefill_flops(arch, int(text[s]), visual, images=images, stages=layers_k,
                                            selection_rows=1,
                                            vision_tokens=vision_tokens if images else None).total)
        total_full.append(sequence_prefill_flops(arch, int(text[s]), [full[s]] * n_layers, images=images).total)
    return total, total_full, ""


def _encoder_vision_tokens(handle, arch) -> tuple[list[int] | None, str]:
    """Patch tokens entering each vision layer under the encoder-stage method (``None``: every patch)."""
    enc = [m for m in handle.methods if m.stage == "encoder"]
    if not enc:
        return None, ""
    from .encoder import resolve_encoder_spec

    spec = resolve_encoder_spec(handle.model, handle.adapter)
    n0 = arch.vision.patches
    sched = list(enc[0].schedule(n0, spec.merge_layers))
    if len(sched) > arch.vision.layers:
        return None, f"the encoder-stage schedule has {len(sched)} layers, the tower {arch.vision.layers}"
    out, n = [], n0
    for i in range(arch.vision.layers):  # merged after layer i: the input of layer i + 1 is shorter
        out.append(n)
        n -= sched[i] if i < len(sched) else 0
    return out, ""
