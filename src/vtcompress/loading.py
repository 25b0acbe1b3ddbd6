"""Loading a VLM for the command lines and the bench: the shipped testbed, a saved model directory, or none.

One loader (:func:`load_model`) for ``vtcompress show``, ``vtcompress bench`` and the scripts: it returns a
:class:`LoadedModel` holding the model and what builds its inputs (a processor, or for testbed-style models a
tokenizer and the tower's square image size).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadedModel", "load_hf_model", "load_model", "load_processor"]


@dataclass
class LoadedModel:
    """A model ready to compress one image, and how to build its inputs.

    Attributes:
        model: a stock ``...ForConditionalGeneration`` in eval mode.
        tokenizer: testbed-style tokenizer (no processor): images are resized to ``image_size`` and normalised
            like ``vtcompress.testbed.encode``.
        processor: the model's ``AutoProcessor``, used instead when present.
        image_size: square input side of the vision tower (tokenizer route).
        name: where it came from, for messages.
        untrained: the model has random weights (``load_model(..., untrained_ok=True)`` without shipped weights):
            whatever it scores is chance level, and reports say so.
    """

    model: Any
    tokenizer: Any = None
    processor: Any = None
    image_size: int | None = None
    name: str = ""
    untrained: bool = False


def load_model(spec: str | Path | None = "testbed", device: str = "cpu", *,
               untrained_ok: bool = False) -> LoadedModel | None:
    """``"testbed"`` (or ``None``: the shipped weights), ``"none"`` (no model: pixel patches are the features), or
    a local directory holding a saved supported model (``from_pretrained``), with an ``AutoProcessor`` or, for a
    testbed-style directory, just a tokenizer.

    Without shipped testbed weights ``"testbed"`` raises, unless ``untrained_ok``: then it warns on stderr and
    returns an UNTRAINED testbed of the same architecture (random weights, ``untrained=True``) so that a
    pipeline runs before weights ship. A path that is not a model directory raises ``ValueError`` naming it.
    """
    if spec is None:
        spec = "testbed"
    if spec == "none":
        return None
    if spec == "testbed":
        from .testbed.model import WEIGHTS_DIR, build_model, build_tokenizer, load_testbed

        if not (WEIGHTS_DIR / "config.json").is_file():
            if not untrained_ok:
                raise ValueError(
                    f"the testbed weights are not installed ({WEIGHTS_DIR} has no config.json); train them with "
                    "`vtcompress testbed train`, or pass --model DIR (a saved model) or --model none"
                )
            print("vtcompress: WARNING: no packaged testbed weights found; using an UNTRAINED testbed (random "
                  "weights): accuracies are chance level", file=sys.stderr)
            tok = build_tokenizer()
            tok.padding_side = "left"
            model = build_model(tok).to(device).eval()
            return LoadedModel(model, tokenizer=tok, image_size=int(model.config.vision_config.image_size),
                               name="untrained testbed (random weights)", untrained=True)
        model, tok = load_testbed(device=device)
        return LoadedModel(model, tokenizer=tok, image_size=int(model.config.vision_config.image_size),
                           name="packaged testbed")
    path = Path(spec)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"--model {str(spec)!r}: expected 'testbed', 'none' or a local directory with a saved model (config.json)"
        )
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    has_processor = any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    if has_processor:
        model, processor, name = load_hf_model(str(path), device)
        return LoadedModel(model, processor=processor, name=name)
    model = AutoModelForImageTextToText.from_pretrained(str(path)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    vision = getattr(model.config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{str(spec)!r} has no processor config and its vision config gives no square image_size")
    return LoadedModel(model, tokenizer=tok, image_size=size, name=str(path))


def load_processor(spec: str):
    """``AutoProcessor.from_pretrained(spec)`` (a directory or a Hub id); its tokenizer alone where no processor
    is saved (a testbed-style model)."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(spec)
    except (OSError, ValueError):  # no image processor saved: the tokenizer, if there is one, says the rest
        return AutoTokenizer.from_pretrained(spec)


def load_hf_model(spec: str, device: str = "cpu", dtype: str = "auto"):
    """A supported model and its processor from a directory or a Hub id: ``(model, processor, description)``.

    ``dtype``: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"`` or ``"float16"``. A model without an
    image processor must be testbed-style (its tokenizer then encodes as the testbed does).
    """
    from transformers import AutoModelForImageTextToText

    from .bench.fidelity import has_image_processing
    from .bench.sweep import is_testbed_style
    from .models import adapter_for

    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype!r}; allowed: {', '.join(dtypes)}")
    path = Path(spec)
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"--model {spec!r}: no config.json there (expected a directory saved by save_pretrained, "
                         "or a Hugging Face Hub id)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtypes[dtype])
    except OSError as e:  # neither a local directory nor a reachable Hub id
        raise ValueError(f"--model {spec!r} is not a local directory and could not be loaded as a Hub id: "
                         f"{' '.join(str(e).split())[:300]}") from None
    model = model.to(device).eval()
    adapter_for(model)  # an unsupported family: one message with the supported ones
    processor = load_processor(spec)
    if not has_image_processing(processor) and not is_testbed_style(model.config):
        raise ValueError(
            f"--model {spec!r}: AutoProcessor gave a {type(processor).__name__} with no image processor; save the "
            "model's processor next to it (processor.save_pretrained(DIR)); the Qwen2-VL / Qwen2.5-VL processors "
            "also need torchvision installed")
    return model, processor, str(spec)
