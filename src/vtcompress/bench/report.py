"""``vtcompress bench``: every applicable method x budgets on the embedded testbed — accuracy, tokens, FLOPs, time.

For each registered method and budget (default 50 %, 33 %, 22 %, 11 %, 5 % of the 144 image tokens) one row:

* ``tokens_in``: image tokens per image that enter the LLM, measured from the shortened inputs; for
  decoder-stage methods also ``tokens_after``, the image tokens kept from the pruning layer(s) on
  (``prune_layers``), and ``tokens_avg``, the image tokens per image averaged over the decoder layers (the
  x-axis of the plot: it puts decoder-stage and projector-stage methods on the same scale of LLM work);
* ``accuracy`` overall and per skill on the testbed test set, ``retained`` (% of the uncompressed model's
  accuracy) and ``agreement`` (% of answers equal to the uncompressed model's);
* ``gflops``: analytic prefill FLOPs per sample of exactly what ran (:mod:`vtcompress.bench.flops`: the tokens
  the probe saw in the tower and in every decoder layer; each sample at its own unpadded length, ``lm_head``
  on the last position), and ``flops_ratio`` vs the uncompressed model; ``kv_kib`` / ``kv_ratio``: the KV
  cache a prefill leaves (bf16 / fp16 values), shorter from a decoder-stage pruning layer on;
* ``latency_ratio``: measured prefill time of one fixed batch vs the uncompressed model timed in the same run
  (1 torch thread, median of repeats; :mod:`vtcompress.bench.latency`).

Methods that cannot run (a trainable method without a shipped checkpoint for that budget, a budget a method's
structure cannot produce, an error) become ``status = "skipped: <why>"`` rows: listed under the table, kept in
the CSV / JSON, never dropped silently.

Outputs (``--out``, default ``results/``): ``bench.md`` (the table printed on stdout), ``bench.csv``,
``bench.json`` (settings + rows), ``bench.png`` (accuracy vs image tokens kept, one line per method; accuracy
vs latency ratio) and ``gallery.png`` (one testbed image, every method at one budget, via
:func:`vtcompress.viz.gallery`).

Library use::

    from vtcompress.bench import run_sweep, write_outputs
    rows = run_sweep(model, tok, ["fastv", "visionzip"], [0.5, 0.11], samples("test", 200))
    write_outputs(rows, "results/")
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_SAMPLES",
    "build_method",
    "run_sweep",
    "sort_rows",
    "format_table",
    "write_outputs",
    "plot",
    "write_gallery",
    "load_model",
    "bench_main",
]

DEFAULT_BUDGETS: tuple[float, ...] = (0.5, 0.33, 0.22, 0.11, 0.05)
DEFAULT_SAMPLES = 300
FULL = "full"


# ----------------------------------------------------------------------------------------------- methods


def build_method(name: str, budget: int | float, **params):
    """The method ``name`` at ``budget``, or a string saying why it cannot run on the testbed.

    Trainable methods load the shipped testbed checkpoint for exactly that budget
    (:func:`vtcompress.trainable.load_trained`); the others are built with :func:`vtcompress.get`.
    """
    from ..compressor import METHODS as _REGISTRY
    from ..compressor import get

    if name not in _REGISTRY:
        get(name)  # raises ValueError with the valid names
    cls = _REGISTRY[name]
    if getattr(cls, "trainable", False):
        from ..checkpoints import load_trained

        _check_params(name, params)
        try:
            method = load_trained(name, budget)
        except ValueError as e:
            return f"trainable, no checkpoint: {e}"
        if getattr(method, "untrained", False):  # never report random weights as a trained method's results
            return "trainable, untrained weights: not benchmarked"
        return method
    _check_params(name, params)
    try:
        return get(name, budget=budget, **params)
    except ValueError as e:
        return f"budget not supported: {e}"


def _check_params(name: str, params: dict) -> None:
    """A misspelt hyper-parameter is the caller's error (raise), not a budget the method cannot meet."""
    from ..compressor import METHODS as _REGISTRY

    cls = _REGISTRY[name]
    if params and getattr(cls, "trainable", False):
        raise ValueError(f"{name} is trainable: its hyper-parameters come from its checkpoint; got {params}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}; its parameters: "
                         f"{', '.join(sorted(fields))}")


def _skill_names(samples) -> list[str]:
    from ..testbed import SKILLS

    present = {s.skill for s in samples}
    return [k for k in SKILLS if k in present]


