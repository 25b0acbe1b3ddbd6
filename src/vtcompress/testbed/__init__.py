"""The embedded testbed VLM: procedural visual questions and a tiny stock LLaVA trained on them.

>>> from vtcompress.testbed import load_testbed, samples, evaluate
>>> model, tok = load_testbed()
>>> evaluate(model, tok, samples("test", 200))["accuracy"]
"""

from .data import (
    ANSWER_WORDS,
    GRID,
    IMAGE_SIZE,
    N_PATCHES,
    PATCH,
    PREAMBLE,
    SKILLS,
    Sample,
    make_sample,
    samples,
    save_samples_png,
)
from .model import (
    WEIGHTS_DIR,
    answer_token_ids,
    build_prompt,
    build_tokenizer,
    encode,
    evaluate,
    generate_answer,
    load_testbed,
    pixel_values_from_images,
)


def train_main(argv: list[str] | None = None) -> dict:
    """Train the testbed (see ``vtcompress.testbed.train``); imported lazily to keep ``import`` light."""
    from .train import train_main as _train_main

    return _train_main(argv)


__all__ = [
    "ANSWER_WORDS",
    "GRID",
    "IMAGE_SIZE",
    "N_PATCHES",
    "PATCH",
    "PREAMBLE",
    "SKILLS",
    "WEIGHTS_DIR",
    "Sample",
    "answer_token_ids",
    "build_prompt",
    "build_tokenizer",
    "encode",
    "evaluate",
    "generate_answer",
    "load_testbed",
    "make_sample",
    "pixel_values_from_images",
    "samples",
    "save_samples_png",
    "train_main",
]
