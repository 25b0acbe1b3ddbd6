"""The embedded testbed VLM: procedural visual questions and a tiny stock LLaVA trained on them.

>>> from vtcompress.testbed import load_testbed, samples, evaluate
>>> model, tok = load_testbed()
>>> evaluate(model, tok, samples("test", 200))["accuracy"]

The video (clip) testbed, a stock LLaVA-OneVision built from the same weights:

>>> from vtcompress.testbed import load_clip_testbed, clip_samples, evaluate_clips
>>> model, tok = load_clip_testbed()
>>> evaluate_clips(model, tok, clip_samples("test", 70, frames=8))["accuracy"]
"""

from .clip_model import (
    CLIP_WEIGHTS_DIR,
    encode_clips,
    evaluate_clips,
    load_clip_testbed,
    video_token_count,
)
from .clips import CLIP_SKILLS, ClipSample, clip_questions, clip_samples, make_clip_sample
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
    """Train the testbed (see ``vtcompress.testbed.train``); returns the recipe (a dict). Imported lazily to keep
    ``import`` light."""
    from .cli import train_main as _train_main

    return _train_main(argv)


def train_cli(argv: list[str] | None = None) -> int:
    """``vtcompress testbed train``: :func:`train_main`, returning exit code 0 once the weights are written."""
    train_main(argv)
    return 0


def sample_main(argv: list[str] | None = None) -> int:
    """``vtcompress testbed sample``: write a grid of testbed samples (image, question, answer) to a PNG and print
    each sample's skill, question and answer. Returns the exit code."""
    import argparse
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="vtcompress testbed sample",
                                     description="Write a grid of testbed samples (image, question, answer) to a PNG.")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="default test")
    parser.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skill", help=f"only this skill: {', '.join(SKILLS)}")
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--out", default="testbed_samples.png", help="output PNG (default testbed_samples.png)")
    args = parser.parse_args(argv)
    try:
        if args.n < 1 or args.cols < 1:
            raise ValueError(f"--n {args.n} / --cols {args.cols}: give counts >= 1")
        if args.skill is not None and args.skill not in SKILLS:
            raise ValueError(f"--skill {args.skill!r} is not a skill; valid: {', '.join(SKILLS)}")
        if not args.out.lower().endswith(".png"):
            raise ValueError(f"--out {args.out!r}: the grid is written as PNG; give a path ending in .png")
        picked = samples(args.split, args.n, seed=args.seed, skill=args.skill)
    except ValueError as exc:
        print(f"vtcompress testbed sample: error: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_samples_png(picked, args.out, cols=args.cols)
    for s in picked:
        print(f"[{s.skill}] {s.question} -> {s.answer}")
    print(f"wrote {args.out}")
    return 0


__all__ = [
    "ANSWER_WORDS",
    "CLIP_SKILLS",
    "CLIP_WEIGHTS_DIR",
    "ClipSample",
    "clip_questions",
    "clip_samples",
    "encode_clips",
    "evaluate_clips",
    "load_clip_testbed",
    "make_clip_sample",
    "video_token_count",
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
    "sample_main",
    "samples",
    "save_samples_png",
    "train_cli",
    "train_main",
]
