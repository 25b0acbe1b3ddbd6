"""What one request asks for: a projector-stage method and its budget, validated when the request is processed.

The server-wide default is the ``vtcompress`` entry of the model config (``hf_overrides={"vtcompress":
{"method": "visionzip", "budget": 0.25}}``); a request overrides it with ``mm_processor_kwargs={
"vtcompress_method": ..., "vtcompress_budget": ...}``. vLLM fixes an image's placeholder count when the request
is processed, before the image is encoded, so a method qualifies only if the number of tokens it keeps depends on
the grid and the budget alone (:func:`kept_count` checks it on probe inputs). The choice travels with each image
to the model as one int64 row (:func:`encode` / :func:`decode`): a float64 tensor would be cast to the model
dtype by vLLM's processor output handling.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from ...compressor import Compressor, get, list_methods, method_info, parse_budget
from ...tokens import VisualTokens

__all__ = ["RequestSpec", "CONFIG_KEY", "METHOD_KEY", "BUDGET_KEY", "SPEC_FIELD", "resolve", "kept_count",
           "encode", "decode"]

#: the model-config attribute holding the server-wide default (``hf_overrides``)
CONFIG_KEY = "vtcompress"
#: per-request keys of ``mm_processor_kwargs``
METHOD_KEY = "vtcompress_method"
BUDGET_KEY = "vtcompress_budget"
#: the per-image field the processor adds to the multimodal inputs
SPEC_FIELD = "vtcompress_spec"
_NAME_BYTES = 32
# methods whose kept count depends on the image content (PruMerge's IQR outlier rule): refused up front, the probe
# in kept_count catches others
_ADAPTIVE = {"prumerge": "IQR outliers of the [CLS] attention", "prumerge_plus": "IQR outliers of the [CLS] "
             "attention plus spatial samples"}


@dataclass(frozen=True)
class RequestSpec:
    """A validated (method name, budget); ``method is None`` means no compression (the stock model)."""

    method: str | None
    budget: int | float = 1.0

    def build(self) -> Compressor:
        return get(self.method, budget=self.budget)

    def describe(self) -> str:
        return "stock (no compression)" if self.method is None else f"{self.method}(budget={self.budget!r})"


@functools.cache
def _allowed() -> tuple[str, ...]:
    """Training-free projector-stage methods acting on images (trainable ones need weights the served checkpoint
    lacks; temporal ones act on videos, which the plugin does not compress)."""
    return tuple(sorted(r["name"] for r in method_info() if r["stage"] == "projector" and not r["trainable"]
                        and r["family"] != "temporal"))


def _check_method(name) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{METHOD_KEY}={name!r}: a method name (str) is required; allowed: {', '.join(_allowed())}")
    allowed = _allowed()
    if name in allowed:
        if name in _ADAPTIVE:
            raise ValueError(
                f"{METHOD_KEY}={name!r} keeps a content-dependent number of tokens ({_ADAPTIVE[name]}); vLLM fixes "
                "an image's placeholder count when the request is processed, before the image is encoded, so it "
                f"cannot serve it; allowed: {', '.join(m for m in allowed if m not in _ADAPTIVE)}")
        return name
    stages = {m: s for s in ("encoder", "decoder") for m in list_methods(stage=s)}
    if name in stages and stages[name] == "decoder":
        raise ValueError(
            f"{METHOD_KEY}={name!r} is a decoder-stage method: it prunes inside the LLM, which vLLM's paged KV cache "
            "cannot express (one sequence length for all layers); the vLLM plugin serves projector-stage methods: "
            + ", ".join(m for m in allowed if m not in _ADAPTIVE))
    if name in stages:
        raise ValueError(
            f"{METHOD_KEY}={name!r} is an encoder-stage method (it merges inside the vision tower, whose vLLM "
            "implementation fixes the token count); the vLLM plugin serves projector-stage methods: "
            + ", ".join(m for m in allowed if m not in _ADAPTIVE))
    if name in list_methods(family="temporal"):
        raise ValueError(f"{METHOD_KEY}={name!r} is a temporal method (it compresses videos across frames); the "
                         "vLLM plugin compresses images only: " + ", ".join(m for m in allowed if m not in _ADAPTIVE))
    if name in list_methods(stage="projector"):
        raise ValueError(f"{METHOD_KEY}={name!r} is trainable (it needs its trained weights inside the model); the "
                         f"vLLM plugin serves the training-free projector-stage methods: "
                         + ", ".join(m for m in allowed if m not in _ADAPTIVE))
    get(name)  # unknown: the registry's message with the valid names and a close match
    raise AssertionError("unreachable")  # pragma: no cover


def _check_budget(budget) -> int | float:
    if isinstance(budget, str):
        try:
            return parse_budget(budget, BUDGET_KEY)
        except ValueError as e:
            raise ValueError(str(e)) from None
    try:
        get("uniform", budget=budget)  # the one budget language: int >= 1 or float in (0, 1]
    except ValueError as e:
        raise ValueError(f"{BUDGET_KEY}={budget!r}: {e}") from None
    return budget


def resolve(default: dict | None, request: dict | None) -> RequestSpec:
    """The spec of one request: the request's ``mm_processor_kwargs`` keys over the server default.

    ``default`` is the model config's ``vtcompress`` entry (``{"method": ..., "budget": ...}`` or ``None``);
    ``request`` the request's processor kwargs. A bad value raises ``ValueError`` naming it and what is allowed.
    """
    default = dict(default or {})
    unknown = sorted(set(default) - {"method", "budget"})
    if unknown:
        raise ValueError(f"the model config's {CONFIG_KEY!r} entry has unknown key(s) {unknown}; allowed: "
                         "'method', 'budget'")
    request = request or {}
    method = request.get(METHOD_KEY, default.get("method"))
    budget = request.get(BUDGET_KEY, default.get("budget", 1.0))
    if method is None:
        if BUDGET_KEY in request and request[BUDGET_KEY] is not None:
            raise ValueError(f"{BUDGET_KEY}={request[BUDGET_KEY]!r} was given without a method: set {METHOD_KEY} "
                             f"in the request or a server default ({CONFIG_KEY!r} in hf_overrides)")
        return RequestSpec(None)
    method = _check_method(method)
    budget = _check_budget(budget)
    spec = RequestSpec(method, budget)
    spec.build()
    return spec


@functools.lru_cache(maxsize=512)
def kept_count(spec: RequestSpec, grid: tuple[int, int]) -> int:
    """Tokens ``spec`` keeps of a ``grid`` of patches, from probe inputs (three seeds: uniform, peaked and
    repeated features); a method whose count differs between them depends on the content and is refused."""
    if spec.method is None:
        return grid[0] * grid[1]
    m = spec.build()
    n = grid[0] * grid[1]
    counts = set()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, n, 8, generator=g)
        attn = torch.rand(1, n, generator=g) ** (1 + 4 * seed)
        if seed == 2:
            x = x[:, torch.randint(0, max(1, n // 4), (n,), generator=g)]
        tok = VisualTokens.from_features(x, grid, cls_attn=attn / attn.sum(), keys=x.clone())
        counts.add(int(m(tok).counts[0]))
    if len(counts) != 1:
        raise ValueError(f"{spec.describe()} keeps a content-dependent number of tokens ({sorted(counts)} on probe "
                         "inputs); vLLM fixes the placeholder count before the image is encoded: use a method whose "
                         "count depends on the budget alone")
    return counts.pop()


def encode(spec: RequestSpec) -> Tensor:
    """``[2 + 32]`` int64: budget kind (0 none, 1 float, 2 int), the budget (float64 bits or the int), the name."""
    if spec.method is None:
        return torch.zeros(2 + _NAME_BYTES, dtype=torch.int64)
    name = spec.method.encode("ascii")
    if len(name) > _NAME_BYTES:
        raise ValueError(f"method name {spec.method!r} is longer than {_NAME_BYTES} characters")
    if isinstance(spec.budget, int):
        kind, value = 2, int(spec.budget)
    else:
        kind, value = 1, struct.unpack("<q", struct.pack("<d", float(spec.budget)))[0]
    return torch.tensor([kind, value, *name, *([0] * (_NAME_BYTES - len(name)))], dtype=torch.int64)


def decode(row: Tensor) -> RequestSpec:
    """Inverse of :func:`encode`."""
    vals = [int(v) for v in row.tolist()]
    kind, value = vals[0], vals[1]
    if kind == 0:
        return RequestSpec(None)
    name = bytes(v for v in vals[2:] if v).decode("ascii")
    budget: int | float = value if kind == 2 else struct.unpack("<d", struct.pack("<q", value))[0]
    if kind == 1 and not math.isfinite(budget):  # pragma: no cover - encode never writes it
        raise ValueError(f"corrupt vtcompress spec row {vals}")
    return RequestSpec(name, budget)
