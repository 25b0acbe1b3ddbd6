"""The description of one model family: where things are in a stock Hugging Face VLM, and nothing else.

Every stage engine (the projector pipeline :mod:`~vtcompress.models.pipeline`, the encoder stage
:mod:`~vtcompress.models.encoder`, the decoder stage :mod:`~vtcompress.models.decoder`, the signal capture), the
bench (:mod:`vtcompress.bench.flops`, :mod:`vtcompress.bench.quality`) and the token maps read a model only through
its :class:`ModelDescription`. A family is one file (``models/<family>.py``) holding one subclass that sets
class attributes (dotted module paths, :class:`Modality` entries, enums) and overrides the few methods whose
answer is computed (the layout of an image's tokens, the map of vision signals onto them). Paths are resolved
with :func:`locate`; nothing outside the description and the family files spells out a module path
(``tests/test_description.py`` greps for it).

What a description says:

* **vision tower**: ``vision_tower_path`` (from the base ``...Model``), its layers (``vision_layers_path``), each
  layer's attention module (``vision_attention_path``), the [CLS]-style prefix count (:meth:`num_prefix_tokens`),
  the feature layer(s) the LLM reads (:meth:`feature_layer`), the patch grid of one crop (:meth:`grid`) and the
  tower's position scheme (``vision_position_scheme``);
* **projector**: ``projector_path``, and whether its input maps 1:1 onto the LLM's image tokens
  (``projector_one_to_one``: methods with ``acts_on="vision"`` act before it);
* **LLM**: ``language_model_path``, its layers / final norm / rotary embedding (``llm_layers_path``,
  ``final_norm_path``, ``rotary_emb_path``), each layer's attention and input norm, the rotary apply function
  (:meth:`rotary_fn`), the position scheme (``position_scheme``, a :class:`PositionScheme`);
* **modalities** (``modalities``, one :class:`Modality` each: ``image``, and ``video`` for the families that have
  it): placeholder token id, the inputs its encoder reads, the function that encodes it, the layout of its tokens
  (:class:`TokenLayout`: one grid, anyres views with newlines, tiles, native grids, frames);
* **how features enter the LLM** (``injection``: :class:`Injection`, the placeholder scatter) and DeepStack-style
  extra injections into later LLM layers (``extra_injections``: :class:`ExtraInjection`).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .layout import ImageLayout

__all__ = [
    "PositionScheme",
    "TokenLayout",
    "Injection",
    "ExtraInjection",
    "Modality",
    "ModelDescription",
    "Adapter",
    "TextModelDescription",
    "locate",
    "visual_token_ids",
    "modeling_function",
    "IMAGE",
]


class PositionScheme(str, Enum):
    """How positions are given to a transformer's tokens (compares equal to its string value)."""

    #: one index per token, RoPE on it (LLaMA / Mistral / Qwen2 LLMs)
    ROPE_1D = "1d"
    #: 3-D (time, row, column) multimodal RoPE, positions from the image grid (Qwen2-VL / Qwen2.5-VL / Qwen3-VL)
    MROPE = "mrope"
    #: 2-D RoPE over the patch grid (Pixtral's and Qwen2-VL's vision towers)
    ROPE_2D = "2d"
    #: learned absolute position embeddings added once before the first layer (CLIP, SigLIP, InternViT)
    ABSOLUTE = "absolute"


class TokenLayout(str, Enum):
    """How the tokens of one image (or video) are laid out in its placeholder run."""

    #: one patch grid, optionally after prefix tokens ([CLS] with ``vision_feature_select_strategy="full"``)
    GRID = "grid"
    #: anyres: the base crop's grid, then the high-resolution grid row by row, a newline after each row
    ANYRES = "anyres"
    #: equal tiles one after the other, each its own grid (InternVL; Idefics3 adds a global view and markers)
    TILES = "tiles"
    #: one grid per image at its native resolution (Qwen2-VL's merged grid; Pixtral with a break per row)
    NATIVE = "native"
    #: video frames, each a grid
    FRAMES = "frames"


class Injection(str, Enum):
    """How the encoder's features enter the LLM."""

    #: the features replace the placeholder embeddings (``masked_scatter``) before the first LLM layer
    SCATTER = "scatter"


