"""Bench tables: the rows of a sweep as markdown, CSV and JSON, and :class:`BenchTable`, the result object.

Two kinds of rows share these writers: ``"accuracy"`` rows of the testbed sweep (:func:`vtcompress.bench.run_sweep`:
accuracy per skill, retained, agreement) and ``"fidelity"`` rows of the label-free sweep on any model
(:func:`vtcompress.bench.run`: answer agreement, first-token top-1 agreement and KL to the uncompressed model).
Both carry the cost columns (image tokens, analytic FLOPs, KV-cache bytes, prefill latency ratio).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sweep import FULL

__all__ = ["BenchTable", "CSV_FIELDS", "FIDELITY_CSV_FIELDS", "format_fidelity_table", "format_summary",
           "format_table", "sort_rows", "write_outputs"]


def sort_rows(rows: list[dict], kind: str = "accuracy") -> list[dict]:
    """Full model first, then by budget (largest first), then by quality (best first); skipped rows last.

    Quality: accuracy for testbed rows; for fidelity rows answer agreement, then top-1 agreement, then KL.
    """
    _check_kind(kind)

    def key(r):
        if r["method"] == FULL:
            return (0, 0.0, (0.0,), "")
        b = r["budget_tokens"]
        if r["status"] != "ok":
            q = (1.0,)
        elif kind == "accuracy":
            q = (-r["accuracy"],)
        else:
            q = (-r["answer_match"], -r["top1_match"], r["kl"])
        return (1 if r["status"] == "ok" else 2, -b, q, r["method"])
    return sorted(rows, key=key)


def _fmt(v, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _budget_str(b: int | float | None) -> str:
    if b is None:
        return "100%"
    return f"{b * 100:g}%" if isinstance(b, float) else f"{b} tok"


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_head(head) -> list[str]:
    return [_md_row(head), "|" + "|".join("---" for _ in head) + "|"]


def format_table(rows: list[dict]) -> str:
    """A markdown table of the ``ok`` rows, sorted, then one line per skipped row."""
    ok = [r for r in sort_rows(rows) if r["status"] == "ok"]
    skills = [k[4:] for k in (ok[0] if ok else {}) if k.startswith("acc_")]
    head = ["method", "family", "stage", "budget", "img tok", "avg tok", "acc %", "retained %", "agree %",
            *[s[:5] for s in skills], "GFLOPs", "FLOPs x", "KV x", "latency x"]
    lines = _md_head(head)
    for r in ok:
        tok = _fmt(r["tokens_in"])
        if r.get("prune_layers"):
            tok = f"{tok} -> {_fmt(r['tokens_after'])} @L{r['prune_layers']}"
        cells = [r["method"], r["family"] or "-", r["stage"] or "-", _budget_str(r["budget"]), tok,
                 _fmt(r.get("tokens_avg")), _fmt(100 * r["accuracy"]), _fmt(r.get("retained")),
                 _fmt(r.get("agreement")), *[_fmt(100 * r[f"acc_{s}"], ".0f") for s in skills],
                 _fmt(r.get("gflops"), ".3f"), _fmt(r.get("flops_ratio"), ".2f"), _fmt(r.get("kv_ratio"), ".2f"),
                 _fmt(r.get("latency_ratio"), ".2f")]
        lines.append(_md_row(cells))
    lines += ["", "img tok: image tokens per image into the LLM (-> kept after decoder-stage pruning @ layers); "
              "avg tok: mean over the LLM layers; acc / skill columns: accuracy %; retained: % of full accuracy; "
              "agree: % answers equal to full; GFLOPs: analytic prefill per sample; FLOPs / KV / latency x: "
              "ratio to full (KV cache after prefill; latency: 1 thread, median)."]
    skipped = [r for r in sort_rows(rows) if r["status"] != "ok"]
    if skipped:
        lines.append("")
        lines.append(f"Skipped ({len(skipped)}):")
        lines += [f"- {r['method']} @ {_budget_str(r['budget'])}: {r['status'][len('skipped: '):]}" for r in skipped]
    return "\n".join(lines)


def format_summary(rows: list[dict], at: int | float | None = None, samples: int | None = None) -> str:
    """The README's summary: the full model's accuracy, then one line per method with ``retained`` (% of full
    accuracy) per budget and the FLOPs / latency ratios at budget ``at`` (default 0.11 if swept, else the
    smallest budget), methods sorted by ``retained`` at ``at`` (best first; methods without it last).
    """
    ok = [r for r in rows if r["status"] == "ok" and r["method"] != FULL]
    full = next((r for r in rows if r["method"] == FULL and r["status"] == "ok"), None)
    tokens_of = {r["budget"]: r["budget_tokens"] for r in ok}
    budgets = sorted(tokens_of, key=lambda b: -tokens_of[b])  # largest budget first
    if at is None:
        at = 0.11 if 0.11 in budgets else (budgets[-1] if budgets else None)
    by_method: dict[str, dict] = {}
    for r in ok:
        by_method.setdefault(r["method"], {"family": r["family"], "stage": r["stage"], "rows": {}})["rows"][
            r["budget"]] = r

    def key(item):
        name, m = item
        r = m["rows"].get(at)
        best = max((x.get("retained") or 0.0) for x in m["rows"].values())
        return (r is None, -(r.get("retained") or 0.0) if r else -best, name)

    lines = []
    if full is not None:
        skills = ", ".join(f"{k[4:]} {100 * v:.0f} %" for k, v in full.items() if k.startswith("acc_"))
        on = f" on {samples} test questions" if samples else ""
        n_img = _fmt(full["tokens_in"], ".0f")
        lines += [f"Full model ({n_img} image tokens): **{100 * full['accuracy']:.1f} %**{on} ({skills}).", ""]
    at_s = _budget_str(at) if at is not None else "-"
    head = ["method", "family", "stage", *[_budget_str(b) for b in budgets], f"FLOPs x @ {at_s}",
            f"latency x @ {at_s}"]
    lines += _md_head(head)
    for name, m in sorted(by_method.items(), key=key):
        cells = [_fmt(m["rows"][b].get("retained"), ".0f") if b in m["rows"] else "—" for b in budgets]
        r = m["rows"].get(at, {})
        lines.append(_md_row([name, m["family"], m["stage"], *cells, _fmt(r.get("flops_ratio"), ".2f"),
                              _fmt(r.get("latency_ratio"), ".2f")]))
    return "\n".join(lines)


CSV_FIELDS = ["method", "family", "stage", "budget", "budget_tokens", "status", "tokens_in", "tokens_after",
              "tokens_avg", "prune_layers", "vision_tokens", "accuracy", "retained", "agreement", "gflops",
              "flops_ratio", "kv_kib", "kv_ratio", "latency_ms", "latency_ratio", "eval_s"]


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _csv_fields(rows: list[dict], kind: str) -> list[str]:
    if kind == "fidelity":
        return list(FIDELITY_CSV_FIELDS)
    skill_cols = sorted({k for r in rows for k in r if k.startswith("acc_")})
    cut = CSV_FIELDS.index("accuracy") + 1
    return CSV_FIELDS[:cut] + skill_cols + CSV_FIELDS[cut:]


def _csv_text(rows: list[dict], kind: str) -> str:
    fields = _csv_fields(rows, kind)
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return f.getvalue()


def _json_text(rows: list[dict], meta: dict | None) -> str:
    doc = {"meta": meta or {}, "rows": [{k: _jsonable(v) for k, v in r.items()} for r in rows]}
    return json.dumps(doc, indent=2) + "\n"


def write_outputs(rows: list[dict], out_dir, meta: dict | None = None, plot_png: bool = True,
                  kind: str = "accuracy") -> dict[str, Path]:
    """Write ``bench.md``, ``bench.csv``, ``bench.json`` and (``plot_png``) ``bench.png`` into ``out_dir``; for
    testbed rows (``kind="accuracy"``) also ``summary.md`` (:func:`format_summary`, the README's table).

    Returns the paths by kind (``md``, ``summary``, ``csv``, ``json``, ``png``).
    """
    _check_kind(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sort_rows(rows, kind)
    paths = {"md": out / "bench.md"}
    if kind == "accuracy":
        paths["summary"] = out / "summary.md"
    paths.update(csv=out / "bench.csv", json=out / "bench.json")
    if kind == "accuracy":
        paths["md"].write_text(format_table(rows) + "\n")
        paths["summary"].write_text(format_summary(rows, samples=(meta or {}).get("samples")) + "\n")
    else:
        paths["md"].write_text(format_fidelity_table(rows, meta) + "\n")
    with paths["csv"].open("w", newline="") as f:
        f.write(_csv_text(rows, kind))
    paths["json"].write_text(_json_text(rows, meta))
    if plot_png:
        from .plot import plot, plot_fidelity

        paths["png"] = (plot if kind == "accuracy" else plot_fidelity)(rows, out / "bench.png")
    return paths


# ----------------------------------------------------------------------------------------------- fidelity rows

FIDELITY_CSV_FIELDS = ["method", "family", "stage", "budget", "budget_tokens", "status", "tokens_in", "tokens_after",
                       "tokens_avg", "prune_layers", "answer_match", "top1_match", "kl", "gflops", "flops_ratio",
                       "kv_kib", "kv_ratio", "latency_ms", "latency_ratio", "eval_s"]


def format_fidelity_table(rows: list[dict], meta: dict | None = None) -> str:
    """A markdown table of label-free rows (:func:`vtcompress.bench.run`), sorted, then one line per skipped row.

    FLOP cells read ``n/a`` where :mod:`vtcompress.bench.flops` does not model the family (``meta["flops"]``
    says why).
    """
    rows = sort_rows(rows, "fidelity")
    ok = [r for r in rows if r["status"] == "ok"]
    no_flops = ok and all(r.get("gflops") is None for r in ok)
    na = "n/a" if no_flops else "-"
    head = ["method", "family", "stage", "budget", "img tok", "avg tok", "answer = %", "top-1 = %", "KL",
            "GFLOPs", "FLOPs x", "KV x", "latency x"]
    lines = _md_head(head)
    for r in ok:
        tok = _fmt(r["tokens_in"])
        if r.get("prune_layers"):
            tok = f"{tok} -> {_fmt(r['tokens_after'])} @L{r['prune_layers']}"
        gflops = _fmt(r.get("gflops"), ".3f") if r.get("gflops") is not None else na
        ratio = _fmt(r.get("flops_ratio"), ".2f") if r.get("flops_ratio") is not None else na
        lines.append(_md_row([
            r["method"], r["family"] or "-", r["stage"] or "-", _budget_str(r["budget"]), tok,
            _fmt(r.get("tokens_avg")), _fmt(100 * r["answer_match"]), _fmt(100 * r["top1_match"]),
            _fmt(r.get("kl"), ".4f"), gflops, ratio, _fmt(r.get("kv_ratio"), ".2f"),
            _fmt(r.get("latency_ratio"), ".2f")]))
    legend = ("img tok: image tokens per image into the LLM (-> kept after decoder-stage pruning @ layers); avg tok: "
              "mean over the LLM layers; answer =: % of greedy answers equal to the uncompressed model's; top-1 =: % "
              "of first answer tokens equal; KL: mean KL(full || method) of the first-token distribution (nats); "
              "GFLOPs: analytic prefill per sample; FLOPs / KV / latency x: ratio to full (KV cache after prefill; "
              "latency: prefill of one batch timed in turns with full, median).")
    lines += ["", legend]
    note = (meta or {}).get("flops")
    if no_flops and isinstance(note, str):
        lines.append(f"FLOPs {note}")
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}):"]
        lines += [f"- {r['method']} @ {_budget_str(r['budget'])}: {r['status'][len('skipped: '):]}" for r in skipped]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the result object

KINDS = ("accuracy", "fidelity")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")


@dataclass
class BenchTable:
    """The result of a sweep: one dict per row, the settings it ran with, and its kind.

    Attributes:
        rows: the uncompressed model's row (``method="full"``) first, then one per method x budget, each with
            ``method``, ``family``, ``stage``, ``budget``, ``budget_tokens``, ``status`` (``"ok"`` or
            ``"skipped: <why>"``) and, when ok, the measurements: for ``kind="fidelity"`` ``answer_match``,
            ``top1_match`` (fractions in [0, 1]), ``kl`` (nats), for ``kind="accuracy"`` ``accuracy``, ``acc_<skill>``,
            ``retained`` and ``agreement`` (%), and for both ``tokens_in``, ``tokens_after``, ``tokens_avg``,
            ``prune_layers``, ``gflops`` / ``flops_ratio`` (``None`` where FLOPs are not modelled), ``kv_kib`` /
            ``kv_ratio``, ``latency_ms`` / ``latency_ratio`` (``None`` without timing).
        meta: settings and the versions of vtcompress, transformers and torch.
        kind: ``"fidelity"`` (label-free, any model) or ``"accuracy"`` (testbed questions).
    """

    rows: list[dict]
    meta: dict = field(default_factory=dict)
    kind: str = "fidelity"

    def __post_init__(self) -> None:
        _check_kind(self.kind)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def row(self, method: str, budget=None) -> dict:
        """The row of ``method`` at ``budget`` (``"full"``: the uncompressed model); ``KeyError`` if absent."""
        for r in self.rows:
            if r["method"] == method and (method == FULL or r["budget"] == budget):
                return r
        raise KeyError(f"no row for method={method!r}, budget={budget!r}")

    def to_markdown(self) -> str:
        """The table printed by ``vtcompress bench`` (and written to ``bench.md``)."""
        return format_table(self.rows) if self.kind == "accuracy" else format_fidelity_table(self.rows, self.meta)

    def to_csv(self, path=None) -> str:
        """The rows as CSV (sorted as the table); also written to ``path`` if given."""
        text = _csv_text(sort_rows(self.rows, self.kind), self.kind)
        if path is not None:
            with Path(path).open("w", newline="") as f:  # the csv module's own line endings, as written
                f.write(text)
        return text

    def to_json(self, path=None) -> str:
        """``{"meta": ..., "rows": [...]}`` as JSON (non-finite numbers as null); also written to ``path``."""
        text = _json_text(sort_rows(self.rows, self.kind), self.meta)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, path) -> Path:
        """``path``: quality vs image tokens, vs FLOPs ratio and vs latency ratio (:mod:`vtcompress.bench.plot`)."""
        from .plot import plot, plot_fidelity

        return (plot if self.kind == "accuracy" else plot_fidelity)(self.rows, path)

    def write(self, out_dir, plot: bool = True) -> dict[str, Path]:
        """Every output file into ``out_dir`` (:func:`write_outputs`); returns their paths by kind."""
        return write_outputs(self.rows, out_dir, self.meta, plot_png=plot, kind=self.kind)
