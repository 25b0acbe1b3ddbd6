"""``vtcompress bench``: the command line of the sweeps (argument parsing, model loading, output files).

Two modes, chosen by what is measured against:

* the embedded testbed (no ``--model``, or ``--model DIR`` of a testbed-style LLaVA, without ``--images``): every
  method x budget on labelled testbed questions -- accuracy (per skill), retained and agreement, tokens, FLOPs,
  KV cache, latency (:func:`vtcompress.bench.run_sweep`); ``make demo`` runs this;
* any supported model (``--model DIR_OR_ID --images DIR [--prompts FILE]``): no labels; fidelity to the
  uncompressed model (greedy-answer agreement, first-token top-1 agreement and KL) and the same costs
  (:func:`vtcompress.bench.run`).

Both write ``bench.md`` (also printed), ``bench.csv``, ``bench.json`` (settings, versions and rows) and
``bench.png`` into ``--out``; the testbed mode adds ``summary.md`` and ``gallery.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..loading import load_hf_model, load_processor
from .plot import write_gallery
from .sweep import DEFAULT_BUDGETS, DEFAULT_SAMPLES, check_params, geometry, method_class, run_sweep
from .table import write_outputs
from .video import VIDEO_BUDGETS, VIDEO_FRAMES

__all__ = ["bench_main", "load_hf_model", "load_model", "load_processor"]


def load_model(path=None):
    """The testbed model and tokenizer: ``path``, else the packaged weights, else (with a warning) an UNTRAINED
    testbed of the same architecture (random weights, so that the pipeline runs before weights ship).

    Returns ``(model, tokenizer, description)``.
    """
    from ..testbed import WEIGHTS_DIR, build_tokenizer, load_testbed
    from ..testbed.model import build_model

    if path is not None:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"--model {path!r}: no config.json there (expected a directory saved by save_pretrained)")
        _check_testbed_geometry(path)
        model, tok = load_testbed(path)
        return model, tok, str(path)
    if (WEIGHTS_DIR / "config.json").is_file():
        model, tok = load_testbed()
        return model, tok, "packaged testbed"
    print("vtcompress bench: WARNING: no packaged testbed weights found; using an UNTRAINED testbed (random "
          "weights): accuracies are chance level", file=sys.stderr)
    tok = build_tokenizer()
    return build_model(tok).eval(), tok, "untrained testbed (random weights)"


def _check_testbed_geometry(path) -> None:
    """Without ``--images``, ``--model`` must be testbed-style: the bench asks the testbed's questions about its
    96 px scenes."""
    import json

    from ..testbed import IMAGE_SIZE, PATCH

    got = geometry(json.loads((Path(path) / "config.json").read_text()))
    if got != ("llava", IMAGE_SIZE, PATCH):
        raise ValueError(
            f"--model {str(path)!r} is not a testbed-style model (model_type, image_size, patch_size = {got}; the "
            f"testbed's labelled questions are about {IMAGE_SIZE} px scenes, so they need ('llava', {IMAGE_SIZE}, "
            f"{PATCH})): pass --images DIR (and --prompts FILE) to measure fidelity to the uncompressed model on "
            "your own images")


def _parse_budgets(text: str) -> list[int | float]:
    from ..compressor import parse_budget

    out = [parse_budget(p, "--budgets:") for p in (p.strip() for p in text.split(",")) if p]
    if not out:
        raise ValueError("--budgets is empty; e.g. --budgets 0.5,0.11")
    return out


def _parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """``--param METHOD.KEY=VALUE`` items (the grammar of :func:`vtcompress.compressor.parse_params`), per method
    swept. The bench sweeps several methods, so a key names its method."""
    from ..compressor import parse_params

    out: dict[str, dict] = {}
    for key, value in parse_params(items).items():
        name, _, field = key.partition(".")
        if not field:
            raise ValueError(f"--param {key}={value!r}: expected METHOD.KEY=VALUE, e.g. fastv.layer=1")
        if name not in methods:
            raise ValueError(f"--param {key}={value!r}: method {name!r} is not among the methods swept")
        out.setdefault(name, {})[field] = value
    for name, kw in out.items():
        check_params(name, kw)
    return out


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive int is allowed")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vtcompress bench",
        description="Every method x budget vs the uncompressed model. On the embedded testbed (default): accuracy "
                    "on its labelled questions. On any supported model (--model DIR_OR_ID --images DIR): fidelity "
                    "(greedy-answer agreement, first-token top-1 / KL). Both: image tokens, FLOPs, KV cache, "
                    "latency. Writes bench.md/csv/json/png (testbed: also summary.md and gallery.png).")
    p.add_argument("--model", help="a saved model directory or a Hugging Face Hub id (default: the packaged "
                                   "testbed); without --images it must be testbed-style")
    p.add_argument("--images", help="a folder of images: measure fidelity to the uncompressed model on them")
    p.add_argument("--prompts", help="with --images: a text file, one prompt per image in file-name order (or a "
                                     "single line for every image)")
    p.add_argument("--prompt", default=None, help="with --images: the prompt of every image (default: "
                                                  "'Describe the image in one sentence.')")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method; with "
                                     "--images every training-free one)")
    p.add_argument("--budgets", default=None,
                   help="comma-separated budgets: fractions of the image tokens in (0, 1] or ints (default "
                        f"{','.join(str(b) for b in DEFAULT_BUDGETS)}; with --video fractions of the clip's tokens "
                        f"or ints per clip, default {','.join(str(b) for b in VIDEO_BUDGETS)})")
    p.add_argument("--video", action="store_true",
                   help="the clip testbed: every method that compresses clips (temporal ones across frames, "
                        "feature-only spatial ones frame by frame) on labelled clip questions; writes "
                        "bench_video.md/json/png")
    p.add_argument("--frames", default=",".join(str(t) for t in VIDEO_FRAMES),
                   help="with --video: comma-separated clip lengths (default %(default)s)")
    p.add_argument("--samples", type=_positive, default=None,
                   help=f"testbed: test samples (default {DEFAULT_SAMPLES}); with --images: the first N images "
                        "(default all)")
    p.add_argument("--out", default="results", help="output directory (default %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="evaluation batch size (default 32 on the testbed, 4 with --images)")
    p.add_argument("--seed", type=int, default=0, help="testbed: test-set seed (default %(default)s)")
    p.add_argument("--max-new-tokens", type=_positive, default=24,
                   help="with --images: greedy answer length compared (default %(default)s)")
    p.add_argument("--device", default="cpu", help="with --images: torch device of the model (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="with --images: auto (the checkpoint's), float32, bfloat16 or "
                                                   "float16 (default %(default)s)")
    p.add_argument("--latency-batch", type=_positive, default=None,
                   help="samples in the timed batch (default 8 on the testbed, 4 with --images)")
    p.add_argument("--repeats", type=_positive, default=5, help="timed repeats per row (default %(default)s)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch threads per process on CPU (default %(default)s)")
    p.add_argument("--workers", type=_positive, default=min(2, os.cpu_count() or 1),
                   help="testbed: processes evaluating accuracy in parallel; latency is timed alone "
                        "(default %(default)s)")
    p.add_argument("--gallery-budget", type=lambda x: _parse_budgets(x)[0], default=None,
                   help="testbed: budget of gallery.png (default: 0.22 if swept, else the middle budget)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method hyper-parameter, e.g. fastv.layer=1 (repeatable)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency timing")
    p.add_argument("--no-plot", action="store_true", help="write no PNGs")
    return p


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of ``vtcompress bench`` (see the module docstring); returns the exit code."""
    from ..compressor import list_methods

    args = _parser().parse_args(argv)
    try:
        default = VIDEO_BUDGETS if args.video else DEFAULT_BUDGETS
        budgets = _parse_budgets(args.budgets if args.budgets is not None else ",".join(str(b) for b in default))
        valid = list_methods()
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        elif args.images:  # trainable methods' shipped weights are the testbed's: they cannot run elsewhere
            methods = [m for m in valid if not method_class(m).trainable and not method_class(m).temporal]
        else:  # the testbed's images have no time axis: the temporal methods are for videos
            methods = [m for m in valid if not method_class(m).temporal]
        bad = [m for m in methods if m not in valid]
        if bad:
            raise ValueError(f"--methods: unknown {', '.join(bad)}; valid names: {', '.join(sorted(valid))}")
        if args.video:
            from .video import clip_methods, video_main

            methods = methods if args.methods else clip_methods()
            return video_main(args, methods, budgets, _parse_params(args.param, methods))
        params = _parse_params(args.param, methods)
        if not args.images:
            for flag in ("prompts", "prompt"):
                if getattr(args, flag) is not None:
                    raise ValueError(f"--{flag} needs --images DIR (the testbed asks its own questions)")
            return _bench_testbed(args, methods, budgets, params)
        return _bench_images(args, methods, budgets, params)
    except ValueError as e:
        print(f"vtcompress bench: {e}", file=sys.stderr)
        return 2


