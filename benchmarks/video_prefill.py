"""Video prefill: FLOP-ideal vs realized speed-up of a projector-stage method on LLaVA-OneVision clips (run on demand).

A LLaVA-OneVision-shaped RANDOM model (``LlavaOnevisionForConditionalGeneration`` built from a config, no
download):

* vision: a SigLIP-like tower (no [CLS], no pooling head) on 384 px frames with 14 px patches, i.e. 27 x 27 = 729
  patches per frame; deliberately small (``--vision-hidden`` 64, ``--vision-layers`` 2) so that the LLM dominates;
  features of its last layer (``vision_feature_layer=-1``, strategy ``"full"``);
* OneVision's MLP projector (``vision hidden -> hidden -> hidden``) on all 729 patches of every frame, then the
  model's own 2 x 2 bilinear pooling (``apply_pooling``) to 14 x 14 = 196 tokens per frame, plus one
  ``image_newline`` per video: ``T * 196 + 1`` video tokens;
* a Qwen2 LLM shaped like Qwen2-0.5B (hidden 896, MLP 4864, 14 query / 2 key-value heads of 64, vocab 151936,
  tied embeddings), with its 24 layers by default (``--layers``: fewer make the fixed per-frame work a larger share).

The prompt is video-only: ``--text`` 24 text tokens (8 before the video, the rest after) and one video of ``T``
frames (``--frames 8,16,32``). The prefill is what ``generate`` runs first: one ``model(**inputs)`` forward under
``no_grad`` with ``logits_to_keep=1`` (the logits of the last position only). The compressed prefill is the same
call inside ``with vtcompress.apply(model, method):`` (``--method``, default ``evs``; ``random`` is the
parameter-free spatial baseline that compresses each frame) for each budget of ``--budgets`` (fractions of the
clip's tokens, or ints: tokens per clip). The video's newline is always kept.

Per-token accounting (asserted on the untimed warm-up call of every row): the sequence the LLM receives has
``text + T * 196 + 1`` tokens for the stock model and ``text + kept`` for the compressed one, where ``kept`` is the
budget rule (a spatial method: ``T * round(fraction * 196)``; a temporal one such as EVS: its ``retained(T, 196)``)
plus the newline, and equals the video count of ``handle.summary()``.

Timing: per ``T``, every round runs the stock forward and each budget's compressed forward, interleaved (stock,
compressed 1, compressed 2, ..., the order reversed on every other round so that drift hits every side alike),
after one warm-up round; the reported time is the median of ``--repeats`` rounds. Both the process CPU time and the
wall time are measured; with one torch thread the CPU time is the compute time and stays meaningful when other
jobs share the cores (the wall time then includes waiting for a core), so ``latency ratio`` and ``efficiency`` use
the CPU time; the last column is the same efficiency from wall times.

Columns:

* ``FLOP ratio`` = compressed / stock prefill FLOPs (the ideal latency ratio), counted by the library
  (:func:`vtcompress.bench.flops.sequence_prefill_flops`, the convention of ``vtcompress bench``): the tower and
  projector on all ``T`` frames (the method acts after them, so they cost the same on both sides), the LLM on
  ``text + video tokens``, the ``lm_head`` on the last position, and the LLM's attention over the causal triangle
  (``attention="causal"``: ``n (n + 1) / 2`` score pairs per head). That is what runs: no mask reaches the decoder
  layers (asserted on the warm-up call), so transformers' SDPA path calls PyTorch's kernel with ``is_causal=True``,
  which skips the masked blocks (the report prints its time against an all-true mask at the longest clip: about
  half). ``FLOP ratio (full-matrix count)`` counts the whole ``n x n`` matrix, as eager attention computes it; it
  credits the long stock prefill with attention it never runs, so its ideal is out of reach by construction
  (``efficiency (full-matrix count)``).
  ``VLMArch.from_config`` does not model OneVision (its anyres images), so the architecture is assembled here from
  the library's :class:`VisionArch` / :class:`TextArch`; video frames are single 384 px crops, which it counts.
* ``latency ratio`` = compressed / stock median CPU time.
* ``efficiency`` = (1 / latency ratio) / (1 / FLOP ratio): the share of the ideal speed-up that is realized
  (target >= 0.9); ``efficiency (full-matrix count)`` the same against the full-matrix ideal.

Usage::

    .venv/bin/python benchmarks/video_prefill.py                      # EVS, T = 8/16/32, budgets 0.5/0.25/0.1
    .venv/bin/python benchmarks/video_prefill.py --method random --out video_prefill.md
    .venv/bin/python benchmarks/video_prefill.py --frames 8 --budgets 0.5,64 --repeats 3 --layers 2
    .venv/bin/python benchmarks/video_prefill.py --tiny               # seconds: a tiny model, for tests

With the defaults a run takes about 15 minutes of CPU time on one core (more wall time on shared cores); the
``T = 32`` stock prefill (~6300 tokens, 24 layers) is about 77 s of every round (``--layers 4``: about 4 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

import vtcompress
from vtcompress.bench.flops import Flops, TextArch, VisionArch, VLMArch, sequence_prefill_flops
from vtcompress.compressor import budget_tokens

#: Qwen2-0.5B / LLaVA-OneVision-0.5B placeholder ids (``<image>``, ``<video>``), when the vocabulary has them
QWEN2_IMAGE_ID, QWEN2_VIDEO_ID = 151646, 151647
TINY = dict(image_size=56, patch=14, vision_hidden=32, vision_layers=1, hidden=64, intermediate=128, layers=1,
            heads=4, kv_heads=2, vocab=256, text=6, frames="2,3", repeats=1)


# ---------------------------------------------------------------------------------------------- model
def build_model(a) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(a.seed)
    vis = SiglipVisionConfig(hidden_size=a.vision_hidden, intermediate_size=4 * a.vision_hidden,
                             num_hidden_layers=a.vision_layers, num_attention_heads=max(1, a.vision_hidden // 64),
                             image_size=a.image_size, patch_size=a.patch, vision_use_head=False)
    text = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True, pad_token_id=0)
    image_id, video_id = token_ids(a.vocab)
    cfg = LlavaOnevisionConfig(vision_config=vis, text_config=text, image_token_index=image_id,
                               video_token_index=video_id, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                               image_grid_pinpoints=[[a.image_size, a.image_size]], tie_word_embeddings=True)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def token_ids(vocab: int) -> tuple[int, int]:
    return (QWEN2_IMAGE_ID, QWEN2_VIDEO_ID) if vocab > QWEN2_VIDEO_ID else (vocab - 2, vocab - 1)


def frame_tokens(model) -> int:
    """Tokens per frame after OneVision's 2 x 2 pooling: ``ceil(side / 2) ** 2`` (14 x 14 = 196 at 384 / 14)."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    return (-(-side // 2)) ** 2