@dataclass(frozen=True)
class ExtraInjection:
    """Features injected into the LLM after the first layer (DeepStack, Qwen3-VL: arXiv 2406.04334).

    Attributes:
        name: what it is called (``"deepstack"``).
        output_field: the field of ``get_image_features``' output holding one feature set per injected layer
            (``"deepstack_features"``), each aligned with the placeholder run like the main features.
        first_layer: feature set ``j`` is added to the hidden states at the visual positions after LLM layer
            ``first_layer + j`` (Qwen3-VL: 0, 1, 2).
    """

    name: str
    output_field: str
    first_layer: int = 0


@dataclass(frozen=True)
class Modality:
    """One kind of visual input of a family and where its pieces are.

    Attributes:
        name: ``"image"`` or ``"video"``.
        token_id_keys: config attributes holding the placeholder token id (the first one set wins).
        input_keys: the model inputs its encoder reads; the first is the pixel tensor.
        encode_fn: the base model's method that encodes it (``get_image_features`` / ``get_video_features``).
        layout: the layout of its tokens (:class:`TokenLayout`).
        encoder_only_keys: inputs only its encoder reads besides ``input_keys``' signature (dropped once its
            features are passed as ``mm_encoder_outputs``).
    """

    name: str
    token_id_keys: tuple[str, ...]
    input_keys: tuple[str, ...]
    encode_fn: str
    layout: TokenLayout = TokenLayout.GRID
    encoder_only_keys: tuple[str, ...] = ()

    @property
    def pixel_key(self) -> str:
        return self.input_keys[0]


#: the image modality of a LLaVA-style family (``pixel_values`` and ``image_sizes``, ``config.image_token_id``)
IMAGE = Modality(name="image", token_id_keys=("image_token_id", "image_token_index"),
                 input_keys=("pixel_values", "image_sizes"), encode_fn="get_image_features")


def locate(root: Any, path: str | None, what: str = "module") -> Any:
    """``root`` followed along the dotted ``path`` (``""``: ``root`` itself); ``ValueError`` naming the missing part.

    The one place where a description's paths meet the model."""
    if path is None:
        raise ValueError(f"this model family has no {what}")
    obj = root
    for part in filter(None, path.split(".")):
        nxt = getattr(obj, part, None)
        if nxt is None:
            raise ValueError(f"cannot find the {what}: {type(obj).__name__} has no {part!r} (path {path!r} from "
                             f"{type(root).__name__})")
        obj = nxt
    return obj


def modeling_function(module: nn.Module, name: str):
    """The function ``name`` of the modeling file that defines ``module``'s class (``None`` if it has none): the
    model's own ``apply_rotary_pos_emb`` / ``eager_attention_forward``, reused rather than re-written."""
    return getattr(sys.modules.get(type(module).__module__), name, None)


def visual_token_ids(config) -> list[int]:
    """Placeholder ids of visual tokens (image and video) from a VLM config alone (the family's description, when
    the model is at hand, says the same: :meth:`ModelDescription.visual_token_ids`)."""
    ids: list[int] = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v >= 0 and v not in ids:
            ids.append(v)
    if not ids:
        raise ValueError(
            f"{type(config).__name__} has no image_token_id / image_token_index: decoder-stage pruning needs it to "
            "find the visual tokens in input_ids"
        )
    return ids


def _first(root: Any, paths: tuple[str, ...]) -> Any:
    for p in paths:
        try:
            return locate(root, p)
        except ValueError:
            continue
    return None


