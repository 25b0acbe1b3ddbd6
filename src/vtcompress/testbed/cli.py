"""Command lines of the testbed's training: ``vtcompress testbed train`` and ``vtcompress testbed card``.

Argument parsing only; the recipe and the card live in :mod:`vtcompress.testbed.train`.
"""

from __future__ import annotations

import argparse
import json

import torch

from . import train as T
from .train import TrainConfig, train_testbed, write_card

__all__ = ["train_main", "card_main"]


def train_main(argv: list[str] | None = None) -> dict:
    """CLI: ``vtcompress testbed train [--out DIR] [--seed N] [--minutes-s1..4 M | --steps-s1..4 N]``."""
    d = TrainConfig()  # the defaults are the recipe's
    ap = argparse.ArgumentParser(prog="vtcompress testbed train", description=T.__doc__.split("\n")[0])
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--device", default=d.device, help="torch device to train on, e.g. cuda")
    ap.add_argument("--workers", type=int, default=d.workers,
                    help="background processes generating batches (0: in-process, the reproducible CPU default)")
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--max-qa", type=int, default=d.max_qa, help="question/answer pairs packed per training image")
    for i in range(1, 5):
        ap.add_argument(f"--minutes-s{i}", type=float, default=d.minutes[i - 1])
        ap.add_argument(f"--steps-s{i}", type=int, default=d.steps[i - 1], help=f"overrides --minutes-s{i} when > 0")
        ap.add_argument(f"--lr-s{i}", type=float, default=d.lr[i - 1])
    ap.add_argument("--s2-objects-only", type=float, default=d.s2_objects_only,
                    help="share of stage 2 trained on sequences without background patches (see drop_background)")
    ap.add_argument("--init", default=None, help="start from a saved testbed directory (skips no stage)")
    ap.add_argument("--stages", default=d.stages)
    ap.add_argument("--eval-n", type=int, default=d.eval_n)
    opts = vars(ap.parse_args(argv))
    per_stage = {k: tuple(opts.pop(f"{k}_s{i}") for i in range(1, 5)) for k in ("minutes", "steps", "lr")}
    return train_testbed(TrainConfig(**opts, **per_stage))


def card_main(argv: list[str] | None = None) -> int:
    """CLI: ``vtcompress testbed card [--model DIR] [--n 2000]``: evaluate a trained testbed, write card.json."""
    ap = argparse.ArgumentParser(prog="vtcompress testbed card", description=write_card.__doc__.split("\n")[0])
    ap.add_argument("--model", default=TrainConfig.out, help="testbed directory (default: the shipped one)")
    ap.add_argument("--n", type=int, default=2000, help="test questions")
    ap.add_argument("--slice", type=int, default=128, help="size of the test slice the test suite re-checks")
    ap.add_argument("--command", default=None, help="the training command to record (default: keep the card's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = write_card(args.model, args.n, args.slice, args.command)
    print(json.dumps({k: card[k] for k in ("parameters", "test", f"test_slice_{args.slice}")}, indent=1))
    return 0


if __name__ == "__main__":
    train_main()
