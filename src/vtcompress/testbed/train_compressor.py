"""Fine-tune a trainable compressor on the embedded testbed VLM.

``vtcompress testbed train-compressor METHOD --budget B`` (:mod:`vtcompress.testbed.train_compressor_cli`)
trains only the compressor (and, with ``--train-projector``, the model's own projector) with the rest of the
testbed frozen, on freshly generated training questions, and saves a checkpoint (``config.json`` +
``model.safetensors``, plus ``train.json`` with the run's settings and numbers). The forward pass is the
library's own apply path
(:func:`vtcompress.models.apply.compress_inputs`): the model's ``get_image_features`` -> the compressor ->
shortened placeholders -> ``mm_encoder_outputs``, so training sees exactly the positions and layout that
``vtcompress.apply`` / ``vtcompress bench`` use at evaluation. The loss is the cross-entropy of the one-token
answer at the last position.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from . import data as D

__all__ = ["train_compressor", "compressed_logits", "evaluate_compressor", "testbed_grid"]


def testbed_grid(model) -> tuple[int, int]:
    """The patch grid ``(H, W)`` of a testbed-style (square, single-crop) vision tower."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    return side, side


def _trainable_params(model, compressor, train_projector: bool) -> list[torch.nn.Parameter]:
    """Freeze the model (``requires_grad=False``) except, optionally, its projector; return what trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(compressor.parameters())
    if train_projector:
        proj = model.model.multi_modal_projector
        for p in proj.parameters():
            p.requires_grad_(True)
        params += list(proj.parameters())
    return params


def compressed_logits(model, compressor, enc: dict) -> torch.Tensor:
    """Last-position logits ``[B, V]`` of ``model`` on the batch ``enc`` (from :func:`testbed.model.encode`)
    with ``compressor`` applied through :func:`~vtcompress.models.apply.compress_inputs`.

    ``compress_inputs`` keeps the caller's grad mode, so under ``torch.enable_grad()`` gradients reach the
    compressor and every model parameter with ``requires_grad`` (the projector with ``--train-projector``);
    the frozen vision tower builds no graph.
    """
    from ..models.apply import compress_inputs

    p = next(model.parameters())
    ci = compress_inputs(model, compressor, input_ids=enc["input_ids"].to(p.device),
                         attention_mask=enc["attention_mask"].to(p.device),
                         pixel_values=enc["pixel_values"].to(p.device, p.dtype))
    return model(**ci.inputs).logits[:, -1, :]


def _batch(split: str, start: int, n: int, seed: int) -> list[D.Sample]:
    return [D.make_sample(D.sample_seed(split, i, seed)) for i in range(start, start + n)]


def train_compressor(model, tokenizer, compressor, *, steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
                     seed: int = 0, train_projector: bool = False, fixed_samples: list | None = None,
                     warmup: int = 20, distill: float = 0.0, progress: bool = True) -> dict:
    """Train ``compressor`` (in place) on the testbed ``model`` (frozen but for the optional projector).

    Each step draws ``batch_size`` new training questions (``fixed_samples``: reuse those every step instead,
    e.g. to check that the loss falls), AdamW with a linear warm-up and cosine decay, gradient clipping 1.0.
    The loss is ``(1 - distill) * CE(answer) + distill * KL(uncompressed model || compressed model)`` on the
    answer position (``distill > 0`` adds one no-grad forward of the full-token model per step).
    Returns ``{"losses": [float per step], "seconds": float}``.
    """
    from tqdm.auto import tqdm

    from ..tokens import VisualTokens

    torch.manual_seed(seed)
    model.eval()  # no dropout in the testbed; the frozen parts stay deterministic
    dev = next(model.parameters()).device
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill={distill} is out of range: the weight of the distillation loss is in [0, 1]")
    if not getattr(compressor, "built", True):
        # materialise the lazily built weights (D and grid from the model) before the optimizer sees them
        d = model.config.text_config.hidden_size
        h, w = testbed_grid(model)
        compressor(VisualTokens.from_features(torch.zeros(1, h * w, d, device=dev), (h, w)))
    compressor.to(dev)
    params = _trainable_params(model, compressor, train_projector)
    compressor.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {compressor.name}@{compressor.budget}", disable=not progress,
               file=sys.stderr)
    from .model import encode

    for step in bar:
        chunk = fixed_samples if fixed_samples is not None else _batch("train", step * batch_size, batch_size, seed)
        enc = encode(tokenizer, chunk, model.config)
        logits = compressed_logits(model, compressor, enc)
        loss = F.cross_entropy(logits.float(), enc["answer_ids"].to(logits.device))
        if distill > 0:
            with torch.no_grad():
                teacher = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                                pixel_values=enc["pixel_values"].to(dev)).logits[:, -1, :].float()
            kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher, -1), log_target=True,
                          reduction="batchmean")
            loss = (1.0 - distill) * loss + distill * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if step % 10 == 0 or step == steps - 1:
            window = losses[-20:]
            bar.set_postfix(loss=f"{sum(window) / len(window):.3f}")
    compressor.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate_compressor(model, tokenizer, compressor, samples: list, batch_size: int = 64) -> dict:
    """Testbed accuracy with ``compressor`` applied: the testbed's own ``evaluate`` inside ``vtcompress.apply``."""
    from ..models.apply import apply
    from .model import evaluate

    was_training = getattr(compressor, "training", False)
    if hasattr(compressor, "eval"):
        compressor.eval()
    try:
        with apply(model, compressor):
            return evaluate(model, tokenizer, samples, batch_size=batch_size)
    finally:
        if was_training:
            compressor.train()