def _bench_testbed(args, methods, budgets, params) -> int:
    from ..testbed import samples as make_samples
    from .fidelity import versions

    model, tok, desc = load_model(args.model)
    n = args.samples or DEFAULT_SAMPLES
    batch_size, latency_batch = args.batch_size or 32, args.latency_batch or 8
    test = make_samples("test", n, seed=args.seed)
    t0 = time.perf_counter()
    rows = run_sweep(model, tok, methods, budgets, test, batch_size=batch_size, latency_batch=latency_batch,
                     repeats=args.repeats, num_threads=args.threads, time_latency=not args.no_latency,
                     workers=args.workers, params=params)
    meta = {
        "model": desc, "params": params, "samples": n, "seed": args.seed, "budgets": budgets,
        "methods": methods,
        "batch_size": batch_size, "latency_batch": latency_batch, "repeats": args.repeats,
        "threads": args.threads, "workers": args.workers, **versions(),
        "seconds": round(time.perf_counter() - t0, 1),
        "flops": "analytic prefill FLOPs per sample, lm_head on the last position (vtcompress.bench.flops)",
    }
    paths = write_outputs(rows, args.out, meta, plot_png=not args.no_plot)
    table = paths["md"].read_text()
    print(f"vtcompress bench — {desc}, {n} test samples, {meta['seconds']} s\n")
    print(table)
    if not args.no_plot:
        gb = args.gallery_budget
        if gb is None:
            gb = 0.22 if 0.22 in budgets else budgets[len(budgets) // 2]
        g = write_gallery(model, tok, test[0], rows, gb, Path(args.out) / "gallery.png", params=params)
        paths["gallery"] = g if isinstance(g, Path) else None
        if not isinstance(g, Path):
            print(f"gallery.png not written: {g}", file=sys.stderr)
    print("wrote " + ", ".join(str(v) for v in paths.values() if v is not None), file=sys.stderr)
    return 0


def _bench_images(args, methods, budgets, params) -> int:
    from .fidelity import DEFAULT_PROMPT, load_samples, run

    if args.prompts is not None and args.prompt is not None:
        raise ValueError("--prompts and --prompt: give one of them")
    samples = load_samples(args.images, args.prompts, args.prompt or DEFAULT_PROMPT, limit=args.samples)
    if args.model is None:
        model, processor, desc = load_model(None)
    else:
        model, processor, desc = load_hf_model(args.model, device=args.device, dtype=args.dtype)
    table = run(model, processor, methods, budgets, samples, params=params, batch_size=args.batch_size or 4,
                max_new_tokens=args.max_new_tokens, latency_batch=args.latency_batch or 4, repeats=args.repeats,
                num_threads=args.threads, time_latency=not args.no_latency,
                meta={"model": desc, "images": str(args.images), "prompts": args.prompts})
    paths = table.write(args.out, plot=not args.no_plot)
    print(f"vtcompress bench — {desc}, {len(samples)} images, fidelity to the uncompressed model, "
          f"{table.meta['seconds']} s\n")
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(v) for v in paths.values()), file=sys.stderr)
    return 0