def video_prompt(model, frames: int, text: int, seed: int = 0) -> dict:
    """A video-only prompt: ``text // 3`` text tokens, the video's ``frames * per_frame + 1`` placeholders, the
    rest of the text; random 384 px frames."""
    vc, vocab = model.config.vision_config, model.config.text_config.vocab_size
    _, video_id = token_ids(vocab)
    gen = torch.Generator().manual_seed(seed)
    before = text // 3
    words = torch.randint(3, min(vocab - 3, 151000), (text,), generator=gen)
    ids = torch.cat([words[:before], torch.full((frames * frame_tokens(model) + 1,), video_id), words[before:]])
    return dict(input_ids=ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                pixel_values_videos=torch.randn(1, frames, 3, vc.image_size, vc.image_size, generator=gen),
                logits_to_keep=1)


# ---------------------------------------------------------------------------------------------- FLOPs
def onevision_arch(model) -> VLMArch:
    """OneVision's numbers for the library's FLOP count: SigLIP (no prefix, no head) -> 2-layer MLP -> Qwen2."""
    cfg = model.config
    vc = cfg.vision_config
    vision = VisionArch.from_config(vc, prefix=0, pooling_head=bool(getattr(vc, "vision_use_head", False)))
    text = TextArch.from_config(cfg.text_config)
    return VLMArch(vision=vision, projector=((vision.hidden, text.hidden), (text.hidden, text.hidden)), text=text,
                   feature_layer=int(cfg.vision_feature_layer), keep_prefix=True)


