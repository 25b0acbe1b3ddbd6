"""``vtcompress bench --video``: every method that compresses clips x budgets on the clip testbed.

The clip testbed (:mod:`vtcompress.testbed.clips`, :mod:`vtcompress.testbed.clip_model`) is the stock
``LlavaOnevisionForConditionalGeneration`` reading clips of ``T`` frames (``36`` pooled tokens per frame and the
video's newline); its questions need time (direction of motion, order of events, what appeared / disappeared /
changed colour, counts over time) next to single-frame ones. Methods: the temporal methods (across frames) and
the training-free spatial projector methods that read the features alone (frame by frame on a clip); budgets
count per clip (a fraction of the clip's video tokens; an int, tokens per clip).

Per ``T`` x method x budget (:func:`run_video_sweep`): accuracy (and per skill), video tokens kept per clip and
the retained fraction, and three ratios to the uncompressed model: analytic prefill FLOPs
(:func:`vtcompress.bench.flops.sequence_prefill_flops`: the tower and projector on every frame, the LLM on the
text and the kept video tokens, the lm_head on the last position), KV-cache tokens, and prefill latency (the
first ``latency_batch`` clips, timed in turns with the uncompressed model, median of ``repeats``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..compressor import METHODS, method_class
from .flops import sequence_prefill_flops
from .sweep import FULL, build_method

__all__ = ["VIDEO_BUDGETS", "VIDEO_FRAMES", "clip_methods", "evaluate_with_counts", "run_video_sweep",
           "format_video_table", "plot_video", "write_video_outputs"]

VIDEO_BUDGETS: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05)
VIDEO_FRAMES: tuple[int, ...] = (8, 16)


def clip_methods() -> list[str]:
    """The registered methods that compress clips: the temporal ones, and the training-free spatial
    projector-stage ones (frame by frame) that read the features or the vision signals captured for every frame
    ([CLS] attention, keys); not those reading the prompt."""
    return [n for n, c in sorted(METHODS.items(), key=lambda kv: (not kv[1].temporal, kv[0]))
            if c.stage == "projector" and not c.trainable and not c.widens and set(c.needs) <= {"cls_attn", "keys"}]


@torch.no_grad()
def evaluate_with_counts(model, tokenizer, method, samples, batch_size: int = 16) -> dict:
    """Accuracy on clip questions under ``method`` (``None``: the stock model) and, per clip, the text tokens and
    the video tokens the LLM receives, in ONE pass per batch: the projector stage's shortened inputs
    (:func:`vtcompress.compress_inputs`, what ``vtcompress.apply`` feeds the model) go through the model, scored
    as :func:`vtcompress.testbed.clip_model.evaluate_clips` scores (argmax over the answer words at the last
    position). Returns ``accuracy``, ``per_skill``, ``text [n]``, ``video [n]``."""
    from ..models.pipeline import compress_inputs
    from ..testbed.clip_model import clip_answer_words, encode_clips, video_token_count
    from ..testbed.clips import CLIP_SKILLS

    answers = torch.tensor(tokenizer.convert_tokens_to_ids(clip_answer_words()))
    correct, texts, videos = [], [], []
    for j in range(0, len(samples), batch_size):
        part = samples[j : j + batch_size]
        enc = encode_clips(tokenizer, part, model.config)
        full = video_token_count(int(enc["pixel_values_videos"].shape[1]))
        texts += [int(m) - full for m in enc["attention_mask"].sum(1)]
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values_videos")}
        if method is None:
            logits, kept = model(**inputs).logits, [full] * len(part)
        else:
            res = compress_inputs(model, method, **inputs)
            logits, kept = model(**res.inputs).logits, [int(k) for k in res.video_num_tokens[:, 1]]
        videos += kept
        last = logits[:, -1].float()
        pred = answers[last[:, answers].argmax(-1)]
        correct += (pred == enc["answer_ids"]).tolist()
    per_skill = {sk: float(np.mean([c for c, s in zip(correct, samples, strict=True) if s.skill == sk]))
                 for sk in CLIP_SKILLS if any(s.skill == sk for s in samples)}
    return {"accuracy": float(np.mean(correct)), "per_skill": per_skill, "text": texts, "video": videos}


def run_video_sweep(model, tokenizer, methods: Sequence[str], budgets: Sequence[int | float],
                    frames: Sequence[int] = VIDEO_FRAMES, samples: int = 140, seed: int = 0,
                    params: dict[str, dict] | None = None, batch_size: int = 16, latency: bool = True,
                    latency_batch: int = 8, repeats: int = 3, num_threads: int | None = 1,
                    progress: bool = True) -> list[dict]:
    """One row per ``T`` (the full model first) and method x budget: see the module docstring for the columns.
    A method that cannot produce a budget (a pooling stride the grid does not allow) gets a row with ``error``."""
    from tqdm.auto import tqdm

    from ..models.llava import llava_style_arch
    from ..testbed.clip_model import encode_clips
    from ..testbed.clips import clip_samples
    from .latency import time_interleaved

    params = params or {}
    arch = llava_style_arch(model.config)
    layers = arch.text.layers
    rows: list[dict] = []
    bar = tqdm(total=len(frames) * (1 + len(methods) * len(budgets)), desc="bench --video", disable=not progress)
    for t in frames:
        test = clip_samples("test", samples, frames=t, seed=seed)
        timed = {k: v for k, v in encode_clips(tokenizer, test[:latency_batch], model.config).items()
                 if k in ("input_ids", "attention_mask", "pixel_values_videos")}
        res = evaluate_with_counts(model, tokenizer, None, test, batch_size)
        texts, full_video = res["text"], res["video"]
        full_flops = sum(sequence_prefill_flops(arch, tx, [v] * layers, images=t).total
                         for tx, v in zip(texts, full_video, strict=True))
        full_kv = sum(tx + v for tx, v in zip(texts, full_video, strict=True))
        rows.append({"frames": t, "method": FULL, "family": "", "stage": "", "budget": None,
                     "accuracy": res["accuracy"], **{f"acc_{k}": v for k, v in res["per_skill"].items()},
                     "video_tokens": float(np.mean(full_video)), "retained": 1.0, "flops_ratio": 1.0,
                     "kv_ratio": 1.0, "latency_ratio": 1.0 if latency else None})
        bar.update()
        for name in methods:
            cls = method_class(name)
            for budget in budgets:
                row = {"frames": t, "method": name, "family": cls.family, "stage": str(cls.stage), "budget": budget}
                method = build_method(name, budget, trained=False, **params.get(name, {}))
                if isinstance(method, str):
                    rows.append({**row, "error": method})
                    bar.update()
                    continue
                try:
                    res = evaluate_with_counts(model, tokenizer, method, test, batch_size)
                    kept = res["video"]
                except ValueError as e:  # a grid the method cannot pool, a clip it cannot take
                    rows.append({**row, "error": str(e).split("\n")[0]})
                    bar.update()
                    continue
                flops = sum(sequence_prefill_flops(arch, tx, [k] * layers, images=t).total
                            for tx, k in zip(texts, kept, strict=True))
                ratio = None
                if latency:
                    ratio = time_interleaved(model, timed, method, repeats=repeats, num_threads=num_threads)["ratio"]
                rows.append({**row, "accuracy": res["accuracy"],
                             **{f"acc_{k}": v for k, v in res["per_skill"].items()},
                             "video_tokens": float(np.mean(kept)), "retained": float(np.sum(kept) / np.sum(full_video)),
                             "flops_ratio": flops / full_flops,
                             "kv_ratio": sum(tx + k for tx, k in zip(texts, kept, strict=True)) / full_kv,
                             "latency_ratio": ratio})
                bar.update()
    bar.close()
    return rows


def _skills(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith("acc_") and k[4:] not in seen:
                seen.append(k[4:])
    return seen


def _f(v, spec=".1f", scale=1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def format_video_table(rows: list[dict]) -> str:
    """The sweep as markdown: per ``T``, one line per method x budget (accuracy and per-skill accuracy in %,
    video tokens kept per clip, retained %, FLOPs / KV / latency ratios)."""
    skills = _skills(rows)
    head = ["T", "method", "budget", "acc %", *skills, "video tokens", "retained %", "FLOPs x", "KV x", "latency x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = "-" if r["budget"] is None else (f"{r['budget']:g}" if isinstance(r["budget"], float) else str(r["budget"]))
        if "error" in r:
            lines.append("| " + " | ".join([str(r["frames"]), r["method"], b, f"n/a: {r['error'][:60]}"]
                                           + [""] * (len(head) - 4)) + " |")
            continue
        cells = [str(r["frames"]), r["method"], b, _f(r["accuracy"], scale=100),
                 *(_f(r.get(f"acc_{s}"), ".0f", 100) for s in skills), _f(r["video_tokens"], ".0f"),
                 _f(r["retained"], ".1f", 100), _f(r["flops_ratio"], ".3f"), _f(r["kv_ratio"], ".3f"),
                 _f(r["latency_ratio"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_video(rows: list[dict], path) -> Path:
    """Accuracy vs retained video tokens, one panel per ``T``, one line per method (the full model dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import method_styles

    frames = sorted({r["frames"] for r in rows})
    fig, axes = plt.subplots(1, len(frames), figsize=(6.0 * len(frames), 4.6), squeeze=False)
    ok = [r for r in rows if "error" not in r]
    styles = method_styles(ok)
    for ax, t in zip(axes[0], frames, strict=True):
        here = [r for r in ok if r["frames"] == t]
        full = next((r for r in here if r["method"] == FULL), None)
        if full is not None:
            ax.axhline(100 * full["accuracy"], color="k", ls=":", lw=1, label="full")
        for name in dict.fromkeys(r["method"] for r in here if r["method"] != FULL):
            pts = sorted((r["retained"], r["accuracy"]) for r in here if r["method"] == name)
            st = styles[name]
            ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], **st)
        ax.set_xscale("log")
        ax.set_xticks([2, 5, 10, 25, 50, 100], labels=["2", "5", "10", "25", "50", "100"])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("video tokens kept (% of the clip, log)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"clip testbed, T = {t} frames ({int(full['video_tokens']) if full else '?'} video tokens)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_video_outputs(rows: list[dict], out_dir, meta: dict | None = None, plot_png: bool = True) -> dict:
    """``bench_video.md`` / ``.json`` (settings and rows) and ``bench_video.png`` in ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "bench_video.md", "json": out / "bench_video.json"}
    paths["md"].write_text(format_video_table(rows) + "\n")
    paths["json"].write_text(json.dumps({"meta": meta or {}, "rows": rows}, indent=1, default=str) + "\n")
    if plot_png:
        paths["png"] = plot_video(rows, out / "bench_video.png")
    return paths


def video_main(args, methods: Sequence[str] | None, budgets, params) -> int:
    """``vtcompress bench --video``: the sweep on the clip testbed, printed and written to ``--out``."""
    import sys

    from ..testbed.clip_model import load_clip_testbed
    from .fidelity import versions

    if args.model is not None or args.images is not None:
        raise ValueError("--video runs on the clip testbed (its labelled clip questions): drop --model / --images")
    frames = [int(x) for x in args.frames.split(",") if x.strip()]
    if not frames or any(t < 1 for t in frames):
        raise ValueError(f"--frames {args.frames!r}: comma-separated frame counts >= 1, e.g. 8,16")
    names = list(methods) if methods else clip_methods()
    model, tok = load_clip_testbed()
    t0 = time.perf_counter()
    rows = run_video_sweep(model, tok, names, budgets, frames=frames, samples=args.samples or 140, seed=args.seed,
                           params=params, batch_size=args.batch_size or 16, latency=not args.no_latency,
                           latency_batch=args.latency_batch or 8, repeats=args.repeats, num_threads=args.threads)
    meta = {"model": "clip testbed (LlavaOnevisionForConditionalGeneration)", "frames": frames, "methods": names,
            "budgets": list(budgets), "samples": args.samples or 140, "seed": args.seed, "params": params,
            "repeats": args.repeats, "threads": args.threads, **versions(),
            "seconds": round(time.perf_counter() - t0, 1)}
    paths = write_video_outputs(rows, args.out, meta, plot_png=not args.no_plot)
    print(f"vtcompress bench --video — clip testbed, {meta['samples']} test clips per T, {meta['seconds']} s\n")
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(v) for v in paths.values()), file=sys.stderr)
    return 0
