"""ToMe speed: our bipartite soft matching and ``tome`` call vs the reference, on the same inputs (run on demand).

The reference is facebookresearch/ToMe ``tome/merge.py``: ``bipartite_soft_matching`` (returns ``merge`` /
``unmerge`` closures) and ``merge_wavg`` (size-weighted merge), re-typed below from reading that code. Rows:

* ``match``: ours :func:`vtcompress.ops.bipartite_soft_matching` (a merge plan ``dest``/``anchor``) vs the
  reference's matching (its closures' index tensors), one round, ``r`` tokens, [CLS] protected.
* ``tome``: the whole ``vtcompress.get("tome", budget=N - r, protect=1)(tokens)`` call (validation, matching,
  size-weighted merge of the features, sizes, positions and provenance) vs the reference's matching + ``merge_wavg``
  of the features (features and sizes only).

Default inputs: B = 8 images, N = 577 tokens ([CLS] + 24 x 24), D = 1024 features (the metric is the features),
``r`` = 288 (one full round), float32, one torch thread. Both sides are timed alternately in one run, after a
warm-up; the CPU time of the process (``time.process_time``, one thread: the compute time, stable when other jobs
share the cores) per call, each sample over enough back-to-back calls to last ~20 ms, is the median over
``--repeats`` samples. The ratio ours / reference is the target (<= 1.0).

Usage::

    .venv/bin/python benchmarks/tome_speed.py               # ~20 s
    .venv/bin/python benchmarks/tome_speed.py --r 100 --dim 64     # ToMe's own metric: head-dim keys
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import vtcompress
from vtcompress import VisualTokens
from vtcompress.ops import bipartite_soft_matching


# ------------------------------------------------------------------------------------------ re-typed reference
def ref_bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False):
    """facebookresearch/ToMe, tome/merge.py, ``bipartite_soft_matching`` (no distillation token): returns ``merge``."""
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode=None: x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def ref_merge_wavg(merge, x: torch.Tensor, size: torch.Tensor | None = None):
    """facebookresearch/ToMe, tome/merge.py, ``merge_wavg``."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


# ------------------------------------------------------------------------------------------ timing
def _cpu(fn, inner: int = 1) -> float:
    """CPU seconds per call of ``fn``, over ``inner`` back-to-back calls."""
    t0 = time.process_time()
    for _ in range(inner):
        fn()
    return (time.process_time() - t0) / inner


def run(batch: int, n: int, dim: int, r: int, repeats: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=gen)
    tokens = VisualTokens.from_features(x, grid=(1, n))
    tome = vtcompress.get("tome", budget=n - r, protect=1)

    cases = {
        "match": (lambda: bipartite_soft_matching(x, r, protect=1),
                  lambda: ref_bipartite_soft_matching(x, r, class_token=True)),
        "tome": (lambda: tome(tokens),
                 lambda: ref_merge_wavg(ref_bipartite_soft_matching(x, r, class_token=True), x)),
    }
    rows = []
    with torch.no_grad():
        for name, (ours, ref) in cases.items():
            for _ in range(3):  # warm-up
                ours()
                ref()
            # each sample times enough back-to-back calls to last >= ~20 ms, so small inputs are measured too
            inner = max(1, int(0.02 / max(_cpu(ref, 3), 1e-6)))
            t_ours, t_ref = [], []
            for i in range(repeats):  # alternate, and alternate who goes first
                if i % 2:
                    t_ref.append(_cpu(ref, inner))
                    t_ours.append(_cpu(ours, inner))
                else:
                    t_ours.append(_cpu(ours, inner))
                    t_ref.append(_cpu(ref, inner))
            mo, mr = statistics.median(t_ours), statistics.median(t_ref)
            rows.append({"case": name, "ours_ms": 1e3 * mo, "ref_ms": 1e3 * mr, "ratio": mo / mr})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=577)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--r", type=int, default=288)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.batch, args.tokens, args.dim, args.r, args.repeats)
    print(f"B={args.batch} N={args.tokens} D={args.dim} r={args.r}, {args.threads} thread(s), CPU ms (median of "
          f"{args.repeats})")
    print("| case | ours ms | reference ms | ours / reference |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['ours_ms']:.2f} | {row['ref_ms']:.2f} | {row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
