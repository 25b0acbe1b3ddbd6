"""Walk every image-text-to-text family of the installed transformers: which ones vtcompress runs (run on demand).

For each entry of ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` (what ``AutoModelForImageTextToText`` knows) it
reports one status:

* ``supported``: a vtcompress family description claims the class (``vtcompress.models.registry``; the README's
  support table, tested family by family);
* ``generic``: no description, but the model passes the precondition of the projector stage on a tiny random
  config: the base model's own ``get_image_features`` on square pixels, handed back through the official
  ``mm_encoder_outputs={"image": ...}`` argument at the config's image placeholder id, reproduces the stock logits
  (fp32, 1e-5). Such a family needs only a description file (README, "Adding a model family");
* ``not supported`` with the reason (no ``mm_encoder_outputs`` argument, no ``get_image_features``, cross-attention
  instead of placeholders, features that do not round-trip, ...), or ``not tried`` when a tiny model could not be
  built generically or its image inputs need the family's processor (tiles, grids, aspect-ratio ids).

The tiny config is the family's default config with every (sub-)config shrunk to hidden 64, 2 layers, 2 heads
(image geometry left as it is). One torch thread; about 2-4 minutes on 2 CPU cores::

    .venv/bin/python benchmarks/walk_families.py                  # markdown table + the summary line
    .venv/bin/python benchmarks/walk_families.py --only llava,paligemma --out walk.md
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
import warnings

import torch

#: size fields of a (sub-)config and the tiny value each gets
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "projection_dim": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 0,
}


def _sub_configs(config):
    """``config`` and every config nested in it (``text_config``, ``vision_config``, ...), each once."""
    from transformers import PretrainedConfig

    seen, out, todo = set(), [], [config]
    while todo:
        c = todo.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        todo.extend(v for v in vars(c).values() if isinstance(v, PretrainedConfig))
    return out


def tiny_config(model_type: str):
    """The default config of ``model_type`` with every size field of every sub-config set from :data:`TINY`."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for c in _sub_configs(config):
        for key, value in TINY.items():
            if isinstance(getattr(c, key, None), int) and not isinstance(getattr(c, key), bool):
                setattr(c, key, value)
        for key in ("layer_types", "mlp_layer_types"):  # per-layer lists follow the layer count
            types = getattr(c, key, None)
            if isinstance(types, (list, tuple)) and types:
                setattr(c, key, list(types[:TINY["num_hidden_layers"]]))
    return config


def _image_token_id(config) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _features(out):
    """The features ``get_image_features`` returned, as one ``[N, D]`` tensor (or ``None`` if not tensors)."""
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, torch.Tensor):
        return feats.reshape(-1, feats.shape[-1])
    if isinstance(feats, (list, tuple)) and feats and all(isinstance(f, torch.Tensor) for f in feats):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return None


def check(model_type: str, class_name: str) -> tuple[str, str]:
    """``(status, reason)`` of one family (see the module docstring)."""
    import transformers

    from vtcompress.models.registry import list_families

    claimed = {c for f in list_families() for c in f.model_classes}
    if class_name in claimed:
        return "supported", "a vtcompress family description claims it"
    cls = getattr(transformers, class_name, None)
    if cls is None:
        return "not tried", f"transformers exports no {class_name}"
    params = inspect.signature(cls.forward).parameters
    if "mm_encoder_outputs" not in params:
        if "cross_attention_states" in params or "cross_attention_mask" in params:
            return "not supported", "images enter through cross-attention, not placeholder tokens"
        return "not supported", "forward takes no mm_encoder_outputs (features cannot be handed in)"
    try:
        config = tiny_config(model_type)
        if getattr(config, "is_encoder_decoder", False):
            return "not supported", "encoder-decoder model (no image placeholders in a decoder-only prompt)"
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 -- a report: any failure is a reason
        msg = " ".join(str(e).split())[:120]
        return "not tried", f"tiny config does not build: {type(e).__name__}: {msg}"
    base = getattr(model, "model", model)
    if not hasattr(base, "get_image_features"):
        return "not supported", "no get_image_features"
    token = _image_token_id(model.config)
    if token is None:
        return "not supported", "no image placeholder id in the config"
    vision = getattr(model.config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int):
        return "not tried", "no square image_size: the pixel layout needs the family's processor"
    channels = getattr(vision, "num_channels", 3) or 3
    pixels = torch.randn(1, channels, size, size)
    try:
        with torch.no_grad():
            out = base.get_image_features(pixel_values=pixels, return_dict=True)
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())[:90]
        return "not tried", (f"get_image_features on [1, {channels}, {size}, {size}] pixels: {type(e).__name__}: "
                             f"{msg} (needs the processor's inputs: tiles, grids or sizes)")
    feats = _features(out)
    if feats is None:
        return "not supported", f"get_image_features returns {type(getattr(out, 'pooler_output', out)).__name__}"
    vocab = model.config.get_text_config().vocab_size
    if token >= model.get_input_embeddings().num_embeddings:
        return "not tried", (f"the default config's image placeholder id {token} is outside its embedding table "
                             f"({model.get_input_embeddings().num_embeddings}): the real checkpoint's vocabulary "
                             "is needed")
    text = torch.randint(0, min(vocab, 1000), (1, 6))
    text[text == token] = 0
    ids = torch.cat([text[:, :3], torch.full((1, feats.shape[0]), token), text[:, 3:]], dim=1)
    try:
        with torch.no_grad():
            stock = model(input_ids=ids, pixel_values=pixels).logits
            handed = model(input_ids=ids, mm_encoder_outputs={"image": out}).logits
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())[:100]
        return "not supported", f"forward with the features handed in: {type(e).__name__}: {msg}"
    if stock.shape != handed.shape or not torch.allclose(stock, handed, atol=1e-5, rtol=1e-5):
        return "not supported", "features handed in through mm_encoder_outputs do not reproduce the stock logits"
    return "generic", (f"get_image_features -> mm_encoder_outputs reproduces the stock logits "
                       f"({feats.shape[0]} image tokens)")


def walk(only: list[str] | None = None) -> list[dict]:
    """One row per image-text-to-text family: ``model_type``, ``model_class``, ``status``, ``reason``, ``seconds``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    rows = []
    for model_type, class_name in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        if only and model_type not in only:
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status, reason = check(model_type, class_name)
        rows.append({"model_type": model_type, "model_class": class_name, "status": status, "reason": reason,
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def summary(rows: list[dict]) -> str:
    count = {s: sum(r["status"] == s for r in rows) for s in ("supported", "generic", "not supported", "not tried")}
    return (f"{len(rows)} image-text-to-text families: {count['supported']} supported by a description, "
            f"{count['generic']} work through the generic path (features round-trip through mm_encoder_outputs), "
            f"{count['not supported']} not supported, {count['not tried']} not tried")


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model_type | class | status | reason |", "|---|---|---|---|"]
    lines += [f"| `{r['model_type']}` | {r['model_class']} | {r['status']} | {r['reason']} |" for r in rows]
    return "\n".join(lines) + "\n\n" + summary(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated model_types (default: all)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    rows = walk([s for s in args.only.split(",") if s] or None)
    text = f"transformers {transformers.__version__}, torch {torch.__version__}\n\n" + to_markdown(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
