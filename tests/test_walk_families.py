"""``benchmarks/walk_families.py``: its verdicts on three families whose answer is known from their code.

LLaVA has a description (``supported``); PaliGemma has none, but its features round-trip through the official
``mm_encoder_outputs`` argument (``generic``); Mllama feeds images to the LLM by cross-attention (``not
supported``)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "walk_families.py"

torch.set_num_threads(1)


def _walk_module():
    spec = importlib.util.spec_from_file_location("walk_families", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_walk_verdicts_and_summary():
    walk = _walk_module()
    rows = {r["model_type"]: r for r in walk.walk(["llava", "paligemma", "mllama"])}
    assert {k: r["status"] for k, r in rows.items()} == {
        "llava": "supported", "paligemma": "generic", "mllama": "not supported"}
    assert "cross-attention" in rows["mllama"]["reason"]
    assert walk.summary(list(rows.values())).startswith(
        "3 image-text-to-text families: 1 supported by a description, 1 work through the generic path")


def test_tiny_config_shrinks_every_sub_config():
    walk = _walk_module()
    config = walk.tiny_config("paligemma")
    for c in walk._sub_configs(config):
        for key in ("hidden_size", "num_hidden_layers"):
            if hasattr(c, key):
                assert getattr(c, key) == walk.TINY[key], (type(c).__name__, key)