def _row(name: str, cls, budget, n0: int) -> dict:
    return {
        "method": name,
        "family": getattr(cls, "family", "") if cls is not None else "",
        "stage": getattr(cls, "stage", "") if cls is not None else "",
        "budget": budget,
        "budget_tokens": n0 if budget is None else (budget if isinstance(budget, int) else max(1, round(budget * n0))),
    }


# the model, tokenizer and samples a forked evaluation worker inherits (set just before the pool starts)
_WORKER: dict = {}


def _evaluate_job(job: tuple[int, str | None, int | float | None]) -> tuple[int, dict | str]:
    """Evaluate one ``(index, method name, budget)``; a string result says why it could not run."""
    from .quality import evaluate_method

    i, name, budget = job
    w = _WORKER
    method = None
    if name is not None:
        method = build_method(name, budget, **w["params"].get(name, {}))
        if isinstance(method, str):
            return i, method
    t0 = time.perf_counter()
    try:
        res = evaluate_method(w["model"], w["tokenizer"], method, w["samples"], batch_size=w["batch_size"],
                              arch=w["arch"])
    except Exception as e:  # a method that fails on this model is reported, never dropped
        if name is None:
            raise
        return i, f"error {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    res.pop("correct", None)
    res["eval_s"] = time.perf_counter() - t0
    return i, res


def _worker_init(num_threads: int) -> None:
    torch.set_num_threads(num_threads)


