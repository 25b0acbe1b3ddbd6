"""What runs where: the model families (with their status) and, per family, the stages and kinds of method.

Generated from the two registries, never written by hand: the model families come from
:mod:`vtcompress.models` (one description per family, third-party ones through its entry point group), the
methods from :data:`vtcompress.compressor.METHODS`. A family runs the projector and decoder stages (decoder-stage
methods refuse sliding-window LLMs at apply time) and the encoder stage when its description says that the
vision tower's feature path supports merging inside it; every training-free method of a stage it runs is
available, grouped here by kind (the method families of the taxonomy: transformation, similarity, attention,
query, baseline). Trainable compressors are listed apart: their weights are trained for one model (the shipped
ones for the testbed) and the grid-bound ones (``grid_bound``: learned queries per output cell) for one input
grid, so they run where each view of an image has that grid; methods that widen the features (``widens``) need
a projector trained after them and run on no stock model.

``tests/test_support.py`` holds the table to the test matrix: every family whose status is ``"supported"`` has
a tiny stock model in ``tests/models_util.BUILDERS``, every method of every stage the table claims runs on it
and compresses (a grid-bound trainable one, or refuses a grid it was not built for), and the stages it does
not claim are refused.

Command line::

    vtcompress list --models                  # the table in the terminal
    python -m vtcompress.support --markdown   # the README's table (markdown)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .compressor import FAMILIES, METHODS, Stage

__all__ = ["ModelInfo", "list_models", "stage_kinds", "temporal_methods", "trainable_methods", "widening_methods",
           "support_rows", "support_markdown",
           "markdown_table", "main"]


@dataclass(frozen=True)
class ModelInfo:
    """One model family, as :func:`list_models` reports it.

    Attributes:
        family: its name (``"llava"``, ``"qwen2_vl"``, ...).
        status: ``"supported"`` (held to the test matrix) or ``"experimental"``.
        model_classes: the top-level ``...ForConditionalGeneration`` classes it serves.
        stages: the stages whose methods run on it, in pipeline order.
        videos: its videos go through the projector stage (spatial methods frame by frame, the temporal methods
            across frames).
        video_input: it takes videos at all (without ``videos``, they reach only the decoder stage).
        frames_as_images: its processor gives a video as frames among the images (InternVL); temporal methods
            find them with ``apply(..., processor=)``.
    """

    family: str
    status: str
    model_classes: tuple[str, ...]
    stages: tuple[Stage, ...]
    videos: bool = False
    video_input: bool = False
    frames_as_images: bool = False


def _model_families() -> list[tuple[str, str, tuple[str, ...], bool, str | None]]:
    """``(family, status, model classes, encoder stage, video stage)`` per registered family (the video stage:
    ``"projector"``, ``"decoder"`` when videos reach only the LLM, ``None`` without videos): the ONE place that
    reads the model-family registry of :mod:`vtcompress.models`."""
    from . import models

    listing = getattr(models, "list_families", None)
    if listing is not None:  # the family descriptions' own listing
        return [(f.family, f.status, tuple(f.model_classes), bool(f.encoder_stage),
                 "frames" if getattr(f, "frames_as_images", False) else "projector" if f.video_stage
                 else "decoder" if "video" in f.modalities else None)
                for f in listing()]
    # the adapter registry (every registered adapter is a supported family)
    import importlib

    names = models.supported_families()
    adapters = {a.family: a for a in importlib.import_module(f"{__package__}.models.apply")._ADAPTERS}
    return [(n, "supported", tuple(adapters[n].model_classes), bool(adapters[n].supports_encoder_stage()),
             "projector" if getattr(adapters[n], "video_projector_stage", False) else None) for n in names]


def list_models() -> list[ModelInfo]:
    """Every registered model family with its status and the stages it runs, in registration order."""
    out = []
    for family, status, classes, encoder, videos in _model_families():
        stages = tuple(s for s in Stage if s != Stage.ENCODER or encoder)
        out.append(ModelInfo(family=family, status=status, model_classes=classes, stages=stages,
                             videos=videos in ("projector", "frames"), video_input=videos is not None,
                             frames_as_images=videos == "frames"))
    return out


def _by_kind(keep) -> list[tuple[str, type]]:
    return [(n, c) for n, c in sorted(METHODS.items(), key=lambda kv: (FAMILIES.index(kv[1].family), kv[0]))
            if keep(c)]


def stage_kinds(stage: Stage | str) -> dict[str, list[str]]:
    """The registered training-free methods of ``stage`` acting on images by kind (method family, in taxonomy
    order): ``{kind: [names]}``. The temporal methods (clips only) are :func:`temporal_methods`."""
    stage = Stage(stage)
    out: dict[str, list[str]] = {}
    for name, cls in _by_kind(lambda c: c.stage == stage and not c.trainable and not c.widens and not c.temporal):
        out.setdefault(cls.family, []).append(name)
    return out


def temporal_methods() -> list[str]:
    """The registered temporal methods: they compress videos across frames, on the families whose videos reach
    the projector stage (:attr:`ModelInfo.videos`)."""
    return [n for n, _ in _by_kind(lambda c: c.temporal)]


def widening_methods() -> list[str]:
    """The registered methods whose output features are wider than their input (``widens``): a stock model's LLM
    cannot read them, so they run only before a projector trained for them (e.g. ``pixel_unshuffle`` inside
    ``unshuffle_mlp``)."""
    return [n for n, _ in _by_kind(lambda c: c.widens)]


def trainable_methods() -> dict[str, list[str]]:
    """The registered trainable methods: ``{"any grid": [names], "grid-bound": [names]}`` (``grid_bound``: their
    weights fit one input grid)."""
    out: dict[str, list[str]] = {"any grid": [], "grid-bound": []}
    for name, cls in _by_kind(lambda c: c.trainable):
        out["grid-bound" if getattr(cls, "grid_bound", False) else "any grid"].append(name)
    return out


def _cell(kinds: dict[str, list[str]]) -> str:
    n = sum(len(v) for v in kinds.values())
    return f"{', '.join(kinds)} ({n})" if kinds else "-"


def support_rows() -> list[dict[str, str]]:
    """One row per model family: ``family``, ``status``, ``models``, one column per stage holding the kinds of
    training-free method that run there on images and their count (``"-"`` where the family does not run the
    stage), and ``videos``: what compresses its videos."""
    kinds = {s: stage_kinds(s) for s in Stage}
    return [
        {"family": f"`{m.family}`", "status": m.status, "models": ", ".join(m.model_classes),
         **{str(s): _cell(kinds[s]) if s in m.stages else "-" for s in Stage},
         "videos": (f"frame by frame + temporal ({len(temporal_methods())})"
                   + (", as frames among the images (`processor=`)" if m.frames_as_images else "") if m.videos
                    else "decoder stage only" if m.video_input else "-")}
        for m in list_models()
    ]


#: columns of the support table: row key -> header
COLUMNS = {"family": "family", "status": "status", "models": "model classes",
           **{str(s): f"{s} stage" for s in Stage}, "videos": "videos (projector stage)"}


def support_markdown() -> str:
    """The support table as markdown (the README's), with a line naming the methods of each kind per stage and
    one for the trainable methods."""
    rows = support_rows()
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    lines.append("")
    for s in Stage:
        groups = "; ".join(f"{kind}: {', '.join(f'`{n}`' for n in names)}" for kind, names in stage_kinds(s).items())
        lines.append(f"- {s} stage: {groups or 'none'}")
    temporal = ", ".join(f"`{n}`" for n in temporal_methods())
    lines.append(f"- temporal (videos, across frames; where videos reach the projector stage): {temporal or 'none'}")
    train = trainable_methods()
    names = ", ".join(f"`{n}`" for n in train["any grid"] + train["grid-bound"])
    bound = ", ".join(f"`{n}`" for n in train["grid-bound"])
    lines.append(f"- trainable (projector stage, weights for one model; the shipped ones fit the testbed): {names}"
                 + (f"; {bound} hold weights for one input grid and run where each view has it" if bound else ""))
    wide = ", ".join(f"`{n}`" for n in widening_methods())
    if wide:
        lines.append(f"- {wide}: widens the features, so it runs only before a projector trained for it "
                     "(not on a stock model)")
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, object]], cols: dict[str, str]) -> str:
    """A markdown table of ``rows`` with ``cols`` (key -> header), columns padded for the terminal."""
    widths = {c: max(len(h), *(len(str(r[c])) for r in rows)) for c, h in cols.items()}
    line = "| " + " | ".join(h.ljust(widths[c]) for c, h in cols.items()) + " |"
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(str(r[c]).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def main(argv: list[str] | None = None) -> int:
    """``python -m vtcompress.support [--markdown]``: print the support table."""
    p = argparse.ArgumentParser(prog="python -m vtcompress.support", description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true", help="the README's markdown table and the methods per kind")
    args = p.parse_args(argv)
    if args.markdown:
        print(support_markdown())
        return 0
    print(markdown_table(support_rows(), COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
