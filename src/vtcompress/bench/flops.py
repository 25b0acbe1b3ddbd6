"""Analytic prefill FLOPs of a LLaVA-style VLM under a token-compression schedule.

What is counted, and how (the same convention as ``torch.utils.flop_counter.FlopCounterMode``, against which
``tests/test_flops.py`` checks these numbers on tiny stock models):

* every matrix product ``[m, k] @ [k, n]`` costs ``2 * m * n * k`` FLOPs; biases, norms, activations, softmax,
  rotary embeddings, residual adds and embedding lookups cost nothing (they are element-wise or gathers and
  are negligible next to the products);
* attention costs ``QK^T`` plus ``softmax(.) V`` over the FULL ``n x s`` score matrix of every query head
  (``4 * heads * n * s * head_dim``) — what eager attention computes and what FlopCounterMode counts for the
  CUDA SDPA kernels (it has no formula for the CPU flash kernel, so on CPU compare against eager attention);
  ``attention="causal"`` counts only the ``(query, key)`` pairs a causal mask leaves in the LLM
  (``n * s - n * (n - 1) / 2``: half the matrix plus the diagonal in a prefill), what a causal kernel that
  skips the masked blocks computes (FlashAttention, PyTorch's CPU flash kernel under ``is_causal=True``); the
  vision tower's attention is bidirectional and stays full. Grouped-query attention (fewer
  key/value heads) only shrinks the ``k``/``v`` projections: the scores still run per query head;
* the vision tower runs ALL its layers (the stock towers do, even when ``vision_feature_layer=-2`` reads an
  earlier one), on the patch tokens plus its prefix tokens ([CLS] for CLIP; none for SigLIP, whose attention
  pooling head is counted when ``vision_use_head`` is set); the patch embedding is a convolution
  (``2 * patches * hidden * channels * patch**2``);
* the projector (LLaVA's MLP: ``linear_1`` then ``linear_2``) runs on every token the tower hands over: the
  projector-stage methods compress AFTER it (they act on ``get_image_features``'s output), encoder-stage
  merging shortens its input;
* the LLM decoder: per layer the ``q``/``k``/``v``/``o`` projections, attention, and the gated MLP
  (``gate``, ``up``, ``down``); a decoder-stage schedule ``[(K, kept), ...]`` shortens the sequence seen by
  layers ``>= K`` to ``text + images * kept`` tokens; the selection itself is counted when
  ``selection_rows=r > 0``: the attention of ``r`` query rows (FastV / PyramidDrop: the last token) over the
  ``n`` tokens entering layer ``K-1``, recomputed from that layer's input as
  :mod:`vtcompress.models.decoder` does (``q`` projection of the rows, ``k`` projection of all ``n`` tokens,
  ``r x n`` scores per head) — about 1 % of a tiny model's prefill, far less for real ones;
* a method's own scoring and matching on the visual tokens (similarity matrices of ToMe / DivPrune / VisionZip
  merging, a few ``N x N x D`` products) is not counted: measured through ``vtcompress.apply`` it is below
  0.2 % of a tiny model's prefill (``tests/test_flops.py``);
* the ``lm_head`` runs on the last position (``logits="last"``, what generation's prefill needs), on every
  position (``"all"``, what a plain ``model(**inputs)`` call computes) or on ``logits=n`` positions
  (``logits_to_keep=n``).

Reference: the LLaVA-1.5 architecture (Liu et al., "Improved Baselines with Visual Instruction Tuning",
arXiv 2310.03744); FastV (Chen et al., arXiv 2403.06764) reports the same per-layer accounting for
decoder-stage pruning.

Example::

    arch = VLMArch.from_config(model.config)
    full = prefill_flops(arch, text_tokens=40)                          # 144 image tokens, all layers
    pruned = prefill_flops(arch, text_tokens=40, image_tokens=36)       # a projector-stage method keeping 36
    fastv = prefill_flops(arch, text_tokens=40, schedule=[(2, 36)], selection_rows=1)  # 36 from layer 2 on
    fastv.total / full.total
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "VisionArch",
    "TextArch",
    "VLMArch",
    "Flops",
    "vision_layer_flops",
    "decoder_layer_flops",
    "attention_pairs",
    "prefill_flops",
    "layer_lengths",
    "kv_cache_bytes",
    "sequence_prefill_flops",
]


# ---------------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class VisionArch:
    """The numbers of a ViT vision tower that decide its FLOPs."""

    image_size: int
    patch_size: int
    channels: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    prefix: int  # tokens before the patches: 1 ([CLS]) for CLIP, 0 for SigLIP
    pooling_head: bool = False  # SigLIP's attention-pooling head (a probe query over the last hidden states)

    @classmethod
    def from_config(cls, vc, prefix: int, pooling_head: bool = False) -> VisionArch:
        """A ViT's numbers from its config (``CLIPVisionConfig`` / ``SiglipVisionConfig``); ``prefix`` tokens
        before the patches (the family's description says how many)."""
        return cls(image_size=int(vc.image_size), patch_size=int(vc.patch_size),
                   channels=int(getattr(vc, "num_channels", 3)), hidden=int(vc.hidden_size),
                   intermediate=int(vc.intermediate_size), layers=int(vc.num_hidden_layers),
                   heads=int(vc.num_attention_heads), prefix=int(prefix), pooling_head=bool(pooling_head))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextArch:
    """The numbers of a decoder-only LLM that decide its FLOPs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True  # Llama / Mistral / Qwen2: gate, up, down; a plain MLP has two products

    @classmethod
    def from_config(cls, tc) -> TextArch:
        """A decoder LLM's numbers from its config (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``, ...)."""
        heads = int(tc.num_attention_heads)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return cls(hidden=int(tc.hidden_size), intermediate=int(tc.intermediate_size), layers=int(tc.num_hidden_layers),
                   heads=heads, kv_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), vocab=int(tc.vocab_size))


