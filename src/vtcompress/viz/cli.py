"""``vtcompress show``: the command line of the token maps (argument parsing, testbed samples, checkpoints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from ..compressor import METHODS, list_methods, parse_budget, parse_params
from ..loading import load_model
from .render import open_image, panel_grid
from .runner import DEFAULT_QUESTION, clip_strips, method_panels

__all__ = ["show_main", "default_methods", "default_clip_methods", "DEFAULT_METHODS"]


def _parse_grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--grid {text!r}: expected HxW with positive integers, e.g. 12x12")
    return int(parts[0]), int(parts[1])


def show_main(argv: list[str] | None = None) -> int:
    """``vtcompress show``: draw which tokens a method keeps, merges and drops; write a PNG. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="vtcompress show",
        description="Draw which patches a compression method keeps (outlined), merges (one colour per merged "
        "group) and drops (dimmed) over an image, and write the map as a PNG.",
    )
    parser.add_argument("image", nargs="?", help="input image (PNG/JPEG); omit with --sample")
    parser.add_argument("--method", help="one method (see `vtcompress list`)")
    parser.add_argument("--methods", help="several methods, comma separated: a side-by-side grid")
    parser.add_argument("--budget", default="0.25", help="tokens kept per image (int) or fraction (float); 0.25")
    parser.add_argument("--model", default="testbed", help="'testbed' (default), 'none' (pixel features, no "
                        "model) or a local directory with a saved supported model")
    parser.add_argument("--out", default="token_map.png", help="output PNG (default token_map.png)")
    parser.add_argument("--sample", type=int, help="draw testbed test image N (and ask its question)")
    parser.add_argument("--question", help="prompt for text-guided methods (default: the sample's question with "
                        f"--sample, else the neutral {DEFAULT_QUESTION!r})")
    parser.add_argument("--grid", default="12x12", help="patch grid HxW for --model none (default 12x12)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyper-parameter, repeatable: KEY=VALUE (every method with that field) or "
                        "METHOD.KEY=VALUE (e.g. --param fastv.layer=3)")
    parser.add_argument("--cols", type=int, help="panels per row (default up to 4)")
    parser.add_argument("--cell", type=int, help="pixels per patch side in the map")
    parser.add_argument("--input-panel", action="store_true", help="first panel: the image as the model saw it")
    parser.add_argument("--skip-errors", action="store_true", help="a method that cannot run gets a dimmed panel "
                        "with the reason instead of stopping (always on when no method is named)")
    parser.add_argument("--clip", type=int, metavar="T", help="draw a T-frame testbed clip (one object moving a "
                        "patch per frame, one appearing at frame T//2; --sample N picks its scene seed, default 0) as "
                        "a strip of frames, one strip per method (default methods: the temporal ones); --cols: "
                        "frames per row")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage and the error
        return int(exc.code or 0)
    try:
        path = _show(args)
    except ValueError as exc:
        print(f"vtcompress show: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _show(args) -> Path:
    if args.method and args.methods:
        raise ValueError("give --method NAME or --methods a,b,c, not both")
    if args.clip is not None:
        if args.image is not None:
            raise ValueError("--clip draws a testbed clip; give no IMAGE with it (--sample N picks the scene seed)")
        if isinstance(args.clip, bool) or args.clip < 1 or args.clip > 64:
            raise ValueError(f"--clip {args.clip}: give a number of frames from 1 to 64")
    elif (args.image is None) == (args.sample is None):
        raise ValueError("give an IMAGE path or --sample N (a testbed test image), exactly one of them")
    budget = parse_budget(args.budget)
    grid = _parse_grid(args.grid)
    params = parse_params(args.param)
    named = bool(args.methods or args.method)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    elif args.method:
        methods = [args.method]
    else:
        methods = default_methods() if args.clip is None else default_clip_methods()
    if not methods:
        raise ValueError(f"no method to draw; registered methods: {', '.join(list_methods()) or 'none'}")
    path = Path(args.out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out!r}: the map is written as PNG; give a path ending in .png")
    question = args.question
    if args.clip is not None:
        from ..testbed.data import make_clip

        if args.sample is not None and args.sample < 0:
            raise ValueError(f"--sample {args.sample}: a clip's scene seed is >= 0")
        images = [Image.fromarray(f, "RGB") for f in make_clip(args.clip, args.sample or 0)[0]]
    elif args.sample is not None:
        from ..testbed.data import SKILLS, make_sample, sample_seed

        if args.sample < 0:
            raise ValueError(f"--sample {args.sample} is out of range: a test image index is >= 0")
        s = make_sample(sample_seed("test", args.sample), SKILLS[args.sample % len(SKILLS)])
        image, question = Image.fromarray(s.image, "RGB"), question or s.question
    else:
        image = open_image(args.image)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: give a number of CPU threads >= 1")
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    if args.model == "testbed":
        methods = [_shipped_checkpoint(m, budget, params) for m in methods]
    if args.clip is not None:
        strips = clip_strips(loaded, images, methods, budget, question or DEFAULT_QUESTION, grid, params, args.cell,
                             args.cols, input_strip=args.input_panel, skip_errors=args.skip_errors or not named)
        out = strips[0] if len(strips) == 1 else panel_grid([("", s) for s in strips], 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path, format="PNG")
        return path
    panels = method_panels(loaded, image, methods, budget, question or DEFAULT_QUESTION, grid, params, args.cell,
                           input_panel=args.input_panel, skip_errors=args.skip_errors or not named)
    cols = args.cols if args.cols is not None else min(len(panels), 4)
    out = panel_grid(panels, cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, format="PNG")
    return path


def _shipped_checkpoint(name: str, budget, params: dict):
    """On the testbed: a trainable method whose checkpoint ships for exactly ``budget`` (and that no ``--param``
    configures) is loaded from it; anything else stays a name (a trainable one then needs a checkpoint or
    ``--param pretrained=False``, whose map is titled ``[untrained]``)."""
    import dataclasses

    from ..checkpoints import load_trained, trained_checkpoints

    cls = METHODS.get(name)
    if cls is None or not getattr(cls, "trainable", False):
        return name
    fields = {f.name for f in dataclasses.fields(cls)}
    if any(k.rpartition(".")[0] == name or k in fields for k in params):
        return name
    if any(m == name and b == budget and type(b) is type(budget) for m, b, _ in trained_checkpoints()):
        return load_trained(name, budget)
    return name


#: drawn by ``vtcompress show`` when no method is named (those registered, in this order).
DEFAULT_METHODS = ("random", "uniform", "avg_pool", "tome", "divprune", "visionzip", "prumerge",
                   "fastv", "sparsevlm")


def default_methods() -> list[str]:
    """The methods ``vtcompress show`` draws when none is named: :data:`DEFAULT_METHODS` that are registered."""
    names = set(list_methods())
    return [m for m in DEFAULT_METHODS if m in names]


def default_clip_methods() -> list[str]:
    """The methods ``vtcompress show --clip T`` draws when none is named: the registered temporal methods."""
    return list_methods(family="temporal")