class ModelDescription:
    """Where things are in one model family. Subclasses set the class attributes and override the computed answers.

    Every method takes the model (the top-level ``...ForConditionalGeneration``) or one of its modules; none holds
    state, so one instance per family is registered (:func:`~vtcompress.models.registry.register_adapter`).
    """

    #: the family's name (``vtcompress list --models``, error messages)
    family: str = ""
    #: class names of the top-level models this family serves (matched along the MRO, subclasses included)
    model_classes: tuple[str, ...] = ()
    #: ``config.model_type`` values of those models (for readers that only have a config: the bench)
    model_types: tuple[str, ...] = ()
    #: ``"supported"`` (tested end to end here) or ``"experimental"``; :func:`~vtcompress.models.list_families`
    status: str = "supported"

    # --- the base model and its vision tower ------------------------------------------------------------------
    #: the ``...Model`` holding the tower, the projector, the LLM and ``get_image_features`` (from the top level)
    base_path: str = "model"
    #: from the base model
    vision_tower_path: str | None = "vision_tower"
    #: from the vision tower
    vision_layers_path: str = "encoder.layers"
    #: from one vision layer
    vision_attention_path: str = "self_attn"
    #: the keys projection of a vision attention module (encoder-stage merging reads ToMe's metric from it)
    vision_key_proj_path: str = "k_proj"
    #: the tower's embeddings (from the tower); a ``class_embedding`` / ``cls_token`` there is a [CLS] prefix
    vision_embeddings_paths: tuple[str, ...] = ("embeddings", "vision_model.embeddings")
    vision_position_scheme: PositionScheme = PositionScheme.ABSOLUTE

    # --- projector -------------------------------------------------------------------------------------------
    #: from the base model
    projector_path: str | None = "multi_modal_projector"
    #: the projector's input maps 1:1 onto the LLM's image tokens (``acts_on="vision"`` acts before it)
    projector_one_to_one: bool = False

    # --- LLM -------------------------------------------------------------------------------------------------
    #: from the base model
    language_model_path: str = "language_model"
    #: from the language model
    llm_layers_path: str = "layers"
    final_norm_path: str = "norm"
    rotary_emb_path: str | None = "rotary_emb"
    #: from one LLM decoder layer
    llm_attention_path: str = "self_attn"
    llm_input_norm_path: str = "input_layernorm"
    #: LLaVA-NeXT / OneVision's learned row separator (from the base model), ``None`` elsewhere
    image_newline_path: str | None = None
    #: the LLM's positions
    position_scheme: PositionScheme = PositionScheme.ROPE_1D
    #: the decoder stage is verified on this family's sliding-window layers (it follows each layer's own mask and
    #: cache, :mod:`vtcompress.models.decoder`); apply refuses decoder-stage methods on other sliding-window LLMs
    decoder_sliding_window: bool = False

    # --- modalities and how they enter the LLM ---------------------------------------------------------------
    modalities: tuple[Modality, ...] = (IMAGE,)
    injection: Injection = Injection.SCATTER
    extra_injections: tuple[ExtraInjection, ...] = ()
    #: encoder-stage methods (merging inside the tower) can flow through the stock feature path
    encoder_stage: bool = False
    #: runtime attributes the stock ``generate`` keeps on the base model (put back when the last apply leaves)
    runtime_state: tuple[str, ...] = ()
    #: projector-stage methods compress this family's videos frame by frame (:meth:`video_layouts`); otherwise
    #: videos pass through the encoder / projector stages untouched (the decoder stage still prunes them)
    video_projector_stage: bool = False
    #: the vision signals ([CLS] / attention received, keys) are captured for its video frames too (the tower
    #: encodes a frame as it encodes an image, and :meth:`signal_to_features` maps them with ``modality="video"``);
    #: otherwise, under a method reading them, the videos pass through the projector stage untouched
    video_signals: bool = False
    #: the family's processor turns a video into frames given to the model as images (InternVL: ``Frame1: <img>
    #: ... </img>``): under a temporal method the frames of each video are found by :meth:`image_clips` (which
    #: reads the frame prompts with the tokenizer passed as ``apply(..., processor=)``) and compressed as one clip
    frames_as_images: bool = False

    # ============================================================================ matching
    def matches(self, model: nn.Module) -> bool:
        # by class name (no transformers import at module load), subclasses included
        return self.match_depth(model) is not None

    def match_depth(self, model: nn.Module) -> int | None:
        """How far up ``model``'s MRO the first class this family serves is (0: its own class); ``None``: none."""
        return next((i for i, c in enumerate(type(model).__mro__) if c.__name__ in self.model_classes), None)

    def matches_config(self, config) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    # ============================================================================ where things are
    def base(self, model: nn.Module) -> nn.Module:
        """The ``...Model`` holding ``get_image_features`` and the language model."""
        return locate(model, self.base_path, "base model")

    def vision_config(self, model: nn.Module):
        return model.config.vision_config

    def text_config(self, model_or_config):
        """The LLM's config (``text_config``, or the config itself for a plain causal LM)."""
        cfg = getattr(model_or_config, "config", model_or_config)
        if hasattr(cfg, "get_text_config"):
            return cfg.get_text_config(decoder=True)
        return getattr(cfg, "text_config", None) or cfg

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return locate(self.base(model), self.vision_tower_path, "vision tower")

    def vision_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(locate(self.vision_tower(model), self.vision_layers_path, "vision encoder layers"))

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The attention module of one vision layer (where signals are recorded)."""
        return locate(layer, self.vision_attention_path, "vision attention module")

    vision_attention = attention_module

    def vision_key_proj(self, layer: nn.Module) -> nn.Module | None:
        """The keys projection of one vision layer's attention, ``None`` if it has none (a fused qkv)."""
        try:
            attn = self.attention_module(layer)
        except ValueError:
            return None
        mod = getattr(attn, self.vision_key_proj_path, None)
        return mod if isinstance(mod, nn.Module) else None

    def vision_embeddings(self, model: nn.Module) -> nn.Module | None:
        return _first(self.vision_tower(model), self.vision_embeddings_paths)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches in the vision encoder's sequence (1 for CLIP's [CLS], 0 for SigLIP)."""
        emb = self.vision_embeddings(model)
        return 1 if getattr(emb, "class_embedding", None) is not None or getattr(emb, "cls_token", None) is not None \
            else 0

    def feature_layer(self, model: nn.Module) -> int | list[int]:
        """Hidden-state index (or list) of the tower output the LLM reads (``vision_feature_layer``)."""
        return model.config.vision_feature_layer

    def grid(self, model: nn.Module) -> tuple[int, int]:
        """Patch grid of one crop / tile seen by the vision encoder."""
        cfg = self.vision_config(model)
        size, patch = cfg.image_size, cfg.patch_size
        size = size if isinstance(size, int) else size[0]
        patch = patch if isinstance(patch, int) else patch[0]
        return (size // patch, size // patch)

    def projector(self, model: nn.Module) -> nn.Module:
        return locate(self.base(model), self.projector_path, "multimodal projector")

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (the module holding the LLM's layers, final norm and rotary embedding)."""
        return locate(self.base(model), self.language_model_path, "language model")

    def llm_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = locate(self.language_model(model), self.llm_layers_path, "LLM decoder layers")
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"the LLM decoder layers of {type(model).__name__} are a {type(layers).__name__}, "
                             "expected an nn.ModuleList")
        return layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return locate(self.language_model(model), self.final_norm_path, "LLM final norm")

    def rotary_emb(self, model: nn.Module) -> nn.Module | None:
        """The LLM's rotary embedding module (``None`` if it has none)."""
        if self.rotary_emb_path is None:
            return None
        return getattr(self.language_model(model), self.rotary_emb_path, None)

    def llm_attention(self, layer: nn.Module) -> nn.Module:
        return locate(layer, self.llm_attention_path, "LLM attention module")

    def llm_input_norm(self, layer: nn.Module) -> nn.Module:
        return locate(layer, self.llm_input_norm_path, "LLM input norm")

    def rotary_fn(self, attn: nn.Module):
        """The ``apply_rotary_pos_emb(q, k, cos, sin)`` of the attention module's own modeling file (reused)."""
        fn = modeling_function(attn, "apply_rotary_pos_emb")
        if fn is None:
            raise ValueError(
                f"{type(attn).__module__} has no apply_rotary_pos_emb; decoder-stage scoring supports rotary-embedding "
                "decoders (LLaMA, Qwen2, Qwen2-VL M-RoPE, ...)")
        return fn

    def image_newline(self, model: nn.Module) -> Tensor | None:
        """The learned row separator ``[D]`` (LLaVA-NeXT / OneVision ``image_newline``), else ``None``."""
        if self.image_newline_path is None:
            return None
        nl = getattr(self.base(model), self.image_newline_path, None)
        return nl if isinstance(nl, Tensor) and nl.dim() == 1 else None

    def runtime_holder(self, model: nn.Module) -> nn.Module:
        """The module on which the stock forward keeps :attr:`runtime_state`."""
        return self.base(model)

    # ============================================================================ modalities
    def modality(self, name: str) -> Modality | None:
        return next((m for m in self.modalities if m.name == name), None)

    @property
    def image(self) -> Modality:
        m = self.modality("image")
        if m is None:
            raise ValueError(f"the {self.family} family has no image modality")
        return m

    @property
    def video(self) -> Modality | None:
        return self.modality("video")

    @property
    def encoder_only_keys(self) -> tuple[str, ...]:
        """Inputs only the image encoder reads (dropped once features are passed as ``mm_encoder_outputs``)."""
        m = self.modality("image")
        return m.encoder_only_keys if m is not None else ()

    def token_id(self, model: nn.Module, modality: str = "image") -> int | None:
        """The placeholder token id of ``modality`` (``None`` when the family or the config has none)."""
        m = self.modality(modality)
        if m is None:
            return None
        for key in m.token_id_keys:
            v = getattr(model.config, key, None)
            if isinstance(v, int) and v >= 0:
                return v
        return None

    def image_token_id(self, model: nn.Module) -> int:
        v = self.token_id(model, "image")
        if v is None:
            raise ValueError(f"{type(model.config).__name__} has no {' / '.join(self.image.token_id_keys)}: the image "
                             "placeholders cannot be found in input_ids")
        return int(v)

    def visual_token_ids(self, model: nn.Module) -> list[int]:
        """Placeholder ids of every visual modality (image, then video), without repeats."""
        ids: list[int] = []
        for m in self.modalities:
            v = self.token_id(model, m.name)
            if v is not None and v not in ids:
                ids.append(v)
        return ids

    def input_keys(self) -> tuple[str, ...]:
        """Every input a modality's encoder reads, and the encoder-only keys."""
        out: list[str] = []
        for m in self.modalities:
            out += [k for k in (*m.input_keys, *m.encoder_only_keys) if k not in out]
        return tuple(out) + tuple(k for k in self.encoder_only_keys if k not in out)

    def encode_fn(self, model: nn.Module, modality: str = "image"):
        """The base model's encoder function of ``modality`` (``None`` when the family has none)."""
        m = self.modality(modality)
        return getattr(self.base(model), m.encode_fn, None) if m is not None else None

    def encoder_kwargs(self, model: nn.Module, inputs: dict, modality: str = "image") -> dict:
        """The inputs the modality's encoder function takes (by its signature, as ``generate`` does)."""
        fn = self.encode_fn(model, modality)
        if fn is None:
            return {}
        params = inspect.signature(fn).parameters
        return {k: v for k, v in inputs.items() if k in params and k != "kwargs" and v is not None}

    def encode(self, model: nn.Module, inputs: dict, modality: str = "image"):
        """Run the model's own encoder of ``modality`` on ``inputs`` (``return_dict=True``)."""
        return self.encode_fn(model, modality)(**self.encoder_kwargs(model, inputs, modality), return_dict=True)

    # ============================================================================ the tokens of one image
    def features(self, model: nn.Module, inputs: dict, out) -> list[Tensor]:
        """Per-image features ``[L_i, D]`` from ``get_image_features``' output, in placeholder order."""
        return list(out.pooler_output)

    def wrap(self, out, feats: list[Tensor], extra: list[list[Tensor]] | None = None):
        """``mm_encoder_outputs["image"]`` carrying the compressed per-image features (and, for a family with
        :attr:`extra_injections`, those features compressed alike: ``extra[level][image]``)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=list(feats))

    def extra_features(self, model: nn.Module, out) -> list[list[Tensor]]:
        """The features of :attr:`extra_injections` from ``get_image_features``' output, ``[level][image]`` tensors
        ``[L_i, D]`` token for token with :meth:`features` (Qwen3-VL's DeepStack levels); ``[]`` without any.

        The base reads each injection's ``output_field`` (one tensor per level holding every image's tokens, or one
        list per level split per image) and splits it like the main features."""
        levels: list[list[Tensor]] = []
        for inj in self.extra_injections:
            field = getattr(out, inj.output_field, None)
            if field is None:
                raise ValueError(f"{self.family}: get_image_features returned no {inj.output_field!r} ({inj.name})")
            for level in field:
                levels.append(list(level) if isinstance(level, (list, tuple)) else [level])
        return levels

    def decoder_hooks(self, model: nn.Module, decoder) -> list:
        """Extra removable hooks a decoder-stage handle installs on this family's model (removed with its own):
        e.g. keeping DeepStack injections aligned with the kept rows. ``[]`` for most families."""
        return []

    def placeholder_images(self, model: nn.Module, ids: Tensor, placeholders: Tensor) -> Tensor:
        """Which image of its row each visual placeholder belongs to: ``[B, S]`` long (``0, 1, ...`` per row, ``-1``
        elsewhere), for ``placeholders [B, S]`` bool (the visual tokens of ``ids [B, S]``, pads excluded). The
        decoder stage's budgets count per image by it.

        The base: each contiguous run is one image (every stock family's image is contiguous, two images are
        separated by text or start / end tokens). Families whose image is several runs (Idefics3's tiles between
        marker tokens, Pixtral's rows between ``[IMG_BREAK]`` tokens) group them here."""
        start = placeholders & ~torch.nn.functional.pad(placeholders[:, :-1], (1, 0), value=False)
        return torch.where(placeholders, start.long().cumsum(1) - 1, torch.full_like(ids, -1))

    def layouts(self, model: nn.Module, inputs: dict, feats: list[Tensor]) -> list[ImageLayout]:
        """Per image, where each feature of its placeholder run comes from (:class:`ImageLayout`)."""
        raise NotImplementedError(f"the {self.family} description has no layouts()")

    def video_layouts(self, model: nn.Module, inputs: dict, feats: list[Tensor]) -> list[ImageLayout]:
        """Per video, its features ``[L_i, D]`` as frames: one view per frame (:attr:`video_projector_stage`)."""
        raise NotImplementedError(f"the {self.family} description has no video_layouts()")

    def image_clips(self, model: nn.Module, inputs: dict, tokenizer) -> list[list[int]]:
        """The images of this call that are the frames of one video (:attr:`frames_as_images` families), as lists
        of image indices (placeholder order), one list per video, frames in order; ``[]`` without any."""
        return []

    def video_features(self, model: nn.Module, inputs: dict, out) -> list[Tensor]:
        """Per-video features ``[L_i, D]`` from ``get_video_features``' output, in placeholder order."""
        return list(out.pooler_output)

    def wrap_video(self, out, feats: list[Tensor], extra: list[list[Tensor]] | None = None):
        """``mm_encoder_outputs["video"]`` carrying the compressed per-video features (as :meth:`wrap`; ``extra``:
        the per-token levels that follow them, ``[level][video]``, where the family has any)."""
        return self.wrap(out, feats, extra) if extra else self.wrap(out, feats)

    def signal_to_features(self, model: nn.Module, inputs: dict, records: list[Tensor], reduce: str,
                           feats: list[Tensor]) -> list[Tensor]:
        """Map signals recorded in the encoder's token order onto each image's features: ``[L_i, C]``.

        ``records`` are the per-call ``[B, T, C]`` tensors of the recorded attention module; ``reduce``
        (``"sum"`` for attention mass, ``"mean"`` for keys) pools tokens that the model merges into one. Families
        with :attr:`video_signals` also take ``modality="video"`` (the records of encoding the videos, mapped
        onto each video's features).
        """
        raise NotImplementedError(f"the {self.family} description has no signal_to_features()")

    def rope_index(self, model: nn.Module, input_ids: Tensor, mm_token_type_ids: Tensor, *, attention_mask: Tensor,
                   **grids) -> Tensor:
        """M-RoPE families: the ``[3, B, S]`` positions of the full sequence (the model's own ``get_rope_index``)."""
        raise ValueError(f"the {self.family} family has no M-RoPE positions")

    def prefill_arch(self, config):
        """The analytic-FLOPs architecture (:class:`vtcompress.bench.flops.VLMArch`) of a config of this family;
        ``ValueError`` where its token count is not modelled."""
        raise ValueError(
            f"prefill FLOPs are modelled for LLaVA-style configs (model_type 'llava': one ViT tower, an MLP projector, "
            f"a decoder LLM); got model_type {getattr(config, 'model_type', type(config).__name__)!r}")

    # ============================================================================ aliases (the Adapter names)
    def supports_encoder_stage(self) -> bool:
        return bool(self.encoder_stage)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family!r}>"


#: the name the families were written against; a description is what an adapter was
Adapter = ModelDescription


class TextModelDescription(ModelDescription):
    """A plain causal LM (``...ForCausalLM``): only its decoder, for decoder-stage methods (no image modality)."""

    family = "text"
    base_path = "model"
    vision_tower_path = None
    projector_path = None
    language_model_path = ""
    #: a text model that was given placeholder ids (``config.image_token_id``) is pruned at them
    modalities = (IMAGE, Modality(name="video", token_id_keys=("video_token_id", "video_token_index"),
                                  input_keys=("pixel_values_videos",), encode_fn="get_video_features"))

    def matches(self, model: nn.Module) -> bool:
        try:
            return isinstance(locate(model, f"{self.base_path}.{self.llm_layers_path}"), nn.ModuleList)
        except ValueError:
            return False

    def feature_layer(self, model: nn.Module):
        raise ValueError(f"{type(model).__name__} has no vision tower")
