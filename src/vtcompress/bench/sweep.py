"""The testbed sweep: every method x budget on the embedded testbed -- accuracy, tokens, FLOPs, KV cache, latency.

:func:`run_sweep` evaluates the uncompressed model and every ``method x budget`` on labelled testbed samples and
returns one dict per row (the columns are described in :mod:`vtcompress.bench`); :func:`build_method` builds a
method for one row, or says why it cannot run (a trainable method without a shipped checkpoint, a budget the
method's structure cannot produce). Formatting lives in :mod:`.table`, plots in :mod:`.plot`, the command line in
:mod:`.cli`; :func:`vtcompress.bench.run` is the label-free counterpart for any supported model
(:mod:`.fidelity`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..compressor import method_class  # re-exported: the bench CLI and fidelity import it from here

__all__ = ["DEFAULT_BUDGETS", "DEFAULT_SAMPLES", "FULL", "build_method", "check_params", "geometry", "is_testbed_style",
           "method_class", "run_sweep"]

DEFAULT_BUDGETS: tuple[float, ...] = (0.5, 0.33, 0.22, 0.11, 0.05)
DEFAULT_SAMPLES = 300
FULL = "full"


def geometry(config) -> tuple:
    """``(model_type, vision image_size, vision patch_size)`` of a config object or a ``config.json`` dict."""
    get = (lambda c, k: c.get(k)) if isinstance(config, dict) else (lambda c, k: getattr(c, k, None))
    vision = get(config, "vision_config") or {}
    return (get(config, "model_type"), get(vision, "image_size"), get(vision, "patch_size"))


def is_testbed_style(config) -> bool:
    """Whether a config (object or dict) is a testbed-style LLaVA (96 px scenes, 8 px patches): a model the
    testbed's labelled questions can be asked of, and whose shipped trainable checkpoints fit."""
    from ..testbed import IMAGE_SIZE, PATCH

    return geometry(config) == ("llava", IMAGE_SIZE, PATCH)


# ----------------------------------------------------------------------------------------------- methods


def build_method(name: str, budget: int | float, trained: bool = True, **params):
    """The method ``name`` at ``budget``, or a string saying why it cannot run.

    Trainable methods load the shipped testbed checkpoint for exactly that budget
    (:func:`vtcompress.checkpoints.load_trained`) when ``trained`` (the model IS the testbed); on any other model
    (``trained=False``) they cannot run: their weights are trained for the testbed's features. The others are
    built with :func:`vtcompress.get`.
    """
    from ..compressor import get

    cls = method_class(name)
    if getattr(cls, "trainable", False):
        check_params(name, params)
        if not trained:
            return "trainable: its shipped weights are trained for the testbed, not for this model"
        from ..checkpoints import load_trained

        try:
            method = load_trained(name, budget)
        except ValueError as e:
            return f"trainable, no checkpoint: {e}"
        if getattr(method, "untrained", False):  # never report random weights as a trained method's results
            return "trainable, untrained weights: not benchmarked"
        return method
    check_params(name, params)
    try:
        return get(name, budget=budget, **params)
    except ValueError as e:
        return f"budget not supported: {e}"


def check_params(name: str, params: dict) -> None:
    """A misspelt hyper-parameter is the caller's error (raise), not a budget the method cannot meet."""
    cls = method_class(name)
    if params and getattr(cls, "trainable", False):
        raise ValueError(f"{name} is trainable: its hyper-parameters come from its checkpoint; got {params}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}; its parameters: "
                         f"{', '.join(sorted(fields))}")


def check_sweep(methods: Sequence[str], params: dict[str, dict] | None) -> dict[str, dict]:
    """Validate a sweep's method names and per-method hyper-parameters; returns ``params`` as a dict."""
    for m in methods:
        method_class(m)
    params = dict(params or {})
    stray = sorted(set(params) - set(methods))
    if stray:
        raise ValueError(f"params given for {', '.join(stray)}, which is not among the methods swept")
    for name, kw in params.items():  # bad parameter names fail now, with the valid list
        check_params(name, kw)
    return params


def base_row(name: str, cls, budget, n0: float) -> dict:
    """The identifying columns of a row: method, family, stage, budget and ``budget_tokens`` (per image, of ``n0``)."""
    return {
        "method": name,
        "family": getattr(cls, "family", "") if cls is not None else "",
        "stage": getattr(cls, "stage", "") if cls is not None else "",
        "budget": budget,
        "budget_tokens": n0 if budget is None else (budget if isinstance(budget, int) else max(1, round(budget * n0))),
    }


def _skill_names(samples) -> list[str]:
    from ..testbed import SKILLS

    present = {s.skill for s in samples}
    return [k for k in SKILLS if k in present]



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

    from ..compressor import list_methods
    from ..testbed import encode
    from .flops import VLMArch
    from .latency import threads, time_prefill

    valid = set(list_methods())
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid names: {', '.join(sorted(valid))}")
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
    params = check_sweep(methods, params)
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
        cls = method_class(name) if name else None
        row = base_row(name or FULL, cls, budget, n0)
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

