"""Measured prefill latency: one fixed batch, a fixed number of torch threads, median of repeats.

On CPU the thread count is pinned (default 1) while timing, so methods are compared on the same footing and
a busy neighbour core does not move the numbers as much; on CUDA the device is synchronised around each run.
The whole prefill is timed — vision tower, the method's own work (scores, matching, the selection inside the
LLM), projector and LLM — with ``logits_to_keep=1`` (what generation's prefill computes).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

__all__ = ["threads", "time_interleaved", "time_prefill"]


@contextlib.contextmanager
def threads(n: int | None):
    """Set ``torch.set_num_threads(n)`` inside the block and restore the previous count after (``None``: no-op)."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads={n!r}: a positive int (or None to leave torch's setting) is allowed")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_prefill(model, inputs: dict, method=None, repeats: int = 5, warmup: int = 1,
                 num_threads: int | None = 1) -> dict:
    """Time ``model(**inputs, logits_to_keep=1)`` with ``method`` applied (``None``: uncompressed).

    Returns ``{"median_s": float, "times_s": [float] * repeats}``. ``warmup`` untimed runs come first
    (allocator and kernel caches).
    """
    from ..models.apply import apply

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: a positive int is allowed")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: an int >= 0 is allowed")
    device = next(model.parameters()).device
    call = {**inputs, "logits_to_keep": 1}
    times = []
    ctx = apply(model, method) if method is not None else contextlib.nullcontext()
    with threads(num_threads), ctx:
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(**call)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def time_interleaved(model, inputs: dict, method, repeats: int = 5, warmup: int = 1,
                     num_threads: int | None = 1) -> dict:
    """Time the uncompressed prefill and ``method``'s prefill of ``inputs`` in turns: full, method, full, ...

    Interleaving puts both under the same machine state (a neighbour's load, clock changes), so their ratio
    holds even when the absolute times drift. Each side gets ``warmup`` untimed runs first, then ``repeats``
    timed runs alternating with the other side's. Returns ``{"full_s": median, "method_s": median,
    "ratio": method_s / full_s, "full_times_s": [...], "method_times_s": [...]}``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: a positive int is allowed")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: an int >= 0 is allowed")
    full: list[float] = []
    ours: list[float] = []
    for i in range(repeats):
        w = warmup if i == 0 else 0
        full += time_prefill(model, inputs, None, repeats=1, warmup=w, num_threads=num_threads)["times_s"]
        ours += time_prefill(model, inputs, method, repeats=1, warmup=w, num_threads=num_threads)["times_s"]
    f, m = statistics.median(full), statistics.median(ours)
    return {"full_s": f, "method_s": m, "ratio": m / f, "full_times_s": full, "method_times_s": ours}
