"""Peak memory and prefill time of decoder-stage scoring (FastV) vs the unpruned SDPA prefill (run on demand).

A LLaVA-shaped random model (no download): a LLaMA decoder (``--hidden`` 1024, ``--layers`` 8, 16 heads, MLP
2816, vocab 32064) behind a (small, unused) CLIP tower; prompts of ``L`` tokens = 16 text + ``L - 32`` image
placeholders + 16 text, batch 1, no padding, ``logits_to_keep=1`` (what ``generate``'s prefill computes).

Rows (one per ``L``), each measured in a FRESH subprocess (so allocator state does not leak between rows):

* ``sdpa``: the stock model (SDPA attention, no hooks);
* ``scoring``: FastV at ``--layer`` K with budget 1.0 — the attention row of the last token is computed at
  layer K-1 (q of one row, K in chunks, full causal normaliser) but nothing is pruned: the pure overhead of
  scoring;
* ``fastv``: FastV keeping ``--budget`` (default 0.5, the paper's R = 50 %) of the image tokens from layer K on.

Peak memory = the process's peak resident set during the prefill (``VmHWM`` after resetting it through
``/proc/self/clear_refs`` right before the first forward), so weights and the Python runtime are included as
they are in any real run; ``+act`` is the peak above the resident set just before the forward. Time = best of
``--repeats`` prefills per mode, the three modes interleaved in one process so that a busy machine slows them
alike (torch on 1 thread). ``ideal`` = analytic FLOPs (sdpa /
fastv: projections, gated MLP, causal attention ``n(n+1)/2`` pairs, last-position lm_head; scoring excluded),
``realized`` = time(sdpa) / time(fastv).

Usage::

    .venv/bin/python benchmarks/decoder_memory.py                       # L = 1k / 4k / 8k, a few minutes
    .venv/bin/python benchmarks/decoder_memory.py --lengths 1024 --layers 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (the peak RSS) to the current RSS
        f.write("5")


def build(hidden: int, layers: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                       num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                       max_position_embeddings=16384, attn_implementation="sdpa")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=28, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=4)
    return LlavaForConditionalGeneration(cfg).eval()


def flops(n_per_layer: list[int], hidden: int, inter: int, vocab: int) -> float:
    total = 0.0
    for n in n_per_layer:
        total += 2 * n * (4 * hidden * hidden) + 2 * n * 3 * hidden * inter  # q, k, v, o + gated MLP
        total += 2 * 2 * hidden * n * (n + 1) / 2  # QK^T and AV over the causal triangle
    return total + 2 * hidden * vocab


def _setup(length: int, args):
    import torch

    torch.set_num_threads(args.threads)
    model = build(args.hidden, args.layers)
    n_img = length - 32
    ids = torch.randint(3, 30000, (1, length), generator=torch.Generator().manual_seed(0))
    ids[0, 16 : 16 + n_img] = 32000
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": 1, "use_cache": True}
    return model, inputs


def _method(mode: str, args):
    from vtcompress import get

    return get("fastv", budget=1.0 if mode == "scoring" else args.budget, layer=args.layer)


def memory_worker(length: int, mode: str, args) -> dict:
    """One prefill in a fresh process: its peak resident set."""
    import torch

    from vtcompress.models.decoder import attach_decoder

    model, inputs = _setup(length, args)
    handle = attach_decoder(model, _method(mode, args)) if mode != "sdpa" else None
    with torch.no_grad():
        before = _rss_kb("VmRSS")
        _reset_peak()
        model(**inputs)
        peak = _rss_kb("VmHWM")
    kept = int(handle.kept()[0].shape[1]) if handle is not None else length
    return {"peak_mb": peak / 1024, "act_mb": (peak - before) / 1024, "kept_len": kept}


def time_worker(length: int, args) -> dict:
    """Prefill times of the three modes, interleaved so that a busy machine slows them alike; best of repeats."""
    import torch

    from vtcompress.models.decoder import attach_decoder

    model, inputs = _setup(length, args)
    times: dict[str, list[float]] = {"sdpa": [], "scoring": [], "fastv": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            for mode in times:
                handle = attach_decoder(model, _method(mode, args)) if mode != "sdpa" else None
                t0 = time.perf_counter()
                model(**inputs)
                times[mode].append(time.perf_counter() - t0)
                if handle is not None:
                    handle.remove()
    return {m: min(v) for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layer", type=int, default=2, help="FastV's K")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2, help="timed prefills per mode (best of)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=2, metavar=("LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        length, mode = int(args.worker[0]), args.worker[1]
        out = time_worker(length, args) if mode == "time" else memory_worker(length, mode, args)
        print(json.dumps(out))
        return
    passthrough = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--layer", str(args.layer),
                   "--budget", str(args.budget), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    inter = int(args.hidden * 2.75)
    rows = []
    for length in args.lengths:
        res = {}
        for mode in ("sdpa", "scoring", "fastv", "time"):
            out = subprocess.run([sys.executable, __file__, "--worker", str(length), mode, *passthrough],
                                 capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"# L={length} {mode}: {res[mode]}", file=sys.stderr, flush=True)
        for mode in ("sdpa", "scoring", "fastv"):
            res[mode]["time_s"] = res["time"][mode]
        kept_len = res["fastv"]["kept_len"]
        full = flops([length] * args.layers, args.hidden, inter, 32064)
        pruned = flops([length] * args.layer + [kept_len] * (args.layers - args.layer), args.hidden, inter, 32064)
        ideal = full / pruned
        realized = res["sdpa"]["time_s"] / res["fastv"]["time_s"]
        rows.append((length, res, ideal, realized))
    print(f"\nLLaVA-shaped LLM: hidden {args.hidden}, {args.layers} layers, FastV K={args.layer}, "
          f"budget {args.budget}; torch threads {args.threads}; peak = process peak RSS (MiB)\n")
    print("| L | peak sdpa | peak scoring (+%) | peak fastv (+%) | +act sdpa | +act scoring | t sdpa (s) | "
          "t scoring (s) | t fastv (s) | ideal speed-up | realized | realized/ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length, res, ideal, realized in rows:
        ps, pc, pf = (res[m]["peak_mb"] for m in ("sdpa", "scoring", "fastv"))
        act_s, act_c = res["sdpa"]["act_mb"], res["scoring"]["act_mb"]
        ts, tc, tf = (res[m]["time_s"] for m in ("sdpa", "scoring", "fastv"))
        print(f"| {length} | {ps:.0f} | {pc:.0f} ({100 * (pc / ps - 1):+.1f} %) | "
              f"{pf:.0f} ({100 * (pf / ps - 1):+.1f} %) | {act_s:.0f} | {act_c:.0f} | {ts:.2f} | {tc:.2f} | {tf:.2f} | "
              f"{ideal:.2f}x | {realized:.2f}x | {realized / ideal:.2f} |")


if __name__ == "__main__":
    main()
