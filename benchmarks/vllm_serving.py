"""Serving with vLLM: stock vs the vtcompress plugin at 100 / 33 / 11 % of the image tokens (run on demand).

Needs the vLLM venv (``make vllm-venv``)::

    .venv-vllm/bin/python benchmarks/vllm_serving.py            # ~5-10 minutes on 2 CPU cores
    .venv-vllm/bin/python benchmarks/vllm_serving.py --requests 16 --layers 2 --method divprune

A mid-size random LLaVA (no download): a small CLIP tower on 336 px images with 14 px patches (576 image tokens),
LLaVA's MLP projector and a LLaMA decoder (``--hidden`` 1024, ``--layers`` 4), saved with a real ``LlavaProcessor``
(the embedded testbed's tokenizer). Two engines in this process: stock vLLM and the plugin's class; every round
sends the same ``--requests`` requests (one random image each, a short question, ``--new`` greedy tokens) to the
stock engine and then to the plugin engine at each budget (per request, ``mm_processor_kwargs``), so the ratios come
from one run, measured alternately. Columns, each as compressed / stock:

* ``TTFT p50`` / ``p99``: time to first token of the requests of a burst (vLLM's per-request metrics: arrival to
  first token, queueing included), median over ``--rounds``;
* ``req/s``: requests finished per second of the burst's wall time (the inverse ratio: > 1 is faster);
* ``KV tokens``: prompt tokens the KV cache holds per request (text + kept image tokens);
* ``ideal``: the analytic prefill FLOPs ratio (``vtcompress.bench.flops.prefill_flops``: vision tower, projector,
  LLM, lm_head) -- what a perfect implementation would reach;
* ``ideal / TTFT``: how close the measured TTFT ratio comes to the ideal (1.0 = the full FLOP saving).

Prints a markdown table. The engines run with ``enforce_eager`` (no compilation) and one sequence batch limit
(``--max-seqs``), both engines alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BUDGETS = (1.0, 0.33, 0.11)


def build_checkpoint(path: Path, hidden: int, layers: int, seed: int = 0) -> None:
    """A random LLaVA-1.5-shaped model with the testbed's tokenizer and a 336 px CLIP processor, in the Hub layout."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vtcompress.integrations.vllm.llava import hub_layout
    from vtcompress.testbed import load_testbed

    _, tok = load_testbed()
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=256)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       head_dim=64, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    hub_layout(path)
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, image_token="<image>",
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--method", default="fastervlm")
    ap.add_argument("--new", type=int, default=8, help="greedy tokens per request")
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: vLLM's binding)")
    args = ap.parse_args(argv)

    from PIL import Image
    from vllm import LLM, SamplingParams

    from vtcompress.bench.flops import prefill_flops
    from vtcompress.integrations.vllm import hf_overrides

    tmp = Path(tempfile.mkdtemp(prefix="vtc_vllm_bench_"))
    build_checkpoint(tmp, args.hidden, args.layers)
    common = dict(model=str(tmp), dtype="float32", max_model_len=1024, enforce_eager=True,
                  max_num_seqs=args.max_seqs, limit_mm_per_prompt={"image": 1}, seed=0, disable_log_stats=False,
                  enable_prefix_caching=False)
    stock = LLM(**common)
    plugin = LLM(**common, hf_overrides=hf_overrides("LlavaForConditionalGeneration"))
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    prompt = "<s> you are a careful visual assistant . <image> question : what colour is the square ? answer :"
    images = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)

    def request(img, budget) -> dict:
        req = {"prompt": prompt, "multi_modal_data": {"image": img}}
        if budget is not None:
            req["mm_processor_kwargs"] = {"vtcompress_method": args.method, "vtcompress_budget": budget}
        return req

    def burst(llm, budget):
        reqs = [request(img, budget) for img in images]
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        ttft = [o.metrics.first_token_latency for o in outs]
        return {"p50": float(np.percentile(ttft, 50)), "p99": float(np.percentile(ttft, 99)),
                "rps": len(outs) / wall, "kv": statistics.mean(len(o.prompt_token_ids) for o in outs)}

    configs = [("stock", stock, None)] + [(f"plugin {b:.0%}", plugin, b) for b in BUDGETS]
    for _name, llm, budget in configs:  # warm-up: the first calls allocate buffers
        llm.generate([request(images[0], budget)], params, use_tqdm=False)
    runs: dict[str, list[dict]] = {c[0]: [] for c in configs}
    for _ in range(args.rounds):
        for name, llm, budget in configs:
            runs[name].append(burst(llm, budget))

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    text_tokens = int(med("stock", "kv")) - 576
    full = prefill_flops(tmp_cfg(tmp), text_tokens=text_tokens).total
    print(f"\n{args.requests} requests per burst, {args.rounds} rounds, method {args.method}, LLM hidden "
          f"{args.hidden} x {args.layers} layers, {text_tokens} text + 576 image tokens, {args.new} new tokens, "
          f"torch {torch.__version__}, vLLM {__import__('vllm').__version__}\n")
    print("| config | image tokens | TTFT p50 x | TTFT p99 x | req/s x | KV tokens x | ideal (FLOPs) x | "
          "ideal / TTFT |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _llm, _budget in configs:
        kept = int(med(name, "kv")) - text_tokens
        ideal = prefill_flops(tmp_cfg(tmp), text_tokens=text_tokens, image_tokens=kept).total / full
        p50 = med(name, "p50") / med("stock", "p50")
        print(f"| {name} | {kept} | {p50:.3f} | {med(name, 'p99') / med('stock', 'p99'):.3f} | "
              f"{med(name, 'rps') / med('stock', 'rps'):.2f} | {med(name, 'kv') / med('stock', 'kv'):.3f} | "
              f"{ideal:.3f} | {ideal / p50:.2f} |")
    print(f"\nstock absolute: TTFT p50 {med('stock', 'p50') * 1e3:.0f} ms, p99 {med('stock', 'p99') * 1e3:.0f} ms, "
          f"{med('stock', 'rps'):.2f} req/s")
    return 0


def tmp_cfg(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


if __name__ == "__main__":
    sys.exit(main())