@dataclass(frozen=True)
class VLMArch:
    """A LLaVA-style VLM: vision tower -> projector MLP -> LLM.

    ``projector`` lists the ``(in, out)`` features of each linear layer of the projector; ``feature_layer``
    is the tower's hidden-state index the model reads (``vision_feature_layer``, negative from the end);
    ``image_tokens`` is the number of tokens per image the uncompressed model puts into the LLM.
    """

    vision: VisionArch
    projector: tuple[tuple[int, int], ...]
    text: TextArch
    feature_layer: int
    keep_prefix: bool  # vision_feature_select_strategy == "full"; "default" drops the tower's FIRST token

    @property
    def dropped(self) -> int:
        """Tokens LLaVA's ``"default"`` strategy cuts from the tower's output (``[:, 1:]``, for any tower)."""
        return 0 if self.keep_prefix else 1

    @property
    def image_tokens(self) -> int:
        return self.vision.patches + self.vision.prefix - self.dropped

    @classmethod
    def from_config(cls, config) -> VLMArch:
        """The architecture of a model config, as its family's description reads it
        (:meth:`~vtcompress.models.description.ModelDescription.prefill_arch`).

        Modelled: LLaVA-style configs (``model_type`` ``"llava"``: a CLIP or SigLIP tower, an MLP projector, a
        Llama / Mistral / Qwen2-style LLM). Other VLM configs (anyres LLaVA-NeXT / OneVision, Qwen2-VL, InternVL)
        raise ``ValueError``: their towers tile or reshape the image, which this LLaVA-style count does not model.
        """
        if isinstance(config, VLMArch):
            return config
        from ..models.registry import description_for_config

        return description_for_config(config).prefill_arch(config)


# ---------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Flops:
    """Prefill FLOPs split by component (for a whole batch)."""

    vision: int
    projector: int
    llm: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.lm_head

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def vision_layer_flops(v: VisionArch, tokens: int, attention: bool | str = True) -> int:
    """One ViT layer over ``tokens`` tokens (prefix included): q/k/v/o, attention, 2-layer MLP.

    The tower's attention is bidirectional: ``attention="causal"`` (which concerns the LLM) counts it whole."""
    d, n = v.hidden, tokens
    proj = 4 * 2 * n * d * d
    attn = 4 * n * n * d if _attention_mode(attention) != "none" else 0  # heads * (2 n n hd) * 2, heads * hd = d
    mlp = 2 * 2 * n * d * v.intermediate
    return proj + attn + mlp


def attention_pairs(tokens: int, keys: int, attention: bool | str = True) -> int:
    """``(query, key)`` pairs whose score a decoder layer computes: ``tokens`` queries, the last ``tokens`` of
    ``keys`` positions.

    ``attention``: ``True`` / ``"full"`` the whole ``tokens x keys`` matrix (what eager attention computes),
    ``"causal"`` the pairs a causal mask keeps (``tokens * keys - tokens * (tokens - 1) / 2``), ``False`` /
    ``"none"`` no attention at all.
    """
    mode = _attention_mode(attention)
    if mode == "none":
        return 0
    if mode == "full":
        return tokens * keys
    if keys < tokens:
        raise ValueError(f"keys={keys} < tokens={tokens}: causal queries are the last positions of the keys")
    return tokens * keys - tokens * (tokens - 1) // 2


