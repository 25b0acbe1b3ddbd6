"""``vtcompress testbed train-compressor METHOD --budget B``: the command line of
:mod:`vtcompress.testbed.train_compressor` (argument parsing, loading the testbed, saving the checkpoint)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..checkpoints import TRAINED_DIR
from ..compressor import get, list_methods, method_info, parse_budget, parse_params
from ..loading import load_model
from . import data as D
from .model import build_model, build_tokenizer
from .train_compressor import evaluate_compressor, testbed_grid, train_compressor

__all__ = ["train_compressor_main"]


def _load_model(args):
    if args.random_testbed:
        tok = build_tokenizer()
        return build_model(tok, seed=args.seed).eval(), tok, "random-init testbed (development only)"
    try:
        loaded = load_model(args.testbed or "testbed")
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"cannot load the testbed weights ({e}); train them first (vtcompress testbed train) or pass "
            "--random-testbed to develop on a randomly initialised testbed-shaped model"
        ) from None
    return loaded.model, loaded.tokenizer, str(args.testbed or "shipped testbed")


def train_compressor_main(argv: list[str] | None = None) -> int:
    """Entry point of ``vtcompress testbed train-compressor METHOD --budget B``."""

    trainable = [r["name"] for r in method_info() if r["trainable"]]
    parser = argparse.ArgumentParser(prog="vtcompress testbed train-compressor",
                                     description="Fine-tune a trainable compressor on the testbed (the rest frozen).")
    parser.add_argument("method", help=f"one of: {', '.join(trainable)}")
    parser.add_argument("--budget", required=True, help="tokens per image (int) or fraction in (0, 1]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-projector", action="store_true",
                        help="also fine-tune the model's projector (saved to projector.safetensors beside it)")
    parser.add_argument("--distill", type=float, default=0.0,
                        help="weight in [0, 1] of a KL loss to the uncompressed model's answer distribution")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a method hyper-parameter, e.g. --param num_layers=1 (repeatable)")
    parser.add_argument("--out", help="checkpoint directory (default: the package's trained/METHOD-BUDGET)")
    parser.add_argument("--testbed", help="testbed weights directory (default: the shipped weights)")
    parser.add_argument("--random-testbed", action="store_true", help="use a random-init testbed (development)")
    parser.add_argument("--eval", type=int, default=500, metavar="N", help="test-split questions to score (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.method not in trainable:
        known = set(list_methods())
        what = "is not trainable" if args.method in known else "is not a registered method"
        print(f"train-compressor: {args.method!r} {what}; trainable methods: {', '.join(trainable)}", file=sys.stderr)
        return 2
    try:
        budget = parse_budget(args.budget)
        params = parse_params(args.param)
        get(args.method, budget=budget, seed=args.seed, pretrained=False, **{"grid": (1, 1), **params})  # fail fast
    except ValueError as e:
        print(f"train-compressor: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, source = _load_model(args)
    # training starts from random weights: asked for explicitly (pretrained=False)
    compressor = get(args.method, budget=budget, seed=args.seed, pretrained=False,
                     **{"hidden_size": model.config.text_config.hidden_size, "grid": testbed_grid(model), **params})
    hist = train_compressor(model, tok, compressor, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, train_projector=args.train_projector, distill=args.distill,
                            progress=not args.no_progress)
    out = Path(args.out) if args.out else TRAINED_DIR / f"{args.method}-{budget}"
    compressor.save_pretrained(out)
    if args.train_projector:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
        save_file(state, str(out / "projector.safetensors"))
    first = sum(hist["losses"][:20]) / max(1, len(hist["losses"][:20]))
    last = sum(hist["losses"][-20:]) / max(1, len(hist["losses"][-20:]))
    report = {"method": args.method, "budget": budget, "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "seed": args.seed, "train_projector": args.train_projector, "distill": args.distill,
              "testbed": source,
              "loss_first20": round(first, 4), "loss_last20": round(last, 4),
              "train_seconds": round(hist["seconds"], 1)}
    print(f"{args.method}@{budget}: loss {first:.3f} -> {last:.3f} in {hist['seconds']:.0f}s; saved to {out}")
    if args.eval > 0:
        res = evaluate_compressor(model, tok, compressor, D.samples("test", args.eval, seed=0))
        report["test_accuracy"] = round(res["accuracy"], 4)
        report["test_n"] = args.eval
        report["per_skill"] = {k: round(v, 4) for k, v in res["per_skill"].items()}
        print(f"test accuracy ({args.eval} questions): {res['accuracy']:.3f}  per skill: "
              + ", ".join(f"{k} {v:.2f}" for k, v in res["per_skill"].items()))
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_compressor_main())
