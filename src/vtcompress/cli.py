"""Command line: ``vtcompress list | show | bench | testbed {train,train-clips,sample,train-compressor,card}``.

Each sub-command lives with the code it drives; this module only dispatches, importing lazily so that
``vtcompress list`` stays fast. Every sub-command returns an exit code (``-h`` / ``--help`` included).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, function taking argv and returning an exit code, one-line help)
_COMMANDS = {
    "show": ("vtcompress.viz", "show_main", "draw which tokens a method keeps, merges and drops"),
    "bench": ("vtcompress.bench.cli", "bench_main",
              "quality vs tokens vs FLOPs vs time for every method: testbed accuracy, or fidelity on any model"),
}
_TESTBED = {
    "train": ("vtcompress.testbed", "train_cli", "train the embedded testbed VLM from scratch"),
    "train-clips": ("vtcompress.testbed.train_clips", "train_clips_main",
                    "fine-tune the video (clip) testbed from the image testbed; writes clip_weights/"),
    "sample": ("vtcompress.testbed", "sample_main", "write a grid of testbed samples to a PNG"),
    "train-compressor": ("vtcompress.testbed.train_compressor_cli", "train_compressor_main",
                         "fine-tune a trainable compressor on the testbed"),
    "card": ("vtcompress.testbed.cli", "card_main", "evaluate a trained testbed and write its card.json"),
}
#: columns of ``vtcompress list`` (keys of :func:`vtcompress.method_info`) and their headers.
_LIST_COLUMNS = {"name": "method", "family": "family", "stage": "stage", "trainable": "trainable", "needs": "needs",
                 "matches_reference": "matches reference", "paper": "paper"}


def version() -> str:
    """The installed distribution's version (the package's ``__version__`` when not installed)."""
    try:
        from importlib.metadata import version as _version

        return _version("vtcompress")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a source tree)
        from . import __version__

        return __version__


def list_main(argv: list[str] | None = None) -> int:
    """Print the registered methods as a markdown table: name, family, stage, trainable, needs, matches reference,
    paper; with ``--models`` the support table (model family x stage x kind of method, :mod:`vtcompress.support`).
    An unknown ``--stage`` / ``--family`` is an error listing the valid values."""
    from .compressor import FAMILIES, STAGES, list_methods, method_info
    from .support import markdown_table

    parser = argparse.ArgumentParser(prog="vtcompress list", description="List the registered methods, or with "
                                     "--models the model families and what runs on each.")
    parser.add_argument("--stage", help=f"only this stage: {', '.join(STAGES)}")
    parser.add_argument("--family", help=f"only this family: {', '.join(FAMILIES)}")
    parser.add_argument("--models", action="store_true", help="the model families: status, model classes and the "
                        "kinds of method each stage runs on them")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    if args.models:
        from .support import COLUMNS, support_rows

        if args.stage or args.family:
            print("vtcompress list: error: --models lists every model family; --stage / --family filter methods",
                  file=sys.stderr)
            return 2
        print(markdown_table(support_rows(), COLUMNS))
        return 0
    try:
        names = set(list_methods(stage=args.stage, family=args.family))
    except ValueError as exc:
        print(f"vtcompress list: error: {exc}", file=sys.stderr)
        return 2
    rows = [dict(r) for r in method_info() if r["name"] in names]
    if not rows:
        print("no method matches", file=sys.stderr)
        return 1
    for r in rows:
        r["trainable"] = "yes" if r["trainable"] else ""
        r["name"] = f"`{r['name']}`"
    print(markdown_table(rows, _LIST_COLUMNS))
    return 0


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 2


def _dispatch(table: dict[str, tuple[str, str, str]], name: str, argv: list[str]) -> int:
    module, func, _ = table[name]
    try:
        rc = getattr(importlib.import_module(module), func)(argv)
    except SystemExit as exc:  # argparse's -h / usage errors: an exit code, not an exception, for main([...])
        return _exit_code(exc)
    if rc is None:
        return 0
    if isinstance(rc, bool) or not isinstance(rc, int):
        raise TypeError(f"{module}.{func} returned {type(rc).__name__}, not an exit code")
    return rc


def _testbed_usage() -> str:
    lines = ["usage: vtcompress testbed {" + ",".join(_TESTBED) + "} [options]   (vtcompress testbed COMMAND -h)"]
    lines += [f"  {k:<17} {v[2]}" for k, v in _TESTBED.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: vtcompress {list,show,bench,testbed} [options]   (vtcompress COMMAND -h for each; --version)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("  list      the registered methods (name, family, stage, trainable, matches reference, paper); "
              "--models: the model families and what runs on each")
        for name, (_, _, help_) in _COMMANDS.items():
            print(f"  {name:<9} {help_}")
        print("  testbed   " + "; ".join(f"{k}: {v[2]}" for k, v in _TESTBED.items()))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"vtcompress {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "list":
        return list_main(rest)
    if cmd in _COMMANDS:
        return _dispatch(_COMMANDS, cmd, rest)
    if cmd == "testbed":
        if rest and rest[0] in ("-h", "--help"):
            print(_testbed_usage())
            return 0
        if not rest or rest[0] not in _TESTBED:
            got = rest[0] if rest else "nothing"
            print(f"vtcompress testbed: unknown sub-command {got!r}; valid: {', '.join(_TESTBED)}", file=sys.stderr)
            print(_testbed_usage(), file=sys.stderr)
            return 2
        return _dispatch(_TESTBED, rest[0], rest[1:])
    import difflib

    valid = ["list", *_COMMANDS, "testbed"]
    close = difflib.get_close_matches(cmd, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    print(f"vtcompress: unknown command {cmd!r}; valid: {', '.join(valid)}{hint}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
