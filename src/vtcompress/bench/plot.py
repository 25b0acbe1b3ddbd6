"""Bench plots: quality (testbed accuracy, or fidelity to the uncompressed model) against cost.

Each method keeps one look in every panel and every plot: the colour family of its method family
(transformation, similarity, attention, query, baseline; shades within a family), a marker of its own, and a
dashed line for decoder-stage methods (which put every image token into the first LLM layers). Panels: image
tokens kept, analytic prefill FLOPs relative to the uncompressed model, and measured prefill latency relative to
it (a panel says "n/a" where a cost could not be measured).
"""

from __future__ import annotations

from pathlib import Path

from .sweep import FULL, build_method

__all__ = ["method_styles", "plot", "plot_fidelity", "write_gallery"]


#: per method family: a colour map (methods of the family take shades of it) and markers (cycled within it)
FAMILY_STYLE: dict[str, tuple[str, str]] = {
    "transformation": ("Blues", "sphP"),
    "similarity": ("Greens", "o8H*"),
    "attention": ("Reds", "^v<>"),
    "query": ("Purples", "Dd"),
    "temporal": ("YlOrBr", "sovD^"),
    "baseline": ("Greys", "xX+1"),
}
_OTHER = ("Oranges", "ps*h")


def method_styles(rows: list[dict]) -> dict[str, dict]:
    """A matplotlib style per method of ``rows`` (the full row excluded): colour from its family's map, a marker
    distinct within the family, dashed lines for decoder-stage methods."""
    import matplotlib

    by_family: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        if r["method"] != FULL:
            entry = (r["method"], r.get("stage") or "")
            fam = by_family.setdefault(r.get("family") or "", [])
            if entry not in fam:
                fam.append(entry)
    styles = {}
    for family, members in by_family.items():
        cmap_name, markers = FAMILY_STYLE.get(family, _OTHER)
        cmap = matplotlib.colormaps[cmap_name]
        members = sorted(members)
        for i, (name, stage) in enumerate(members):
            shade = 0.9 - 0.45 * (i / max(len(members) - 1, 1))  # dark to mid: every shade stays visible on white
            styles[name] = {"color": cmap(shade), "marker": markers[i % len(markers)], "ms": 6, "lw": 1.4,
                            "ls": "--" if stage == "decoder" else "-",
                            "label": f"{name} ({family or 'other'}{', decoder' if stage == 'decoder' else ''})",
                            "mec": "k", "mew": 0.4}
    return styles


def _lines(ax, ok: list[dict], styles: dict, x_key: str, y_of) -> bool:
    """One line per method through its budgets (ordered by image tokens kept); returns whether anything was drawn."""
    drawn = False
    for name, style in styles.items():
        pts = sorted((r for r in ok if r["method"] == name), key=lambda r: r["tokens_avg"])
        xy = [(r[x_key], y_of(r)) for r in pts if r.get(x_key) is not None]
        if xy:
            ax.plot([x for x, _ in xy], [y for _, y in xy], **style)
            drawn = True
    return drawn


def _not_available(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _panels(rows: list[dict], path, quality: list[tuple[str, object, float]], title: str) -> Path:
    """Rows x 3 panels: each quality (label, value of a row, value of the full model) vs image tokens kept, FLOPs
    ratio and latency ratio."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    full = next((r for r in ok if r["method"] == FULL), None)
    styles = method_styles(ok)
    fig, axes = plt.subplots(len(quality), 3, figsize=(16, 5 * len(quality)), squeeze=False)
    cols = [("tokens_avg", "image tokens kept per image (mean over LLM layers)", "no row ran"),
            ("flops_ratio", "analytic prefill FLOPs / full",
             "analytic prefill FLOPs: n/a\n(not modelled for this model family)"),
            ("latency_ratio", "measured prefill latency / full", "prefill latency: n/a\n(not timed)")]
    for (label, y_of, y_full), ax_row in zip(quality, axes, strict=True):
        for (x_key, x_label, missing), ax in zip(cols, ax_row, strict=True):
            drawn = _lines(ax, ok, styles, x_key, y_of)
            if full is not None and full.get(x_key) is not None:
                ax.axhline(y_full, color="k", lw=1, ls=":", label="full (no compression)")
                ax.plot([full[x_key]], [y_full], "k*", ms=11)
            if not drawn:
                _not_available(ax, missing)
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        ax = ax_row[0]
        if full is not None and ok:
            ax.set_xscale("log")
            top = max(r["tokens_avg"] for r in ok)
            # round ticks, none crowding the full model's count at the right end
            ticks = sorted({t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000) if 1.6 * t <= top}
                           | {round(top)})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.85, 0.97))
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.855, 0.5), fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(rows: list[dict], path) -> Path:
    """Testbed rows: accuracy vs image tokens kept, vs analytic FLOPs ratio and vs latency ratio."""
    full = next((r for r in rows if r["method"] == FULL and r["status"] == "ok"), None)
    y_full = 100 * full["accuracy"] if full is not None else 0.0
    return _panels(rows, path, [("testbed accuracy (%)", lambda r: 100 * r["accuracy"], y_full)],
                   "testbed accuracy vs cost, per method x budget")


def plot_fidelity(rows: list[dict], path) -> Path:
    """Label-free rows: answer agreement and first-token top-1 agreement with the uncompressed model (%), each vs
    image tokens kept, vs analytic FLOPs ratio (n/a where not modelled) and vs latency ratio."""
    return _panels(rows, path, [("greedy answers equal to full (%)", lambda r: 100 * r["answer_match"], 100.0),
                                ("first token equal to full (%)", lambda r: 100 * r["top1_match"], 100.0)],
                   "fidelity to the uncompressed model vs cost, per method x budget")


def write_gallery(model, tokenizer, sample, rows: list[dict], budget, path, params: dict | None = None) -> Path | str:
    """``gallery.png``: every method that ran at ``budget`` on one testbed image (:func:`vtcompress.viz.gallery`).

    Returns the path, or a string saying why no gallery was written.
    """
    try:
        from ..viz import gallery
    except ImportError:  # the seam: viz.gallery is optional for the bench
        return "vtcompress.viz.gallery is not available"
    names = [r["method"] for r in rows if r["status"] == "ok" and r["budget"] == budget and r["method"] != FULL]
    if not names:
        return f"no method ran at budget {budget}"
    methods = [build_method(n, budget, **(params or {}).get(n, {})) for n in names]
    methods = [m for m in methods if not isinstance(m, str)]
    try:
        img = gallery(model, tokenizer, sample.image, methods, budget, question=sample.question)
    except Exception as e:  # the gallery is a by-product: report, do not fail the sweep
        return f"gallery failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    path = Path(path)
    img.save(path)
    return path

