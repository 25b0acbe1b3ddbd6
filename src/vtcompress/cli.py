"""Command line: ``vtcompress list | show | bench | testbed {train,sample,train-compressor,card}``.

Each sub-command lives with the code it drives; this module only dispatches, importing lazily so that
``vtcompress list`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, function taking argv and returning an exit code, one-line help)
_COMMANDS = {
    "show": ("vtcompress.viz", "show_main", "draw which tokens a method keeps, merges and drops"),
    "bench": ("vtcompress.bench.report", "bench_main", "accuracy vs tokens vs time for every method (main job)"),
}
_TESTBED = {
    "train": ("vtcompress.testbed.train", "train_main", "train the embedded testbed VLM from scratch"),
    "sample": ("vtcompress.testbed.data", "sample_main", "write a grid of testbed samples to a PNG"),
    "train-compressor": ("vtcompress.testbed.train_compressor", "train_compressor_main",
                         "fine-tune a trainable compressor on the testbed"),
    "card": ("vtcompress.testbed.train", "card_main", "evaluate a trained testbed and write its card.json"),
}


def _table(rows: list[dict[str, object]], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |"
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(str(r[c]).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def list_main(argv: list[str] | None = None) -> int:
    """Print the registered methods: name, family, stage, trainable, paper."""
    from .compressor import method_info

    parser = argparse.ArgumentParser(prog="vtcompress list", description="List the registered methods.")
    parser.add_argument("--stage", choices=["encoder", "projector", "decoder"])
    parser.add_argument("--family")
    args = parser.parse_args(argv)
    rows = [r for r in method_info()
            if (args.stage is None or r["stage"] == args.stage) and (args.family is None or r["family"] == args.family)]
    if not rows:
        print("no method matches", file=sys.stderr)
        return 1
    for r in rows:
        r["trainable"] = "yes" if r["trainable"] else "no"
    print(_table(rows, ["name", "family", "stage", "trainable", "needs", "paper"]))
    return 0


def _dispatch(table: dict[str, tuple[str, str, str]], name: str, argv: list[str]) -> int:
    module, func, _ = table[name]
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "vtcompress {list,show,bench,testbed} [options]   (vtcompress COMMAND -h for each)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("  list      the registered methods (name, family, stage, trainable, paper)")
        for name, (_, _, help_) in _COMMANDS.items():
            print(f"  {name:<9} {help_}")
        print("  testbed   " + "; ".join(f"{k}: {v[2]}" for k, v in _TESTBED.items()))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "list":
        return list_main(rest)
    if cmd in _COMMANDS:
        return _dispatch(_COMMANDS, cmd, rest)
    if cmd == "testbed":
        if not rest or rest[0] not in _TESTBED:
            got = rest[0] if rest else "nothing"
            print(f"vtcompress testbed: unknown sub-command {got!r}; valid: {', '.join(_TESTBED)}", file=sys.stderr)
            return 2
        return _dispatch(_TESTBED, rest[0], rest[1:])
    print(f"vtcompress: unknown command {cmd!r}; valid: list, {', '.join(_COMMANDS)}, testbed", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
