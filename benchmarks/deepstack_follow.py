"""What it costs to carry Qwen3-VL's DeepStack levels through a projector-stage method (run on demand).

On a DeepStack model (Qwen3-VL) every level of the vision features follows the image features through the
compression: ``vtcompress.models.pipeline._follow`` runs the method chain once more per level with the features
carrying that level as a forward-mode tangent, plus one run whose tangent is the features themselves (the check
that the methods are linear once decided); a pure selection (the output is the input at the kept slots) gathers
the levels at those slots instead. This script times, interleaved in one run, the projector-stage work
of one image without levels (``_compress_views`` + ``_kept_features``: what every family pays) and the extra
``_follow`` work for ``--levels`` levels, and prints their ratio per method.

Default inputs: one image of 32 x 32 merged tokens (1,024: a 1024 x 1024 px image through Qwen3-VL's 16 px patches
and 2 x 2 merger), D = 2560 (Qwen3-VL-4B's LLM width), 3 levels (Qwen3-VL's ``deepstack_visual_indexes``), keys of
width 64, budget 0.25, float32, one torch thread. CPU time of the process (``time.process_time``) per call, the
median over ``--repeats`` samples, the two sides alternating.

Usage::

    .venv/bin/python benchmarks/deepstack_follow.py            # ~1 min
    .venv/bin/python benchmarks/deepstack_follow.py --side 16 --dim 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtcompress
from vtcompress.models.layout import ImageLayout
from vtcompress.models.pipeline import _compress_views, _follow, _kept_features, _Signals, _views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--dim", type=int, default=2560)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="fastervlm,divprune,tome,visionzip,avg_pool")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = args.side * args.side
    feats = [torch.randn(n, args.dim, generator=g)]
    levels = [[torch.randn(n, args.dim, generator=g)] for _ in range(args.levels)]
    signals = _Signals(attn=[torch.rand(n, 1, generator=g)], keys=[torch.randn(n, 64, generator=g)])
    layouts = [ImageLayout.single((args.side, args.side), n, feats[0].device)]
    print(f"one image, {n} tokens, D = {args.dim}, {args.levels} levels, budget {args.budget}; CPU s per call "
          f"(median of {args.repeats})")
    print(f"{'method':<10} {'main':>8} {'follow':>8} {'follow / main':>14}")
    for name in args.methods.split(","):
        methods = [vtcompress.get(name, budget=args.budget)]
        views = _views(layouts, methods)

        def main_pass(views=views, methods=methods):
            results, _ = _compress_views(None, views, layouts, feats, signals, None, methods)
            return _kept_features(layouts, views, results, feats)[:2]

        new_feats, kept = main_pass()

        def follow_pass(views=views, methods=methods, new_feats=new_feats, kept=kept):
            return _follow(None, views, layouts, feats, signals, methods, levels, new_feats, False, kept)

        times = {"main": [], "follow": []}
        with torch.no_grad():
            main_pass(), follow_pass()  # warm-up
            for _ in range(args.repeats):
                for key, fn in (("main", main_pass), ("follow", follow_pass)):
                    t0 = time.process_time()
                    fn()
                    times[key].append(time.process_time() - t0)
        a, b = statistics.median(times["main"]), statistics.median(times["follow"])
        print(f"{name:<10} {a:8.4f} {b:8.4f} {b / a:14.2f}")


if __name__ == "__main__":
    main()