def clip_flops(arch: VLMArch, text: int, frames: int, video_tokens: int, attention: bool | str = True) -> Flops:
    """Prefill FLOPs of ``text`` text tokens and one video: the tower and projector on every frame (729 patches
    each), the LLM on ``text + video_tokens`` tokens in every layer, the lm_head on the last position; the LLM's
    attention over the full score matrix (``attention=True``) or its causal triangle (``"causal"``)."""
    return sequence_prefill_flops(arch, text, [video_tokens] * arch.text.layers, images=frames, logits="last",
                                  attention=attention)


def sdpa_causal_share(model, length: int, repeats: int = 3) -> float:
    """CPU time of PyTorch's SDPA with ``is_causal=True`` / with an all-true mask, at one decoder layer's shapes
    and ``length`` tokens (median of ``repeats``): about 0.5 when the kernel skips the masked blocks, which is
    why the causal FLOP count is the ideal on this kernel."""
    tc = model.config.text_config
    hd = tc.hidden_size // tc.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tc.num_attention_heads, length, hd, generator=gen) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = [lambda: sdpa(q, k, v, is_causal=True), lambda: sdpa(q, k, v, attn_mask=mask)]
    with torch.no_grad():
        for call in calls:  # warm-up
            call()
        (_, causal), (_, full) = interleaved(calls, repeats)
    return causal / full


# ---------------------------------------------------------------------------------------------- budgets
def parse_budget(s: str) -> int | float:
    return float(s) if any(c in s for c in ".eE") else int(s)


def kept_rule(method, frames: int, per_frame: int) -> int:
    """Video tokens the method keeps of a clip of ``frames`` frames of ``per_frame`` tokens, the newline excluded.

    A temporal method counts per clip (EVS: ``retained``); a spatial one acts frame by frame: a fraction keeps
    ``round(fraction * per_frame)`` of every frame, an int budget is tokens per clip split over the frames."""
    if getattr(method, "temporal", False):
        if hasattr(method, "retained"):
            return int(method.retained(frames, per_frame))
        return budget_tokens(method.budget, frames * per_frame)
    if isinstance(method.budget, float):
        return frames * budget_tokens(method.budget, per_frame)
    return min(int(method.budget), frames * per_frame)