def _attention_mode(attention) -> str:
    if attention is True or attention == "full":
        return "full"
    if attention is False or attention == "none":
        return "none"
    if attention == "causal":
        return "causal"
    raise ValueError(f"attention={attention!r}; allowed: True / 'full', 'causal', False / 'none'")


def decoder_layer_flops(t: TextArch, tokens: int, keys: int | None = None, attention: bool | str = True) -> int:
    """One decoder layer: ``tokens`` queries over ``keys`` keys (default ``tokens``, i.e. prefill).

    ``q``/``o`` are ``hidden x heads*head_dim``, ``k``/``v`` are ``hidden x kv_heads*head_dim`` (GQA);
    attention runs per query head over :func:`attention_pairs` (``attention``: full matrix, causal, none); the
    MLP is gated (3 products) or plain (2).
    """
    n = tokens
    s = n if keys is None else keys
    d, hd = t.hidden, t.head_dim
    proj = 2 * 2 * n * d * t.heads * hd + 2 * 2 * n * d * t.kv_heads * hd
    attn = 4 * t.heads * attention_pairs(n, s, attention) * hd
    mlp = (3 if t.gated_mlp else 2) * 2 * n * d * t.intermediate
    return proj + attn + mlp


def _pooling_head_flops(v: VisionArch, tokens: int, attention: bool | str) -> int:
    # SigLIP's head: one probe query over the tower's last tokens (nn.MultiheadAttention), then an MLP on it.
    d = v.hidden
    q = 2 * 1 * d * d
    kv = 2 * tokens * d * 2 * d
    attn = 2 * 2 * tokens * d if _attention_mode(attention) != "none" else 0
    out = 2 * 1 * d * d
    mlp = 2 * 2 * 1 * d * v.intermediate
    return q + kv + attn + out + mlp


