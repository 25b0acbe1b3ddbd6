"""Prefill latency, full vs compressed visual tokens, next to the FLOP-ideal speed-up (run on demand).

A LLaVA-1.5-shaped random model (random weights, no download): a CLIP tower on 336 px images with 14 px patches
(576 patch tokens; a small tower by default so that the LLM dominates), LLaVA's MLP projector and a LLaMA decoder
(``--hidden`` 1024, ``--layers`` 8 by default), one image and ``--text`` 64 text tokens. The prefill is what
``generate`` runs first: one forward over the prompt that fills the KV cache and computes the logits of the last
position.

Rows, one per budget (image tokens kept out of 576):

* ``LLM``: the decoder alone on ``inputs_embeds`` of the shortened length (``text + budget`` tokens): the part
  a projector-stage method speeds up.
* ``e2e``: the whole ``model(input_ids, pixel_values, ...)`` call, the stock model for the full row and the
  same call under ``vtcompress.apply(model, method)`` for the compressed rows (vision tower, the method itself,
  placeholder shortening, LLM).
* ``tower`` (``--tower``): the vision tower alone under the encoder-stage ``tome_encoder`` (ToMe inside the
  tower, merging in every layer up to ``vision_feature_layer=-2``), with a larger tower.

``ideal`` is the ratio of analytic FLOPs (full / compressed); ``realized`` the ratio of measured times (median
of ``--repeats`` runs; full and compressed are timed alternately in the same run, after a warm-up). Both the
wall time and the process CPU time are measured: with one torch thread the CPU time is the compute time and
stays meaningful when other jobs share the cores (the wall time then includes waiting for a core), so the
``realized`` column and the first ``realized/ideal`` use the CPU time; the last column uses the wall time.

FLOPs are the library's (:mod:`vtcompress.bench.flops`, the convention of ``handle.summary()`` and
``vtcompress bench``, checked against torch's ``FlopCounterMode``): every matrix product ``[m,k] @ [k,n]`` is
``2mnk`` — the q/k/v/o projections, the gated MLP, attention as ``QK^T`` and ``AV`` over the FULL ``n x n`` score
matrix of each head (what eager attention and FlopCounterMode count; a causal kernel may skip up to half of it,
so where attention dominates a realized speed-up can exceed the ideal one), the ``lm_head`` on the last
position, the patch-embedding convolution, every tower layer and the projector. Element-wise work (norms,
activations, softmax, rotary) is not counted.

Usage::

    .venv/bin/python benchmarks/prefill.py                 # ~2-3 minutes on one CPU core
    .venv/bin/python benchmarks/prefill.py --tower         # also time ToMe inside the vision tower
    .venv/bin/python benchmarks/prefill.py --hidden 2048 --layers 4 --method tome

Prints a markdown table. Torch runs on 1 thread (``--threads``) so that timings are stable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtcompress
from vtcompress import ScoreCompressor, Stage, VisualTokens
from vtcompress.bench.flops import VLMArch, prefill_flops

IMAGE_TOKEN = 32000
PREFERRED_METHODS = ("uniform", "random", "tome", "pool2d", "divprune")


@dataclass
class UniformStride(ScoreCompressor):
    """Fallback projector-stage method when no parameter-free one is registered: keep evenly spaced tokens."""

    name = "uniform_stride"
    family = "baseline"
    stage = Stage.PROJECTOR

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        n = tokens.num_tokens
        k = self.keep_counts(tokens)[:, None].to(torch.float64)
        # token i wins iff it is the nearest to one of the k evenly spaced targets: score = -distance
        targets = (torch.arange(n, dtype=torch.float64)[None] * k / n).floor()
        first = torch.ones_like(targets, dtype=torch.bool)
        first[:, 1:] = targets[:, 1:] != targets[:, :-1]
        return first.to(torch.float32) - torch.arange(n, dtype=torch.float32)[None] * 1e-6


# ---------------------------------------------------------------------------------------------- model
def build_model(args) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vis = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                           num_hidden_layers=args.vision_layers, num_attention_heads=max(1, args.vision_hidden // 64),
                           image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=args.hidden, intermediate_size=args.intermediate or
                       int(2.75 * args.hidden), num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=4096, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vis, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=576,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    return model


def pick_method(name: str | None, budget: int):
    if name:
        return vtcompress.get(name, budget=budget)
    names = set(vtcompress.list_methods(stage=Stage.PROJECTOR))
    for n in PREFERRED_METHODS:
        if n in names:
            return vtcompress.get(n, budget=budget)
    return UniformStride(budget=budget)


# ---------------------------------------------------------------------------------------------- FLOPs
def llm_flops(arch: VLMArch, text: int, image_tokens: int) -> int:
    """Prefill FLOPs of the LLM decoder (and its ``lm_head`` on the last position) on ``text`` text tokens and
    ``image_tokens`` image tokens (:func:`vtcompress.bench.flops.prefill_flops`)."""
    f = prefill_flops(arch, text_tokens=text, image_tokens=image_tokens)
    return f.llm + f.lm_head


def tower_flops(arch: VLMArch, tokens_per_layer: list[int] | None = None, projector: bool = True) -> int:
    """Vision tower (patch conv + every layer) and, with ``projector``, the projector on every patch;
    ``tokens_per_layer`` = patch tokens entering each layer (default: all 576 in every layer)."""
    f = prefill_flops(arch, text_tokens=0, image_tokens=0, vision_tokens=tokens_per_layer)
    return f.vision + (f.projector if projector else 0)


# ---------------------------------------------------------------------------------------------- timing
def timed(fn) -> tuple[float, float]:
    """(wall, cpu) seconds of one call. With one torch thread the process CPU time is the compute time, and it
    does not count the time the process waits for a core when other work shares the machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def median_pair(full_fn, comp_fn, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall, cpu) of alternating runs of the two (after a warm-up), so drift hits both sides alike."""
    full_fn()
    comp_fn()
    full, comp = [], []
    for r in range(repeats):
        order = (full_fn, comp_fn) if r % 2 == 0 else (comp_fn, full_fn)
        for fn in order:
            (full if fn is full_fn else comp).append(timed(fn))

    def med(runs):
        return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)

    return med(full), med(comp)


def prompt(text: int, images: int = 576):
    gen = torch.Generator().manual_seed(0)
    before = torch.randint(3, 30000, (1, text // 4), generator=gen)
    after = torch.randint(3, 30000, (1, text - text // 4), generator=gen)
    ids = torch.cat([before, torch.full((1, images), IMAGE_TOKEN), after], dim=1)
    return ids, torch.ones_like(ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=0, help="LLM MLP width (default 2.75 x hidden)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    p.add_argument("--method", default=None, help="projector-stage method (default: a parameter-free one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end rows through vtcompress.apply")
    p.add_argument("--tower", action="store_true", help="also time tome_encoder inside a larger vision tower")
    p.add_argument("--tower-hidden", type=int, default=768)
    p.add_argument("--tower-layers", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(args)
    cfg = model.config
    lm = model.model.language_model
    n_full = 576 + args.text
    emb = torch.randn(1, n_full, args.hidden) * 0.02

    def llm(n: int):
        def run():
            with torch.no_grad():
                h = lm(inputs_embeds=emb[:, :n], use_cache=True).last_hidden_state
                model.lm_head(h[:, -1:])
        return run

    method0 = pick_method(args.method, args.budgets[0])
    print(f"LLaVA-shaped random model: LLM hidden {args.hidden}, {args.layers} layers, "
          f"MLP {cfg.text_config.intermediate_size}, vocab {cfg.text_config.vocab_size}; "
          f"CLIP tower hidden {args.vision_hidden}, {args.vision_layers} layers, "
          f"576 patches; {args.text} text tokens; {torch.get_num_threads()} thread(s); median of {args.repeats}; "
          f"projector-stage method: {method0.name or type(method0).__name__}\n")
    table = Table()

    arch = VLMArch.from_config(cfg)
    f_full = llm_flops(arch, args.text, 576)
    for k in args.budgets:
        n = args.text + k
        full, comp = median_pair(llm(n_full), llm(n), args.repeats)
        table.add("LLM", k, n, f_full, llm_flops(arch, args.text, k), full, comp)

    if not args.no_e2e:
        apply = getattr(vtcompress, "apply", None)
        if apply is None:
            print("(vtcompress.apply is not available: end-to-end rows skipped)\n")
        else:
            ids, am = prompt(args.text)
            pix = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
            e_full = tower_flops(arch) + llm_flops(arch, args.text, 576)

            def stock():
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=am, pixel_values=pix, logits_to_keep=1)

            for k in args.budgets:
                method = pick_method(args.method, k)

                def compressed(method=method):
                    with torch.no_grad(), apply(model, method):
                        model(input_ids=ids, attention_mask=am, pixel_values=pix, logits_to_keep=1)

                full, comp = median_pair(stock, compressed, args.repeats)
                e = tower_flops(arch) + llm_flops(arch, args.text, k)
                table.add("e2e", k, args.text + k, e_full, e, full, comp)

    notes = tower_rows(args, table) if args.tower else []
    table.print()
    for line in notes:
        print(line)
    return 0


class Table:
    """Rows grouped by part; each part starts with its full row (medians of the full runs of that part)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple]] = {}

    def add(self, part, k, n, f_full, f, full, comp) -> None:
        self.rows.setdefault(part, []).append((k, n, f_full, f, full, comp))

    def print(self) -> None:
        print("| part | image tokens | sequence | GFLOP | wall (s) | cpu (s) | ideal speed-up "
              "| realized speed-up (cpu) | realized/ideal (cpu) | realized/ideal (wall) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for part, rows in self.rows.items():
            wall = statistics.median(r[4][0] for r in rows)
            cpu = statistics.median(r[4][1] for r in rows)
            f_full, n_full = rows[0][2], rows[0][1] - rows[0][0] + 576
            print(f"| {part} | 576 | {n_full} | {f_full / 1e9:.1f} | {wall:.3f} | {cpu:.3f} | 1.00 | 1.00 | - | - |")
            for k, n, ff, f, full, comp in rows:
                ideal = ff / f
                real_w, real_c = full[0] / comp[0], full[1] / comp[1]
                print(f"| {part} | {k} | {n} | {f / 1e9:.1f} | {comp[0]:.3f} | {comp[1]:.3f} | {ideal:.2f} | "
                      f"{real_c:.2f} | {real_c / ideal:.3f} | {real_w / ideal:.3f} |")


def tower_rows(args, table: Table) -> list[str]:
    """ToMe inside a CLIP tower (feature layer -2): the tower alone, full vs merged to each budget."""
    from vtcompress.models.encoder import encoder_merging

    targs = argparse.Namespace(**{**vars(args), "vision_hidden": args.tower_hidden, "vision_layers": args.tower_layers,
                                  "hidden": 64, "layers": 1, "intermediate": 128})
    model = build_model(targs)
    cfg = model.config
    tower = model.model.vision_tower
    pix = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            tower(pix, output_hidden_states=-2)

    arch = VLMArch.from_config(cfg)
    full_f = tower_flops(arch, projector=False)
    notes = [f"\n`tower`: CLIP tower alone, hidden {args.tower_hidden}, {args.tower_layers} layers, 336 px / 14 px "
             "patches (577 tokens), features at hidden_states[-2]; `sequence` = patch tokens at the feature layer; "
             "tome_encoder merges in the layers before it (r per layer below; the matching itself is not counted "
             "in the FLOPs, so its cost shows in realized/ideal)."]
    for k in args.budgets:
        method = vtcompress.get("tome_encoder", budget=k)
        handle = encoder_merging(model, None, method)
        handle.remove()
        sched = handle.schedule
        tokens, n = [], 576
        for r in sched + [0] * (args.tower_layers - len(sched)):
            tokens.append(n)
            n -= r
        f = tower_flops(arch, tokens, projector=False)

        def merged(method=method):
            with encoder_merging(model, None, method):
                run()

        full, comp = median_pair(run, merged, args.repeats)
        table.add("tower", k, k, full_f, f, full, comp)
        notes.append(f"- budget {k}: r = {sched}")
    return notes


if __name__ == "__main__":
    sys.exit(main())
