"""Fidelity to the uncompressed model, on any supported VLM and any images: no labels needed.

:func:`run` runs the uncompressed model and every ``method x budget`` on the same (image, prompt) samples and
measures, per row:

* fidelity: ``answer_match``, the fraction of greedy answers (``max_new_tokens`` tokens, decoded) equal to the
  uncompressed model's; ``top1_match``, the fraction of samples whose first answer token (the argmax of the
  prefill's last logits) is the uncompressed model's; ``kl``, the mean ``KL(p_full || p_method)`` (nats) of that
  first-token distribution. At budget 1.0 every method is the stock model bit for bit, so they read 1, 1 and 0;
* cost: ``tokens_in`` (image tokens per image into the LLM, counted from the shortened inputs by
  :class:`~vtcompress.bench.quality.TokenProbe`), ``tokens_after`` / ``tokens_avg`` / ``prune_layers`` for
  decoder-stage methods (as in the testbed sweep), ``gflops`` / ``flops_ratio`` (analytic prefill FLOPs of what
  ran, :mod:`vtcompress.bench.flops`; ``None`` -- printed "n/a" -- for families it does not model), ``kv_kib`` /
  ``kv_ratio`` (KV-cache bytes a prefill leaves at 2 bytes per value, from the text config and the tokens each
  decoder layer saw), ``latency_ms`` / ``latency_ratio`` (prefill of one fixed batch, timed in turns with the
  uncompressed model: :func:`~vtcompress.bench.latency.time_interleaved`).

Prompts go through the model's own processor and its chat template when it has one (a user turn holding the
image and the prompt, then the generation prompt); a processor without a template gets ``"<image>\\n" + prompt``.
A testbed-style model saved without a processor (a tokenizer only) is encoded as :func:`vtcompress.testbed.encode`
does.

Example::

    from vtcompress.bench import ImagePrompt, run
    table = run(model, processor, ["visionzip", "fastv"], [0.25, 64],
                [ImagePrompt(Image.open("cat.jpg"), "What is the cat doing?")])
    print(table.to_markdown())
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["DEFAULT_PROMPT", "IMAGE_EXTENSIONS", "ImagePrompt", "as_samples", "encode", "load_samples", "run"]

#: the prompt of an image when none is given
DEFAULT_PROMPT = "Describe the image in one sentence."
#: file endings :func:`load_samples` reads as images (case-insensitive)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImagePrompt:
    """One sample of the label-free bench: an RGB image, the prompt asked about it, and a name for reports."""

    image: Image.Image
    prompt: str = DEFAULT_PROMPT
    name: str = ""


def load_samples(images, prompts=None, prompt: str = DEFAULT_PROMPT, limit: int | None = None) -> list[ImagePrompt]:
    """The images of directory ``images`` (sorted by file name) with their prompts.

    ``prompts``: a text file, one prompt per line (blank lines ignored): a single line is asked of every image;
    otherwise line ``i`` goes with image ``i`` and the counts must match. Without it every image gets ``prompt``.
    ``limit`` keeps the first images.
    """
    root = Path(images)
    if not root.is_dir():
        raise ValueError(f"--images {str(images)!r} is not a directory (expected a folder of image files)")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"--images {str(images)!r} holds no image file (allowed endings: "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit={limit!r}: a positive int (or None: every image) is allowed")
        files = files[:limit]
    if prompts is None:
        texts = [prompt] * len(files)
    else:
        lines = [ln.strip() for ln in Path(prompts).read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"--prompts {str(prompts)!r} has no non-blank line")
        if len(lines) == 1:
            texts = lines * len(files)
        elif len(lines) == len(files):
            texts = lines
        else:
            raise ValueError(f"--prompts {str(prompts)!r} has {len(lines)} prompts for {len(files)} images: give one "
                             "prompt (asked of every image) or one per image, in the images' file-name order")
    out = []
    for f, t in zip(files, texts, strict=True):
        with Image.open(f) as im:
            out.append(ImagePrompt(im.convert("RGB"), t, f.name))
    return out


def as_samples(samples) -> list[ImagePrompt]:
    """``ImagePrompt`` objects from ``ImagePrompt`` s, ``(image, prompt)`` pairs or bare images (PIL, a path, or an
    ``[H, W, 3]`` uint8 array; bare images get :data:`DEFAULT_PROMPT`)."""
    out = []
    for i, s in enumerate(samples):
        if isinstance(s, ImagePrompt):
            out.append(s)
            continue
        image, text = (s if isinstance(s, tuple) and len(s) == 2 else (s, DEFAULT_PROMPT))
        if not isinstance(text, str):
            raise ValueError(f"samples[{i}]: the prompt must be a str; got {type(text).__name__}")
        out.append(ImagePrompt(_to_image(image, i), text, f"sample {i}"))
    if not out:
        raise ValueError("samples is empty: pass at least one (image, prompt)")
    return out


def _to_image(image, i: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
        return Image.fromarray(arr)
    raise ValueError(f"samples[{i}]: expected a PIL image, a path or an [H, W, 3] uint8 array; got "
                     f"{type(image).__name__}")


# ----------------------------------------------------------------------------------------------- inputs


def tokenizer_of(processor):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)


def has_image_processing(processor) -> bool:
    """Whether ``processor`` turns images into model inputs (a multimodal processor, not a bare tokenizer)."""
    return getattr(processor, "image_processor", None) is not None


def encode(model, processor, samples: Sequence[ImagePrompt]) -> dict[str, torch.Tensor]:
    """Model inputs of a batch of samples (left padded, on the model's device, pixels in its dtype).

    With a multimodal processor: its chat template (if it has one) renders a user turn with the image and the
    prompt, then the generation prompt; else ``image_token + "\\n" + prompt``. With a bare tokenizer (a
    testbed-style model): the testbed's prompt layout and pixel normalisation.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if has_image_processing(processor):
        texts = []
        for s in samples:
            if getattr(processor, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}]
                texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
            else:
                token = getattr(processor, "image_token", None) or "<image>"
                texts.append(f"{token}\n{s.prompt}")
        tok = tokenizer_of(processor)
        side = getattr(tok, "padding_side", "left")
        tok.padding_side = "left"  # generation continues every row at the same last column
        try:
            enc = processor(images=[s.image for s in samples], text=texts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        out = {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
    else:
        out = _encode_testbed_style(model, processor, samples)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in out and out[key].is_floating_point():
            out[key] = out[key].to(dtype)
    return {k: v.to(device) for k, v in out.items()}


def _encode_testbed_style(model, tokenizer, samples) -> dict[str, torch.Tensor]:
    from ..testbed import build_prompt, pixel_values_from_images

    vision = getattr(model.config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    n_img = int(getattr(model.config, "image_seq_length", 0) or 0)
    if not isinstance(size, int) or n_img <= 0:
        raise ValueError(f"{type(model).__name__} came with a tokenizer but no processor, and its config gives no "
                         "square vision image_size and image_seq_length to build testbed-style inputs from: save "
                         "the model's processor (AutoProcessor) next to it")
    arrays = [np.asarray(s.image.resize((size, size), Image.Resampling.BICUBIC) if s.image.size != (size, size)
                         else s.image) for s in samples]
    enc = tokenizer([build_prompt(s.prompt, n_img) for s in samples], padding=True, return_tensors="pt",
                    add_special_tokens=False, padding_side="left")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": pixel_values_from_images(arrays)}


# ----------------------------------------------------------------------------------------------- measuring


@dataclass
class _Outputs:
    """What one configuration produced on every sample, in sample order."""

    answers: list[str]
    logprobs: list[torch.Tensor]  # uncompressed model: [V] float32 log-softmax of the first answer token, per sample
    kl: list[float]  # under a method: KL(full || method) of the first-token distribution, per sample
    top1: list[bool]  # under a method: same first-token argmax as the uncompressed model, per sample
    records: list  # one TokenProbe CallRecord per batch (the prefill)
    savings: list  # one handle.summary() per batch under a method (empty for the uncompressed model)


def _generate_all(model, processor, batches: list[dict], max_new_tokens: int, bar, handle=None,
                  ref: _Outputs | None = None) -> _Outputs:
    """Greedy answers, first-token distributions and token records of every batch; with ``ref`` (the uncompressed
    model's outputs) the first-token KL / top-1 agreement per sample instead of the distributions (so that only
    the reference's ``[samples, V]`` distributions are ever held)."""
    from .quality import TokenProbe

    tok = tokenizer_of(processor)
    pad = getattr(tok, "pad_token_id", None)
    pad = getattr(tok, "eos_token_id", None) if pad is None else pad
    out_ = _Outputs([], [], [], [], [], [])
    with torch.no_grad(), TokenProbe(model) as probe:
        for inputs in batches:
            start = len(probe.records)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 return_dict_in_generate=True, output_logits=True, pad_token_id=pad)
            if len(probe.records) == start:
                raise RuntimeError("the token probe saw no prefill of the base model: is this a stock VLM?")
            out_.records.append(probe.records[start])  # the prefill; later records are decode steps
            if handle is not None:
                out_.savings.append(handle.summary())
            new = out.sequences[:, inputs["input_ids"].shape[1]:]
            out_.answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
            if ref is None:
                out_.logprobs += list(logprobs)
            else:
                for q in logprobs:
                    p = ref.logprobs[len(out_.kl)]
                    out_.top1.append(bool(p.argmax() == q.argmax()))
                    # KL(p_full || p_method); terms where p_full is 0 contribute nothing (0 * -inf would be nan)
                    out_.kl.append(float(torch.where(p > -torch.inf, p.exp() * (p - q), torch.zeros_like(p)).sum()))
            bar.update()
    return out_


def _kv_bytes_per_token(model, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token costs in one decoder layer: ``2 (k, v) x kv_heads x head_dim x bytes``."""
    tc = model.config.get_text_config()
    heads = int(tc.num_attention_heads)
    kv = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    return 2 * kv * head_dim * bytes_per_value


def _per_sample(out: _Outputs, n_layers: int) -> list[tuple[int, int, list[int]]]:
    """Per sample ``(text tokens, images, visual tokens entering each decoder layer)``, unpadded.

    The uncompressed model: from the probe (placeholders of each row, the same in every layer). Under a method:
    from the handle's own per-sample accounting (:class:`~vtcompress.models.stats.Savings`), which stays exact in
    a batch whose samples drop different numbers of tokens (the padded lengths the probe sees do not).
    """
    rows = []
    for k, rec in enumerate(out.records):
        sav = out.savings[k] if out.savings else None
        for b in range(len(rec.text)):
            images = rec.images[b]
            if sav is None:
                rows.append((rec.text[b], images, [rec.image[b]] * n_layers))
                continue
            before = [st for st in sav.stages if st.stage != "decoder"]
            if before:
                into = sum(n for n, s in zip(before[0].tokens_out, sav.image_sample, strict=True) if s == b)
            else:
                into = sav.visual_full[b]
            visual = [into] * n_layers
            decoder = [st for st in sav.stages if st.stage == "decoder"]
            if decoder:
                fixed = into - decoder[0].tokens_in[b]  # visual tokens a decoder stage never prunes (newlines)
                for st in decoder:
                    visual[st.layer:] = [fixed + st.tokens_out[b]] * (n_layers - st.layer)
            rows.append((sav.text_tokens[b], images, visual))
    return rows


def _costs(out: _Outputs, model, arch, kv_per_token: int) -> dict:
    """Token counts (per image, means over samples), FLOPs and KV bytes (means per sample) of the prefills."""
    from .quality import flops_of_record

    n_layers = int(model.config.get_text_config().num_hidden_layers)
    per = _per_sample(out, n_layers)
    imgs = [max(i, 1) for _, i, _ in per]
    layers = sorted({k for s in out.savings for st in s.stages if st.stage == "decoder" for k in [st.layer]})
    flops = None
    if arch is not None:
        if out.savings:
            if all(s.flops is not None for s in out.savings):
                flops = sum(s.flops for s in out.savings) / len(per)
        else:
            flops = float(np.mean([f for r in out.records for f in flops_of_record(arch, r)]))
    return {
        "tokens_in": float(np.mean([v[0] / i for (_, _, v), i in zip(per, imgs, strict=True)])),
        "tokens_after": float(np.mean([v[-1] / i for (_, _, v), i in zip(per, imgs, strict=True)])),
        "tokens_avg": float(np.mean([np.mean(v) / i for (_, _, v), i in zip(per, imgs, strict=True)])),
        "prune_layers": ",".join(str(k) for k in layers),
        "gflops": flops / 1e9 if flops is not None else None,
        "kv_kib": float(np.mean([kv_per_token * sum(t + n for n in v) for t, _, v in per])) / 1024,
    }


def _fidelity(ref: _Outputs, got: _Outputs) -> dict:
    match = [a == b for a, b in zip(ref.answers, got.answers, strict=True)]
    return {"answer_match": float(np.mean(match)), "top1_match": float(np.mean(got.top1)),
            "kl": float(np.mean(got.kl))}


def _expected_tokens(budget, counts: list[float]) -> float:
    """Mean image tokens per image a budget asks for (``keep_counts``' rule, per image)."""
    if budget is None:
        return float(np.mean(counts))
    if isinstance(budget, int):
        return float(np.mean([min(budget, c) for c in counts]))
    return float(np.mean([min(max(1, round(budget * c)), c) for c in counts]))


def run(
    model,
    processor,
    methods: Sequence[str],
    budgets: Sequence[int | float],
    samples,
    *,
    params: dict[str, dict] | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 24,
    latency_batch: int = 4,
    repeats: int = 5,
    num_threads: int | None = 1,
    time_latency: bool = True,
    progress: bool = True,
    meta: dict | None = None,
):
    """Fidelity and cost of every ``method x budget`` vs the uncompressed ``model`` on ``samples``.

    Args:
        model: a stock ``...ForConditionalGeneration`` of a supported family (``vtcompress.models.adapter_for``).
        processor: its ``AutoProcessor`` (or, for a testbed-style model, its tokenizer).
        methods: registered method names; trainable ones are skipped on models other than the testbed (their
            shipped weights are trained for the testbed's features).
        budgets: ints (tokens kept per image) or fractions in (0, 1].
        samples: :class:`ImagePrompt` s, ``(image, prompt)`` pairs or images (see :func:`as_samples`).
        params: hyper-parameters per method name, ``{"fastv": {"layer": 3}}``.
        batch_size: samples per ``generate`` call (left padded; batched equals one by one under ``apply``).
        max_new_tokens: length of the greedy answers compared.
        latency_batch, repeats, num_threads, time_latency: the timed prefill: the first ``latency_batch`` samples
            as one batch, ``repeats`` runs of each side in turns, ``num_threads`` torch threads on CPU.
        progress: a tqdm bar on stderr.
        meta: extra settings recorded in the table's ``meta``.

    Returns:
        a :class:`~vtcompress.bench.table.BenchTable` of kind ``"fidelity"``: first the uncompressed model's row
        (``method="full"``), then one row per method x budget (``status="ok"``, or ``"skipped: <why>"`` for a
        method that cannot run, never dropped).
    """
    from tqdm.auto import tqdm

    from ..models import adapter_for, apply
    from .flops import VLMArch
    from .latency import threads, time_interleaved, time_prefill
    from .sweep import FULL, base_row, build_method, check_sweep, is_testbed_style, method_class
    from .table import BenchTable

    adapter_for(model)  # an unsupported family fails here, with the supported list
    samples = as_samples(samples)
    for what, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("latency_batch", latency_batch),
                    ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what}={v!r}: a positive int is allowed")
    if not budgets:
        raise ValueError("budgets is empty: pass at least one budget, e.g. [0.25, 64]")
    from ..compressor import check_budget

    for b in budgets:
        check_budget(b)
    params = check_sweep(methods, params)
    try:
        arch = VLMArch.from_config(model.config)
    except ValueError as e:
        arch, flops_note = None, f"n/a: {e}"
    else:
        flops_note = "analytic prefill FLOPs per sample, lm_head on the last position (vtcompress.bench.flops)"
    trained = is_testbed_style(model.config)
    kv_per_token = _kv_bytes_per_token(model)

    t_start = time.perf_counter()
    batches = [encode(model, processor, samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    jobs = [(m, b) for m in methods for b in budgets]
    bar = tqdm(total=(1 + len(jobs)) * len(batches) + (1 + len(jobs) if time_latency else 0), desc="bench",
               unit="batch", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    cpu = next(model.parameters()).device.type == "cpu"
    ctx = threads(num_threads if cpu else None)  # CPU: a fixed thread count, as the testbed sweep
    rows: list[dict] = []
    built: dict[int, object] = {}
    with ctx:
        t0 = time.perf_counter()
        bar.set_postfix_str("full")
        ref = _generate_all(model, processor, batches, max_new_tokens, bar)  # a failure here is a real error
        full_costs = _costs(ref, model, arch, kv_per_token)
        counts = [r.image[b] / max(r.images[b], 1) for r in ref.records for b in range(len(r.image))]
        full = {**base_row(FULL, None, None, full_costs["tokens_in"]), "status": "ok", **full_costs,
                "answer_match": 1.0, "top1_match": 1.0, "kl": 0.0, "latency_ms": None, "latency_ratio": None,
                "eval_s": time.perf_counter() - t0}
        rows.append(full)
        for name, budget in jobs:
            cls = method_class(name)
            row = base_row(name, cls, budget, full_costs["tokens_in"])
            row["budget_tokens"] = _expected_tokens(budget, counts)
            bar.set_postfix_str(f"{name} @ {budget}")
            method = build_method(name, budget, trained=trained, **params.get(name, {}))
            if isinstance(method, str):
                rows.append({**row, "status": f"skipped: {method}"})
                bar.update(len(batches))
                continue
            t0 = time.perf_counter()
            try:
                with apply(model, method) as handle:
                    got = _generate_all(model, processor, batches, max_new_tokens, bar, handle, ref)
            except Exception as e:  # a method that fails on this model is reported, never dropped
                rows.append({**row, "status": f"skipped: error {type(e).__name__}: {' '.join(str(e).split())[:300]}"})
                continue
            built[len(rows)] = method
            rows.append({**row, "status": "ok", **_costs(got, model, arch, kv_per_token), **_fidelity(ref, got),
                         "latency_ms": None, "latency_ratio": None, "eval_s": time.perf_counter() - t0})

        full_times: list[float] = []
        if time_latency:
            bar.set_postfix_str("latency")
            lat_inputs = encode(model, processor, samples[:latency_batch])
            full_times += time_prefill(model, lat_inputs, None, repeats=repeats, num_threads=None)["times_s"]
            bar.update()
            for i, method in built.items():
                try:
                    t = time_interleaved(model, lat_inputs, method, repeats=repeats, num_threads=None)
                except Exception as e:  # ran on every sample, but not on this batch: say so in the row
                    why = " ".join(str(e).split())[:300]
                    rows[i]["status"] = f"skipped: error while timing {type(e).__name__}: {why}"
                    continue
                finally:
                    bar.update()
                full_times += t["full_times_s"]
                rows[i]["latency_ms"] = 1e3 * t["method_s"]
                rows[i]["latency_ratio"] = t["ratio"]
            bar.update(len(jobs) - len(built))
    bar.close()
    if full_times:
        full["latency_ms"] = 1e3 * float(np.median(full_times))
        full["latency_ratio"] = 1.0
    for r in rows:
        if r["status"] != "ok":
            continue
        r["flops_ratio"] = r["gflops"] / full["gflops"] if r.get("gflops") is not None and full.get("gflops") else None
        r["kv_ratio"] = r["kv_kib"] / full["kv_kib"] if full.get("kv_kib") else None
    settings = {
        "samples": len(samples), "budgets": list(budgets), "methods": list(methods), "params": params,
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "latency_batch": latency_batch,
        "repeats": repeats if time_latency else 0, "threads": num_threads,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "model_class": type(model).__name__,
        "flops": flops_note, "kv": "KV-cache bytes after prefill at 2 bytes per value (bf16 / fp16)",
        "seconds": round(time.perf_counter() - t_start, 1), **versions(), **(meta or {}),
    }
    return BenchTable(rows=rows, meta=settings, kind="fidelity")


def versions() -> dict[str, str]:
    """The versions a result depends on: ``vtcompress``, ``transformers`` and ``torch``."""
    import transformers

    from .. import __version__

    return {"vtcompress": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