def _check_count(name: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is out of range: an int in [{lo}, {hi}] is allowed")
    return value


def layer_lengths(arch, text_tokens: int, image_tokens: int | None = None, images: int = 1,
                  schedule: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Sequence length entering each decoder layer: ``text + images * kept_l`` under a decoder ``schedule``.

    Arguments as in :func:`prefill_flops` (validated the same way).
    """
    arch = VLMArch.from_config(arch)
    t = arch.text
    _check_count("text_tokens", text_tokens, 0, 10**9)
    _check_count("images", images, 0, 10**6)
    image_tokens = arch.image_tokens if image_tokens is None else image_tokens
    _check_count("image_tokens", image_tokens, 0, arch.image_tokens)
    kept_at = [image_tokens] * t.layers
    last_k, last_kept = -1, image_tokens
    for entry in schedule:
        if len(entry) != 2:
            raise ValueError(f"schedule entries are (layer K, image tokens kept); got {entry!r}")
        k, kept = entry
        _check_count("schedule layer K", k, 0, t.layers - 1)
        _check_count(f"schedule tokens kept at layer {k}", kept, 0, last_kept)
        if k <= last_k:
            raise ValueError(f"schedule layers must be strictly increasing; got {k} after {last_k}")
        kept_at[k:] = [kept] * (t.layers - k)
        last_k, last_kept = k, kept
    return [text_tokens + images * n for n in kept_at]


def kv_cache_bytes(arch, text_tokens: int, image_tokens: int | None = None, images: int = 1,
                   schedule: Sequence[tuple[int, int]] = (), bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of the KV cache a prefill leaves: per decoder layer ``2 (k, v) x length_l x kv_heads x head_dim``.

    Decoder-stage pruning shortens the cache of layers ``>= K`` (the lengths of :func:`layer_lengths`);
    ``bytes_per_value`` is 2 for bf16 / fp16, 4 for fp32.
    """
    arch = VLMArch.from_config(arch)
    _check_count("bytes_per_value", bytes_per_value, 1, 16)
    _check_count("batch", batch, 1, 10**9)
    per_token = 2 * arch.text.kv_heads * arch.text.head_dim * bytes_per_value
    return batch * per_token * sum(layer_lengths(arch, text_tokens, image_tokens, images, schedule))


def prefill_flops(
    arch,
    text_tokens: int,
    image_tokens: int | None = None,
    images: int = 1,
    schedule: Sequence[tuple[int, int]] = (),
    vision_tokens: Sequence[int] | None = None,
    projector_tokens: int | None = None,
    logits: str | int = "last",
    batch: int = 1,
    attention: bool | str = True,
    selection_rows: int = 0,
) -> Flops:
    """Prefill FLOPs of one forward pass of a LLaVA-style VLM over a batch of equal sequences.

    Args:
        arch: a :class:`VLMArch` or a ``LlavaConfig``.
        text_tokens: tokens of the sequence that are not image tokens (prompt, special tokens).
        image_tokens: image tokens per image that ENTER the LLM (after projector-stage compression);
            default the uncompressed count ``arch.image_tokens``.
        images: images per sequence.
        schedule: decoder-stage pruning ``[(K, kept), ...]``: from decoder layer ``K`` on, ``kept`` image
            tokens per image remain. ``K`` strictly increasing in ``[0, layers)``, ``kept`` non-increasing and
            at most ``image_tokens``.
        vision_tokens: encoder-stage merging: patch tokens (prefix excluded) entering each vision layer,
            one int per layer; default every patch in every layer.
        projector_tokens: tokens per image through the projector; default the tower's feature-layer count
            (all patches, or ``vision_tokens`` at the feature layer), plus the prefix, minus the first token
            under the ``"default"`` strategy (LLaVA cuts ``[:, 1:]``: the [CLS] of CLIP, a patch of SigLIP).
        logits: ``"last"`` (1 position), ``"all"`` (every position of the last layer) or an int (positions).
        batch: sequences in the batch (everything scales linearly).
        attention: the attention score / weighted-sum products: ``True`` / ``"full"`` over the whole score
            matrix, ``"causal"`` over the pairs the LLM's causal mask keeps (the tower stays full), ``False`` /
            ``"none"``: only the weight products.
        selection_rows: query rows whose attention a decoder-stage method computes at each schedule layer to
            choose the survivors (1 for FastV / PyramidDrop; 0: not counted).

    Returns:
        :class:`Flops` (``vision``, ``projector``, ``llm``, ``lm_head``, ``total``) for the whole batch.
    """
    arch = VLMArch.from_config(arch)
    v, t = arch.vision, arch.text
    full = arch.image_tokens
    _check_count("text_tokens", text_tokens, 0, 10**9)
    _check_count("images", images, 0, 10**6)
    _check_count("batch", batch, 1, 10**9)
    _attention_mode(attention)
    image_tokens = full if image_tokens is None else _check_count("image_tokens", image_tokens, 0, full)

    # vision tower: patch embedding (a conv) + every layer, per image
    if vision_tokens is None:
        per_layer = [v.patches] * v.layers
    else:
        per_layer = list(vision_tokens)
        if len(per_layer) != v.layers:
            raise ValueError(f"vision_tokens has {len(per_layer)} entries; the tower has {v.layers} layers (one each)")
        for i, n in enumerate(per_layer):
            _check_count(f"vision_tokens[{i}]", n, 1, v.patches)
    vision = 2 * v.patches * v.hidden * v.channels * v.patch_size**2
    vision += sum(vision_layer_flops(v, n + v.prefix, attention) for n in per_layer)
    if v.pooling_head:
        vision += _pooling_head_flops(v, per_layer[-1] + v.prefix, attention)

    # projector: on what the tower hands over (the feature layer's tokens)
    if projector_tokens is None:
        f = arch.feature_layer % (v.layers + 1)  # hidden_states[f] is the input of layer f
        feat = per_layer[min(f, v.layers - 1)]
        projector_tokens = feat + v.prefix - arch.dropped
    _check_count("projector_tokens", projector_tokens, 0, full)
    projector = sum(2 * projector_tokens * i * o for i, o in arch.projector)

    # LLM decoder layers, with the decoder-stage schedule
    lengths = layer_lengths(arch, text_tokens, image_tokens, images, schedule)
    llm = sum(decoder_layer_flops(t, n, attention=attention) for n in lengths)
    _check_count("selection_rows", selection_rows, 0, 10**9)
    if selection_rows:
        for k, _ in schedule:
            n = lengths[k - 1] if k > 0 else text_tokens + images * image_tokens
            llm += _selection_flops(t, selection_rows, n, attention)
    lm_head = _lm_head_flops(t, logits, lengths[-1])

    per_image = images * batch
    return Flops(vision=vision * per_image, projector=projector * per_image, llm=llm * batch, lm_head=lm_head * batch)


def sequence_prefill_flops(
    arch,
    text_tokens: int,
    visual_tokens: Sequence[int],
    images: int = 1,
    stages: Sequence[int] = (),
    selection_rows: int = 0,
    vision_tokens: Sequence[int] | None = None,
    logits: str | int = "last",
    attention: bool | str = True,
) -> Flops:
    """Prefill FLOPs of ONE sequence from the visual tokens entering each decoder layer.

    The per-sequence form of :func:`prefill_flops` for what really ran, when the images of a sequence keep
    different counts (adaptive methods such as PruMerge, an int budget split over images of different sizes):
    the same counting, with ``visual_tokens[l]`` the image tokens of the whole sequence (all its images)
    entering decoder layer ``l``. With equal images it equals ``prefill_flops(arch, text_tokens, image_tokens,
    images, schedule, ...)`` for ``visual_tokens = layer_lengths(...) - text_tokens`` and ``stages`` the
    schedule's layers.

    Args:
        arch: a :class:`VLMArch` or a ``LlavaConfig``.
        text_tokens: the sequence's tokens that are not image tokens.
        visual_tokens: one int per decoder layer, non-increasing (decoder-stage pruning only drops).
        images: images of the sequence: the vision tower and projector run on each (as in
            :func:`prefill_flops`, the projector-stage methods act after the projector).
        stages: decoder layers ``K >= 1`` where a decoder-stage method selects (its scoring is counted with
            ``selection_rows`` query rows over the tokens entering layer ``K - 1``, as in :func:`prefill_flops`).
        selection_rows, vision_tokens, logits, attention: as in :func:`prefill_flops`.

    Returns:
        :class:`Flops` of the sequence.
    """
    arch = VLMArch.from_config(arch)
    t = arch.text
    _check_count("text_tokens", text_tokens, 0, 10**9)
    _check_count("images", images, 0, 10**6)
    _attention_mode(attention)
    visual = list(visual_tokens)
    if len(visual) != t.layers:
        raise ValueError(f"visual_tokens has {len(visual)} entries; the LLM has {t.layers} layers (one each)")
    for i, n in enumerate(visual):
        _check_count(f"visual_tokens[{i}]", n, 0, visual[i - 1] if i else 10**9)
    prev = -1
    for k in stages:
        _check_count("stage layer K", k, 1, t.layers - 1)
        if k <= prev:
            raise ValueError(f"stage layers must be strictly increasing; got {k} after {prev}")
        prev = k
    _check_count("selection_rows", selection_rows, 0, 10**9)
    # the vision tower and the projector of `images` images (their cost does not depend on the text)
    tower = prefill_flops(arch, text_tokens=0, image_tokens=0, images=images, vision_tokens=vision_tokens,
                          attention=attention)
    lengths = [text_tokens + n for n in visual]
    llm = sum(decoder_layer_flops(t, n, attention=attention) for n in lengths)
    for k in stages if selection_rows else ():  # the selection's attention rows, counted as prefill_flops does
        llm += _selection_flops(t, selection_rows, lengths[k - 1], attention)
    return Flops(vision=tower.vision, projector=tower.projector, llm=llm,
                 lm_head=_lm_head_flops(t, logits, lengths[-1]))


def _selection_flops(t, rows: int, n: int, attention: bool | str) -> int:
    """A decoder-stage selection on ``n`` tokens: q of the ``rows`` query rows, keys of all ``n``, and (with
    ``attention``) their ``rows x n`` attention logits."""
    out = 2 * rows * t.hidden * t.heads * t.head_dim + 2 * n * t.hidden * t.kv_heads * t.head_dim
    # the selecting rows are the last positions: a causal mask hides none of their keys
    return out + (2 * t.heads * rows * n * t.head_dim if _attention_mode(attention) != "none" else 0)


def _lm_head_flops(t, logits, last_len: int) -> int:
    """The LM head on ``logits`` positions: ``"last"``, ``"all"`` (``last_len``) or an int (at most ``last_len``)."""
    if logits == "last":
        positions = 1
    elif logits == "all":
        positions = last_len
    elif isinstance(logits, int) and not isinstance(logits, bool) and logits >= 1:
        positions = min(logits, last_len)
    else:
        raise ValueError(f"logits={logits!r}; allowed: 'last', 'all' or a positive int (positions kept)")
    return 2 * positions * t.hidden * t.vocab