# ---------------------------------------------------------------------------------------------- timing
def timed(fn) -> tuple[float, float]:
    """(wall, cpu) seconds of one call (with one torch thread the CPU time is the compute time)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: list, repeats: int) -> list[tuple[float, float]]:
    """Median (wall, cpu) of each fn over ``repeats`` rounds; every round runs all of them, in reversed order on
    odd rounds (the first round, untimed, is the warm-up the caller has done)."""
    runs: list[list[tuple[float, float]]] = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns))) if r % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            runs[i].append(timed(fns[i]))
    return [(statistics.median(w for w, _ in rs), statistics.median(c for _, c in rs)) for rs in runs]


@dataclass
class Row:
    frames: int
    budget: int | float
    text: int
    tokens_in: int  # video tokens of the stock prompt (newline included)
    kept: int  # video tokens the LLM receives under the method (newline included)
    flops_stock: int  # attention over the causal triangle (what the causal kernel computes)
    flops_comp: int
    flops_stock_full: int  # attention over the full score matrix (the library's default count)
    flops_comp_full: int
    stock: tuple[float, float]  # median (wall, cpu) seconds
    comp: tuple[float, float]

    @property
    def flop_ratio(self) -> float:
        """The ideal latency ratio, causal attention count."""
        return self.flops_comp / self.flops_stock

    @property
    def flop_ratio_full(self) -> float:
        return self.flops_comp_full / self.flops_stock_full

    @property
    def latency_ratio(self) -> float:
        return self.comp[1] / self.stock[1]

    @property
    def efficiency(self) -> float:
        """(1 / latency ratio) / (1 / FLOP ratio), CPU time, causal count."""
        return self.flop_ratio / self.latency_ratio

    @property
    def efficiency_full(self) -> float:
        """The same against the full-matrix count (which credits the stock prefill with attention it skips)."""
        return self.flop_ratio_full / self.latency_ratio

    @property
    def efficiency_wall(self) -> float:
        return self.flop_ratio / (self.comp[0] / self.stock[0])


def markdown(rows: list[Row]) -> str:
    lines = ["| T | budget | video tokens in | kept | prefill tokens | GFLOP stock | FLOP ratio (ideal) "
             "| FLOP ratio (full-matrix count) | stock cpu (s) | comp. cpu (s) | latency ratio | efficiency "
             "| efficiency (full-matrix count) | efficiency (wall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.frames} | {r.budget:g} | {r.tokens_in} | {r.kept} | {r.text + r.tokens_in} -> "
                     f"{r.text + r.kept} | {r.flops_stock / 1e9:.1f} | {r.flop_ratio:.3f} | {r.flop_ratio_full:.3f} "
                     f"| {r.stock[1]:.3f} | {r.comp[1]:.3f} | {r.latency_ratio:.3f} | {r.efficiency:.3f} "
                     f"| {r.efficiency_full:.3f} | {r.efficiency_wall:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="evs", help="projector-stage method (default evs; e.g. random)")
    p.add_argument("--frames", default="8,16,32", help="comma-separated frame counts T")
    p.add_argument("--budgets", default="0.5,0.25,0.1",
                   help="comma-separated budgets: fractions of the clip's tokens, or ints (tokens per clip)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median), after one warm-up round")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--text", type=int, default=24, help="text tokens of the prompt")
    p.add_argument("--layers", type=int, default=24, help="LLM decoder layers (Qwen2-0.5B: 24)")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model (56 px frames of 4 x 4 patches, hidden 64, "
                   "1 layer), T = 2,3 and 1 repeat, unless given explicitly: seconds, for tests")
    args = p.parse_args(argv)
    if args.tiny:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in TINY.items():
            if k not in given:
                setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark, print the markdown report (and write it to ``--out``); return the rows."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    frames_list = [int(t) for t in str(args.frames).split(",") if t]
    budgets = [parse_budget(b) for b in str(args.budgets).split(",") if b]

    model = build_model(args)
    arch = onevision_arch(model)
    per_frame = frame_tokens(model)
    side = args.image_size // args.patch
    lm = model.model.language_model
    lengths: list[int] = []  # sequence length the LLM receives, recorded on the warm-up round only
    masks: list = []  # the attention mask decoder layer 0 receives, warm-up round only

    methods = [vtcompress.get(args.method, budget=b) for b in budgets]
    head = (f"LLaVA-OneVision-shaped random model: SigLIP-like tower {args.image_size} px / patch {args.patch} "
            f"({side}x{side} = {side * side} patches), hidden {args.vision_hidden}, {args.vision_layers} layers; "
            f"MLP projector; 2x2 pooling -> {per_frame} tokens per frame (+1 newline per video); Qwen2 LLM hidden "
            f"{args.hidden}, MLP {args.intermediate}, {args.heads}/{args.kv_heads} heads, {args.layers} layers, vocab "
            f"{args.vocab}. Video-only prompt, {args.text} text tokens; prefill = model(**inputs, logits_to_keep=1). "
            f"Method {methods[0].name or type(methods[0]).__name__!r}; {torch.get_num_threads()} thread(s); median of "
            f"{args.repeats} interleaved rounds; latency ratio and efficiency from CPU time.")
    print(head + "\n", flush=True)

    rows: list[Row] = []
    for t in frames_list:
        inputs = video_prompt(model, t, args.text, seed=args.seed)
        n_in = t * per_frame + 1

        def stock(inputs=inputs):
            with torch.no_grad():
                model(**inputs)

        def make_comp(method, inputs=inputs):
            def comp():
                with torch.no_grad(), vtcompress.apply(model, method):
                    model(**inputs)
            return comp

        comps = [make_comp(m) for m in methods]
        # warm-up round, untimed, with the per-token accounting checks
        hook = lm.register_forward_pre_hook(lambda m, a, kw: lengths.append(int(kw["inputs_embeds"].shape[1])),
                                            with_kwargs=True)
        # no mask reaches the decoder layers (no padding): transformers' SDPA path then runs is_causal=True, the
        # kernel the causal FLOP count describes
        masks.clear()
        mask_hook = lm.layers[0].register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")),
                                                           with_kwargs=True)
        lengths.clear()
        stock()
        assert lengths == [args.text + n_in], (lengths, args.text + n_in)
        kept = []
        for m in methods:
            lengths.clear()
            with torch.no_grad(), vtcompress.apply(model, m) as handle:
                model(**inputs)
            k = kept_rule(m, t, per_frame) + 1
            video = [s for s in handle.summary().stages if s.per == "video"]
            got = video[0].tokens_out[0] if video else n_in
            assert got == k, f"T={t} budget={m.budget}: the summary says {got} video tokens kept, the rule {k}"
            assert lengths == [args.text + k], f"T={t} budget={m.budget}: LLM got {lengths}, expected {args.text + k}"
            kept.append(k)
        hook.remove()
        mask_hook.remove()
        assert masks and all(mk is None for mk in masks), "a mask reached the decoder layers: not the causal kernel"
        times = interleaved([stock, *comps], args.repeats)
        f_stock = clip_flops(arch, args.text, t, n_in, "causal").total
        f_stock_full = clip_flops(arch, args.text, t, n_in).total
        for m, k, tm in zip(methods, kept, times[1:], strict=True):
            row = Row(frames=t, budget=m.budget, text=args.text, tokens_in=n_in, kept=k, flops_stock=f_stock,
                      flops_comp=clip_flops(arch, args.text, t, k, "causal").total, flops_stock_full=f_stock_full,
                      flops_comp_full=clip_flops(arch, args.text, t, k).total, stock=times[0], comp=tm)
            rows.append(row)
            print(f"T={t} budget={m.budget:g}: {n_in} -> {k} video tokens, FLOP ratio {row.flop_ratio:.3f}, "
                  f"latency ratio {row.latency_ratio:.3f}, efficiency {row.efficiency:.3f}", file=sys.stderr,
                  flush=True)

    table = markdown(rows)
    longest = args.text + frames_list[-1] * per_frame + 1
    share = clip_flops(arch, args.text, frames_list[-1], longest - args.text, "causal")
    kernel = sdpa_causal_share(model, longest)
    note = (f"\nStock prefill FLOPs at T={frames_list[-1]} (causal count): LLM {share.llm / share.total:.1%}, tower "
            f"{share.vision / share.total:.1%}, projector {share.projector / share.total:.1%}, lm_head "
            f"{share.lm_head / share.total:.2%}. efficiency = FLOP ratio / latency ratio (target >= 0.9). The stock "
            f"prefill's SDPA gets no mask and runs causal (is_causal=True): at {longest} tokens PyTorch's CPU kernel "
            f"takes {kernel:.2f}x the time of the same call with an all-true mask (0.5: the masked half skipped "
            f"exactly); the FLOP ratio counts the causal triangle (the full-matrix count is shown beside it).")
    print(table)
    print(note)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n\n" + table + "\n" + note + "\n")
    return rows


if __name__ == "__main__":
    main()
