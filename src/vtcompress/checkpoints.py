"""Checkpoints of methods: a local directory per compressor, and the ones shipped with the package.

::

    <dir>/config.json        {"method": ..., "fields": {budget, hidden_size, grid, ...}, "format_version": 1}
    <dir>/model.safetensors  the weights (float32; trainable methods only)

Training-free methods save their fields only (``Compressor.save_pretrained``); trainable ones
(:class:`~vtcompress.trainable.TrainableCompressor`) their weights too. Checkpoints trained on the embedded
testbed ship in ``vtcompress/trained/<method>-<budget>/``: list them with :func:`trained_checkpoints`, load one
with :func:`load_trained` ``(method, budget)`` or ``Compressor.from_pretrained("qformer-0.25")``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .compressor import Compressor, method_class
from .trainable import TrainableCompressor, loading_checkpoint

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "jsonable",
    "trained_checkpoints",
    "load_trained",
    "TRAINED_DIR",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
#: checkpoints shipped with the package: ``trained/<method>-<budget>/``.
TRAINED_DIR = Path(__file__).resolve().parent / "trained"


def jsonable(v: Any) -> Any:
    """A field value as ``config.json`` stores it (tuples as lists; :func:`from_pretrained` turns them back)."""
    return list(v) if isinstance(v, tuple) else v


def save_pretrained(compressor: Compressor, path: str | os.PathLike) -> Path:
    """Write ``compressor`` to the local directory ``path``: ``config.json`` (+ ``model.safetensors`` if trainable).

    A trainable compressor must be built (weights exist) first. Returns the directory.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(compressor, TrainableCompressor):
        if not compressor.built:
            raise ValueError(
                f"{compressor.name} has no weights yet (hidden_size={compressor.hidden_size}, grid={compressor.grid}): "
                "pass hidden_size and grid, or call it once on features, before save_pretrained"
            )
        fields = compressor.config()
    else:
        fields = {f.name: jsonable(getattr(compressor, f.name)) for f in dataclasses.fields(compressor)}
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"method": compressor.name, "format_version": FORMAT_VERSION, "fields": fields}
    if isinstance(compressor, TrainableCompressor):
        cfg["out_grid"] = list(compressor.out_grid)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in compressor.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "method": compressor.name})
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    shipped = TRAINED_DIR / str(path)
    if not p.is_absolute() and (shipped / CONFIG_NAME).is_file():
        return shipped
    names = ", ".join(f"{m}-{b}" for m, b, _ in trained_checkpoints()) or "none"
    raise ValueError(
        f"no checkpoint at {str(path)!r} (a local directory with {CONFIG_NAME} is needed; nothing is downloaded); "
        f"shipped checkpoints: {names}"
    )


def from_pretrained(path: str | os.PathLike, budget: int | float | None = None, hidden_size: int | None = None,
                    device: str | torch.device | None = None, expect_cls: type | None = None) -> Compressor:
    """Load a compressor saved by :func:`save_pretrained` from a local directory (or a shipped name such as
    ``"qformer-0.25"``).

    ``budget`` / ``hidden_size``, when given, are what the caller needs: a checkpoint for another value raises a
    ``ValueError`` naming both. The loaded module is in eval mode.
    """
    from safetensors.torch import load_file

    p = _resolve(path)
    cfg = json.loads((p / CONFIG_NAME).read_text())
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p / CONFIG_NAME}: format_version={cfg.get('format_version')!r}; this vtcompress reads "
                         f"{FORMAT_VERSION}")
    name = cfg.get("method")
    try:
        cls = method_class(name)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    if expect_cls is not None and expect_cls not in (Compressor, TrainableCompressor) and cls is not expect_cls:
        raise ValueError(f"{p} holds a {name!r} checkpoint, not {getattr(expect_cls, 'name', expect_cls.__name__)!r}")
    fields = dict(cfg["fields"])
    for k, v in fields.items():
        if isinstance(v, list):
            fields[k] = tuple(v)
    if budget is not None and (budget != fields.get("budget") or type(budget) is not type(fields.get("budget"))):
        raise ValueError(
            f"checkpoint {p} was trained for budget={fields.get('budget')!r}, but budget={budget!r} was asked for: "
            "train one for that budget (vtcompress testbed train-compressor METHOD --budget B)"
        )
    if hidden_size is not None and "hidden_size" in fields and hidden_size != fields["hidden_size"]:
        raise ValueError(
            f"checkpoint {p} was trained for hidden size D={fields.get('hidden_size')}, but D={hidden_size} was "
            "asked for: a checkpoint only fits models with the hidden size it was trained on"
        )
    fields.pop("pretrained", None)
    with loading_checkpoint():
        comp = cls(**fields)
    if isinstance(comp, TrainableCompressor):
        state = load_file(str(p / WEIGHTS_NAME))
        comp.load_state_dict(state, strict=True)
        comp.eval()
        if device is not None:
            comp.to(device)
    return comp


def trained_checkpoints() -> list[tuple[str, int | float, Path]]:
    """Shipped checkpoints as ``(method, budget, directory)``, sorted."""
    out = []
    if TRAINED_DIR.is_dir():
        for d in sorted(TRAINED_DIR.iterdir()):
            cfg_path = d / CONFIG_NAME
            if cfg_path.is_file():
                cfg = json.loads(cfg_path.read_text())
                out.append((cfg["method"], cfg["fields"]["budget"], d))
    return out


def load_trained(method: str, budget: int | float, device: str | torch.device | None = None) -> Compressor:
    """The shipped testbed checkpoint of ``method`` at ``budget`` (``ValueError`` listing what is shipped)."""
    for m, b, d in trained_checkpoints():
        if m == method and b == budget and type(b) is type(budget):
            return from_pretrained(d, device=device)
    names = ", ".join(f"{m}@{b}" for m, b, _ in trained_checkpoints()) or "none"
    raise ValueError(f"no shipped checkpoint for method={method!r} at budget={budget!r}; shipped: {names}")
