"""LLaVA-1.5 under vLLM + the vtcompress plugin == the Hugging Face path (``vtcompress.apply``), on one checkpoint.

The checkpoint is the embedded testbed (a stock ``LlavaForConditionalGeneration``: CLIP tower with [CLS], head size
32 -- the CPU attention backend needs >= 32 -- 144 image tokens) saved with a real ``LlavaProcessor`` built offline.
Greedy decoding, fp32, EOS ignored so every request decodes the same number of tokens.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image

import vtcompress
from test_quickstart import save_testbed_as_hf_model
from vtcompress.integrations.vllm import hf_overrides
from vtcompress.integrations.vllm.llava import VtcompressLlavaForConditionalGeneration as VtcompressLlava
from vtcompress.integrations.vllm.llava import hub_layout
from vtcompress.testbed import samples

N_NEW = 4
SERVER_DEFAULT = {"method": "visionzip", "budget": 0.25}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    save_testbed_as_hf_model(path)
    hub_layout(path)  # the layout stock vLLM loads; the plugin loads both (test_plugin_loads_both_layouts)
    return path


def test_plugin_loads_both_layouts():
    mapper = VtcompressLlava.hf_to_vllm_mapper
    for saved in ("vision_tower.encoder.layers.0.mlp.fc1.weight", "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                  "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert mapper._map_name(saved) == "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert mapper._map_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "language_model.model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def scenes():
    return samples("test", 3, seed=1)


@pytest.fixture(scope="module")
def engines(checkpoint):
    from vllm import LLM

    common = dict(model=str(checkpoint), dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=4,
                  limit_mm_per_prompt={"image": 1}, seed=0)
    stock = LLM(**common)
    plugin = LLM(**common, hf_overrides=hf_overrides("LlavaForConditionalGeneration", **SERVER_DEFAULT))
    return stock, plugin


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos
    return processor, model


def _prompt(processor, scene) -> str:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scene.question}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def _request(hf, scene, method=None, budget=None) -> dict:
    req = {"prompt": _prompt(hf[0], scene), "multi_modal_data": {"image": Image.fromarray(scene.image)}}
    if method is not None:
        req["mm_processor_kwargs"] = {"vtcompress_method": method, "vtcompress_budget": budget}
    return req


def _run(llm, requests) -> list[tuple[int, list[int]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    return [(len(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in llm.generate(requests, params,
                                                                                            use_tqdm=False)]


def _hf(hf, scene, method=None, budget=None, kept=144) -> tuple[int, list[int]]:
    """The Hugging Face path: (prompt tokens the LLM sees with ``kept`` image tokens, greedy ids)."""
    processor, model = hf
    inputs = processor(images=Image.fromarray(scene.image), text=_prompt(processor, scene), return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        if method is None:
            ids = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
        else:
            with vtcompress.apply(model, vtcompress.get(method, budget=budget)):
                ids = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    return n - 144 + kept, ids[0, n:].tolist()


def test_entry_point_loads_the_plugin():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vtcompress"]
    assert ep.value == "vtcompress.integrations.vllm:register"
    load_general_plugins()
    archs = set(ModelRegistry.get_supported_archs())
    assert {"VtcompressLlavaForConditionalGeneration", "VtcompressQwen2VLForConditionalGeneration"} <= archs


def test_stock_vllm_matches_hf(engines, hf, scenes):
    stock, _ = engines
    got = _run(stock, [_request(hf, s) for s in scenes])
    assert got == [_hf(hf, s) for s in scenes]


@pytest.mark.parametrize("method", ["visionzip", "tome", "divprune"])
def test_budget_one_is_stock_vllm(engines, hf, scenes, method):
    stock, plugin = engines
    ref = _run(stock, [_request(hf, s) for s in scenes])
    assert _run(plugin, [_request(hf, s, method, 1.0) for s in scenes]) == ref


@pytest.mark.parametrize(("method", "budget", "kept"), [
    ("visionzip", 0.25, 36), ("fastervlm", 0.25, 36), ("divprune", 0.25, 36), ("tome", 0.25, 36), ("tome", 64, 64)])
def test_plugin_matches_hf_path(engines, hf, scenes, method, budget, kept):
    _, plugin = engines
    got = _run(plugin, [_request(hf, s, method, budget) for s in scenes])
    assert got == [_hf(hf, s, method, budget, kept) for s in scenes]


def test_server_default_from_hf_overrides(engines, hf, scenes):
    _, plugin = engines
    got = _run(plugin, [_request(hf, s) for s in scenes])
    assert got == [_hf(hf, s, **SERVER_DEFAULT, kept=36) for s in scenes]


def test_concurrent_requests_with_different_budgets(engines, hf, scenes):
    """One batch, the same image at three budgets (and another image): each request gets its own result, equal to
    the Hugging Face path's for its method and budget (the image is encoded once per budget: the multimodal hash
    covers the processor kwargs)."""
    _, plugin = engines
    s0, s1 = scenes[0], scenes[1]
    asks = [(s0, "divprune", 0.11), (s0, "divprune", 1.0), (s1, "tome", 0.25), (s0, "visionzip", 48)]
    got = _run(plugin, [_request(hf, s, m, b) for s, m, b in asks])
    want = [_hf(hf, s, m, b, k) for (s, m, b), k in zip(asks, [16, 144, 36, 48], strict=True)]
    assert got == want
    assert len({tuple(ids) for _, ids in got}) > 1  # the budgets lead to different answers here


@pytest.mark.parametrize(("method", "budget", "match"), [
    ("divprune", 0, "vtcompress_budget=0"),
    ("divprune", 1.5, "vtcompress_budget=1.5"),
    ("divprune", "lots", "not a number"),
    ("nosuch", 0.25, "unknown method 'nosuch'"),
    ("fastv", 0.25, "decoder-stage"),
    ("tome_encoder", 0.25, "encoder-stage"),
    ("prumerge", 0.25, "content-dependent"),
    ("qformer", 0.25, "trainable"),
])
def test_bad_request_fails_alone(engines, hf, scenes, method, budget, match):
    """A bad per-request value raises one ValueError naming it; the engine keeps serving (the next batch, with a good
    request, is answered correctly)."""
    _, plugin = engines
    with pytest.raises(ValueError, match=match):
        _run(plugin, [_request(hf, scenes[0], method, budget)])
    assert _run(plugin, [_request(hf, scenes[1], "tome", 0.25)]) == [_hf(hf, scenes[1], "tome", 0.25, 36)]


def test_hf_overrides_refuses_a_bad_server_default():
    with pytest.raises(ValueError, match="decoder-stage"):
        hf_overrides("LlavaForConditionalGeneration", "fastv", 0.5)
    with pytest.raises(ValueError, match="serves"):
        hf_overrides("MllamaForConditionalGeneration", "tome", 0.5)
