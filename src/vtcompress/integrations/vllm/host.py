"""What the vLLM model classes of this plugin share: the processor side (placeholder counts per request) and the
model side (grouping a batch's images by their request's method, running the shared projector-stage mechanics).

Processor side (:class:`CompressingProcessorMixin`, mixed into a model's own vLLM multimodal processor):

- ``_call_hf_processor``: resolves the request's method / budget (:func:`~.spec.resolve`: the request's
  ``mm_processor_kwargs`` over the server default from the model config), removes the plugin's keys before the
  Hugging Face processor sees them, and adds one ``vtcompress_spec`` row per image to the processor outputs;
- ``_get_mm_fields_config``: declares that row a per-image field, so it reaches the model with the pixels (and the
  multimodal hash of the request covers it through ``mm_processor_kwargs``: an image cached at one budget is never
  served at another);
- ``_get_prompt_updates``: wraps the stock replacement of each image so its placeholder run holds the number of
  tokens the method keeps (:meth:`placeholder_count`).

Model side (:class:`CompressingModelMixin`): ``embed_multimodal`` pops the per-image rows, groups the images by
spec and calls :meth:`compress_images` per group, in the batch's order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .spec import BUDGET_KEY, CONFIG_KEY, METHOD_KEY, SPEC_FIELD, RequestSpec, decode, encode, resolve

__all__ = ["CompressingProcessorMixin", "CompressingModelMixin", "spec_rows"]


def spec_rows(value, n: int) -> list[RequestSpec]:
    """The per-image specs from the batched ``vtcompress_spec`` field (a ``[n, K]`` tensor or a list of rows)."""
    if value is None:
        return [RequestSpec(None)] * n
    rows = list(value) if not isinstance(value, Tensor) else list(value.reshape(-1, value.shape[-1]))
    if len(rows) != n:
        raise ValueError(f"{len(rows)} vtcompress spec rows for {n} images")
    return [decode(r) for r in rows]


class CompressingProcessorMixin:
    """Mixed in before a vLLM ``BaseMultiModalProcessor`` subclass; see the module docstring."""

    def _vtc_default(self) -> dict | None:
        return getattr(self.info.get_hf_config(), CONFIG_KEY, None)

    def _vtc_spec(self, hf_kwargs: Mapping[str, object]) -> RequestSpec:
        return resolve(self._vtc_default(), dict(hf_kwargs))

    def _vtc_num_images(self, out) -> int:  # pragma: no cover - per model
        raise NotImplementedError

    def placeholder_count(self, full: int, spec: RequestSpec, item_idx: int, out_mm_kwargs) -> int:
        """Placeholder tokens of image ``item_idx`` under ``spec`` (``full`` under the stock model)."""
        raise NotImplementedError  # pragma: no cover - per model

    def _call_hf_processor(self, hf_data, hf_kwargs):
        spec = self._vtc_spec(hf_kwargs)
        kwargs = {k: v for k, v in hf_kwargs.items() if k not in (METHOD_KEY, BUDGET_KEY)}
        out = super()._call_hf_processor(hf_data, kwargs)
        n = self._vtc_num_images(out)
        if n:
            out[SPEC_FIELD] = encode(spec)[None].repeat(n, 1)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[SPEC_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        items = out_mm_kwargs.get("image", []) if hasattr(out_mm_kwargs, "get") else []
        image_id = self._vtc_image_token_id()

        def shorten(orig):
            def replacement(item_idx: int):
                full = orig(item_idx) if callable(orig) else orig
                item = items[item_idx] if item_idx < len(items) else None
                if item is None or SPEC_FIELD not in item:
                    return full  # image embeddings given by the caller: served as they are
                spec = decode(item[SPEC_FIELD].data)
                if spec.method is None:
                    return full
                ids = list(getattr(full, "full", full))
                n_full = sum(1 for t in ids if t == image_id)
                n = self.placeholder_count(n_full, spec, item_idx, items)
                return _replace_run(full, image_id, n)
            return replacement

        return [dataclasses.replace(u, replacement=shorten(u.replacement)) if u.modality == "image" else u
                for u in updates]

    def _vtc_image_token_id(self) -> int:  # pragma: no cover - per model
        raise NotImplementedError


def _replace_run(full, image_id: int, n: int):
    """The stock replacement with its image-token run cut to ``n`` tokens (``PromptUpdateDetails`` kept)."""
    from vllm.multimodal.processing import PromptUpdateDetails

    seq = list(full.full) if isinstance(full, PromptUpdateDetails) else list(full)
    first = seq.index(image_id)
    count = 0
    while first + count < len(seq) and seq[first + count] == image_id:
        count += 1
    if count != sum(1 for t in seq if t == image_id):
        raise ValueError("the stock replacement holds several image-token runs; not supported by the plugin")
    new = seq[:first] + [image_id] * n + seq[first + count:]
    if isinstance(full, PromptUpdateDetails):
        return PromptUpdateDetails.select_token_id(new, embed_token_id=image_id)
    return new


class CompressingModelMixin:
    """Mixed in before a vLLM model class; subclasses implement :meth:`compress_images`."""

    def compress_images(self, image_input, index: list[int], spec: RequestSpec) -> list[Tensor]:
        raise NotImplementedError  # pragma: no cover - per model

    def _vtc_embed(self, image_input, specs: list[RequestSpec]) -> list[Tensor]:
        """Per image embeddings, each group of images with one spec compressed together, in batch order."""
        groups: dict[RequestSpec, list[int]] = {}
        for i, s in enumerate(specs):
            groups.setdefault(s, []).append(i)
        out: list[Tensor | None] = [None] * len(specs)
        for spec, index in groups.items():
            for i, e in zip(index, self.compress_images(image_input, index, spec), strict=True):
                out[i] = e
        return out


def check_count(got: int, expected: int, spec: RequestSpec) -> None:
    """The kept tokens must fill the placeholders fixed at processing time exactly."""
    if got != expected:
        raise RuntimeError(f"{spec.describe()} kept {got} tokens of an image whose prompt holds {expected} "
                           "placeholders; the method's count is not a function of the grid and budget alone")


def stack_rows(rows: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(rows))