def run_sweep(
    model,
    tokenizer,
    methods: Sequence[str],
    budgets: Sequence[int | float],
    samples,
    batch_size: int = 32,
    latency_batch: int = 8,
    repeats: int = 5,
    num_threads: int = 1,
    progress: bool = True,
    time_latency: bool = True,
    workers: int = 1,
    ref_every: int = 10,
    params: dict[str, dict] | None = None,
) -> list[dict]:
    """Evaluate the uncompressed model and every ``method x budget`` on ``samples``; one dict per row.

    The first row is the uncompressed model (``method="full"``). Rows of methods that cannot run carry
    ``status="skipped: ..."`` and no measurements. ``params`` gives hyper-parameters per method name
    (``{"fastv": {"layer": 1}}``).

    Two phases: (1) accuracy and token counts of every run, in ``workers`` forked processes (each with
    ``num_threads`` torch threads: tiny ops are slower with more threads on small CPUs); (2) latency, alone
    in this process so that nothing competes with the timed runs: the median of ``repeats`` timed prefills of
    the first ``latency_batch`` samples; the uncompressed model is timed first, again after every
    ``ref_every`` timed methods and at the end, and the median of all its times is the reference (so a slow
    drift of the machine over the sweep does not tilt the ratios).
    """
    from tqdm.auto import tqdm

    from ..compressor import METHODS as _REGISTRY
    from ..compressor import load_builtin_methods as _load_builtin_methods
    from ..testbed import encode
    from .flops import VLMArch
    from .latency import threads, time_prefill

    _load_builtin_methods()
    unknown = [m for m in methods if m not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid names: {', '.join(sorted(_REGISTRY))}")
    if not samples:
        raise ValueError("samples is empty: pass at least one testbed sample")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: a positive int is allowed")
    try:
        arch = VLMArch.from_config(model.config)
        n0 = arch.image_tokens
    except ValueError:
        arch, n0 = None, int(getattr(model.config, "image_seq_length", 0) or 0)
    skills = _skill_names(samples)

    jobs = [(0, None, None)] + [(i + 1, m, b) for i, (m, b) in enumerate((m, b) for m in methods for b in budgets)]
    results: dict[int, dict | str] = {}
    bar = tqdm(total=len(jobs) * (2 if time_latency else 1), desc="bench", unit="run", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    params = dict(params or {})
    stray = sorted(set(params) - set(methods))
    if stray:
        raise ValueError(f"params given for {', '.join(stray)}, which is not among the methods swept")
    for name, kw in params.items():  # bad parameter names fail now, with the valid list
        _check_params(name, kw)
    _WORKER.update(model=model, tokenizer=tokenizer, samples=samples, batch_size=batch_size, arch=arch,
                   params=params)
    try:
        with threads(num_threads):
            # the reference first, here: a method that fails on the uncompressed model is a real error
            results[0] = _evaluate_job(jobs[0])[1]
            bar.update()
            bar.set_postfix_str("accuracy")
            import multiprocessing as mp

            on_cpu = next(model.parameters()).device.type == "cpu"  # forked CUDA contexts do not work
            if workers > 1 and len(jobs) > 2 and on_cpu and "fork" in mp.get_all_start_methods():

                # fork: the workers share the loaded model copy-on-write (no reload, no pickling of weights)
                with mp.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(num_threads,)) as pool:
                    for i, res in pool.imap_unordered(_evaluate_job, jobs[1:]):
                        results[i] = res
                        bar.update()
            else:
                for job in jobs[1:]:
                    results[job[0]] = _evaluate_job(job)[1]
                    bar.update()
    finally:
        _WORKER.clear()

    latency: dict[int, float] = {}
    full_times: list[float] = []
    if time_latency:
        enc = encode(tokenizer, samples[:latency_batch], model.config)
        lat_inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        bar.set_postfix_str("latency")
        timed = 0
        for i, name, budget in jobs:
            if isinstance(results[i], str):
                bar.update()
                continue
            if name is not None and timed and timed % ref_every == 0:  # re-time the reference now and then
                full_times += time_prefill(model, lat_inputs, None, repeats=repeats, num_threads=num_threads)["times_s"]
            timed += 1
            method = build_method(name, budget, **params.get(name, {})) if name is not None else None
            try:
                t = time_prefill(model, lat_inputs, method, repeats=repeats, num_threads=num_threads)
            except Exception as e:  # ran on the test set, but not on this batch: say so in the row
                results[i] = f"error while timing {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                bar.update()
                continue
            if name is None:
                full_times += t["times_s"]
            latency[i] = t["median_s"]
            bar.update()
        # the reference is timed again at the end: drift over the sweep averages out
        full_times += time_prefill(model, lat_inputs, None, repeats=repeats, num_threads=num_threads)["times_s"]
    bar.close()

    full_res = results[0]
    rows: list[dict] = []
    for i, name, budget in jobs:
        cls = _REGISTRY.get(name) if name else None
        row = _row(name or FULL, cls, budget, n0)
        res = results[i]
        if isinstance(res, str):
            rows.append({**row, "status": f"skipped: {res}"})
            continue
        agree = float(np.mean([p == q for p, q in zip(res["predictions"], full_res["predictions"], strict=True)]))
        row.update({
            "status": "ok",
            "tokens_in": res["tokens_in"],
            "tokens_after": res["tokens_after"],
            "tokens_avg": res["tokens_avg"],
            "prune_layers": ",".join(str(k) for k in res["prune_layers"]),
            "vision_tokens": res["vision_tokens"][-1] if res["vision_tokens"] else None,
            "accuracy": res["accuracy"],
            **{f"acc_{k}": res["per_skill"].get(k, float("nan")) for k in skills},
            "agreement": 100.0 * agree,
            "gflops": res["flops"] / 1e9 if res["flops"] is not None else None,
            "kv_kib": res["kv_bytes"] / 1024 if res["kv_bytes"] is not None else None,
            "latency_ms": 1e3 * latency[i] if i in latency else None,
            "eval_s": res["eval_s"],
        })
        rows.append(row)
    _finish_ratios(rows, float(np.median(full_times)) if full_times else None)
    return rows


def _finish_ratios(rows: list[dict], full_latency_s: float | None) -> None:
    full = rows[0]
    acc0, fl0 = full["accuracy"], full.get("gflops")
    if full_latency_s is not None:
        full["latency_ms"] = 1e3 * full_latency_s
    for r in rows:
        if r["status"] != "ok":
            continue
        r["retained"] = 100.0 * r["accuracy"] / acc0 if acc0 > 0 else float("nan")
        r["flops_ratio"] = r["gflops"] / fl0 if r.get("gflops") is not None and fl0 else None
        kv0 = full.get("kv_kib")
        r["kv_ratio"] = r["kv_kib"] / kv0 if r.get("kv_kib") is not None and kv0 else None
        lat = r.get("latency_ms")
        r["latency_ratio"] = lat / full["latency_ms"] if lat is not None and full.get("latency_ms") else None


# ----------------------------------------------------------------------------------------------- outputs


def sort_rows(rows: list[dict]) -> list[dict]:
    """Full model first, then by budget (largest first), then by accuracy (best first); skipped rows last."""
    def key(r):
        if r["method"] == FULL:
            return (0, 0.0, 0.0, "")
        b = r["budget_tokens"]
        acc = r.get("accuracy") if r["status"] == "ok" else -1.0
        return (1 if r["status"] == "ok" else 2, -b, -acc, r["method"])
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


def write_outputs(rows: list[dict], out_dir, meta: dict | None = None, plot_png: bool = True) -> dict[str, Path]:
    """Write ``bench.md``, ``summary.md`` (:func:`format_summary`, the README's table), ``bench.csv``,
    ``bench.json`` and (``plot_png``) ``bench.png`` into ``out_dir``.

    Returns the paths by kind (``md``, ``summary``, ``csv``, ``json``, ``png``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sort_rows(rows)
    paths = {"md": out / "bench.md", "summary": out / "summary.md", "csv": out / "bench.csv",
             "json": out / "bench.json"}
    paths["md"].write_text(format_table(rows) + "\n")
    paths["summary"].write_text(format_summary(rows, samples=(meta or {}).get("samples")) + "\n")
    skill_cols = sorted({k for r in rows for k in r if k.startswith("acc_")})
    cut = CSV_FIELDS.index("accuracy") + 1
    fields = CSV_FIELDS[:cut] + skill_cols + CSV_FIELDS[cut:]
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    doc = {"meta": meta or {}, "rows": [{k: _jsonable(v) for k, v in r.items()} for r in rows]}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    if plot_png:
        paths["png"] = plot(rows, out / "bench.png")
    return paths


def plot(rows: list[dict], path) -> Path:
    """Two panels: accuracy vs image tokens kept (one line per method), accuracy vs latency ratio."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    full = next((r for r in ok if r["method"] == FULL), None)
    methods = sorted({r["method"] for r in ok if r["method"] != FULL})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    cmap = plt.get_cmap("tab20")
    markers = "os^vD<>ph*XP"
    for i, name in enumerate(methods):
        pts = sorted((r for r in ok if r["method"] == name), key=lambda r: r["tokens_avg"])
        style = {"color": cmap(i % 20), "marker": markers[i % len(markers)], "ms": 4, "lw": 1.2, "label": name}
        if pts[0]["stage"] == "decoder":
            style["ls"] = "--"
        ax1.plot([r["tokens_avg"] for r in pts], [100 * r["accuracy"] for r in pts], **style)
        # the same budget order in both panels: each line follows the method's budget sweep
        lat = [(r["latency_ratio"], 100 * r["accuracy"]) for r in pts if r.get("latency_ratio") is not None]
        if lat:
            ax2.plot([a for a, _ in lat], [b for _, b in lat], **style)
    if full is not None:
        for ax in (ax1, ax2):
            ax.axhline(100 * full["accuracy"], color="k", lw=1, ls=":", label="full (no compression)")
        ax1.plot([full["tokens_in"]], [100 * full["accuracy"]], "k*", ms=10)
        if full.get("latency_ratio") is not None:
            ax2.plot([1.0], [100 * full["accuracy"]], "k*", ms=10)
    ax1.set_xscale("log")
    ticks = [t for t in (2, 5, 10, 20, 50, 100, 144) if full is None or t <= full["tokens_in"]]
    ax1.set_xticks(ticks, [str(t) for t in ticks])
    ax1.minorticks_off()
    ax1.set_xlabel("image tokens kept per image, mean over LLM layers (decoder-stage methods dashed)")
    ax1.set_ylabel("testbed accuracy (%)")
    ax1.set_title("accuracy vs image tokens kept")
    ax2.set_xlabel("prefill latency / full (1 thread, median)")
    ax2.set_ylabel("testbed accuracy (%)")
    ax2.set_title("accuracy vs latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


# ----------------------------------------------------------------------------------------------- CLI


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
    """``--model`` must be a testbed-style LLaVA: the bench asks the testbed's questions about its 96 px scenes."""
    import json

    from ..testbed import IMAGE_SIZE, PATCH

    cfg = json.loads((Path(path) / "config.json").read_text())
    vision = cfg.get("vision_config") or {}
    got = (cfg.get("model_type"), vision.get("image_size"), vision.get("patch_size"))
    if got != ("llava", IMAGE_SIZE, PATCH):
        raise ValueError(
            f"--model {str(path)!r} is not a testbed-style model (model_type, image_size, patch_size = {got}; the "
            f"bench asks the testbed's questions about {IMAGE_SIZE} px scenes, so it needs ('llava', {IMAGE_SIZE}, "
            f"{PATCH}), e.g. a directory written by `vtcompress testbed train`); measuring fidelity on any model "
            "is not built yet -- see `handle.summary()` for the tokens and FLOPs a method saves on yours")


def _parse_budgets(text: str) -> list[int | float]:
    from ..compressor import parse_budget

    out = [parse_budget(p, "--budgets:") for p in (p.strip() for p in text.split(",")) if p]
    if not out:
        raise ValueError("--budgets is empty; e.g. --budgets 0.5,0.11")
    return out


def _parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    import ast

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not name or not field:
            raise ValueError(f"--param {item!r}: expected METHOD.KEY=VALUE, e.g. fastv.layer=1")
        if name not in methods:
            raise ValueError(f"--param {item!r}: method {name!r} is not among the methods swept")
        try:
            out.setdefault(name, {})[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out.setdefault(name, {})[field] = value
    for name, kw in out.items():
        _check_params(name, kw)
    return out


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive int is allowed")
    return v


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of ``vtcompress bench`` (see the module docstring); returns the exit code."""
    from ..compressor import list_methods
    from ..testbed import samples as make_samples

    p = argparse.ArgumentParser(
        prog="vtcompress bench",
        description="Every applicable method x budgets on the embedded testbed: accuracy, image tokens, FLOPs, "
                    "KV cache and latency vs the uncompressed model. Writes bench.md/csv/json/png and gallery.png.")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    p.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS),
                   help="comma-separated budgets: fractions of the image tokens in (0, 1] or ints "
                        "(default %(default)s)")
    p.add_argument("--samples", type=_positive, default=DEFAULT_SAMPLES, help="test samples (default %(default)s)")
    p.add_argument("--model", help="a saved testbed-style model directory (default: the packaged testbed)")
    p.add_argument("--out", default="results", help="output directory (default %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=32, help="evaluation batch size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="test-set seed (default %(default)s)")
    p.add_argument("--latency-batch", type=_positive, default=8,
                   help="samples in the timed batch (default %(default)s)")
    p.add_argument("--repeats", type=_positive, default=5, help="timed repeats per row (default %(default)s)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads per process (default %(default)s)")
    p.add_argument("--workers", type=_positive, default=min(2, os.cpu_count() or 1),
                   help="processes evaluating accuracy in parallel; latency is timed alone (default %(default)s)")
    p.add_argument("--gallery-budget", type=lambda x: _parse_budgets(x)[0], default=None,
                   help="budget of gallery.png (default: 0.22 if swept, else the middle budget)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method hyper-parameter, e.g. fastv.layer=1 (repeatable)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency timing")
    p.add_argument("--no-plot", action="store_true", help="write no PNGs")
    args = p.parse_args(argv)
    try:
        budgets = _parse_budgets(args.budgets)
        methods = list_methods() if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
        valid = set(list_methods())
        bad = [m for m in methods if m not in valid]
        if bad:
            raise ValueError(f"--methods: unknown {', '.join(bad)}; valid names: {', '.join(sorted(valid))}")
        params = _parse_params(args.param, methods)
        model, tok, desc = load_model(args.model)
    except ValueError as e:
        print(f"vtcompress bench: {e}", file=sys.stderr)
        return 2
    test = make_samples("test", args.samples, seed=args.seed)
    t0 = time.perf_counter()
    rows = run_sweep(model, tok, methods, budgets, test, batch_size=args.batch_size, latency_batch=args.latency_batch,
                     repeats=args.repeats, num_threads=args.threads, time_latency=not args.no_latency,
                     workers=args.workers, params=params)
    meta = {
        "model": desc, "params": params, "samples": args.samples, "seed": args.seed, "budgets": budgets,
        "methods": methods,
        "batch_size": args.batch_size, "latency_batch": args.latency_batch, "repeats": args.repeats,
        "threads": args.threads, "workers": args.workers, "torch": torch.__version__,
        "transformers": _transformers_version(), "vtcompress": _vtcompress_version(),
        "seconds": round(time.perf_counter() - t0, 1),
        "flops": "analytic prefill FLOPs per sample, lm_head on the last position (vtcompress.bench.flops)",
    }
    paths = write_outputs(rows, args.out, meta, plot_png=not args.no_plot)
    table = paths["md"].read_text()
    print(f"vtcompress bench — {desc}, {args.samples} test samples, {meta['seconds']} s\n")
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


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _vtcompress_version() -> str:
    from .. import __version__

    return __version__
