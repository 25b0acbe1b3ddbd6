"""The model description per family: the only place that knows where things are, the family registry, entry points.

* no module path is spelled out in ``src/vtcompress`` outside the description base and the family files
  (``models/<family>.py``): a grep for the usual probes fails the test with the offending lines;
* every family's description resolves to the stock model's own modules (checked against the paths transformers
  documents, here in the test and only here), its enums are enums, its token ids the config's;
* ``list_families`` reports every family with its status; a third-party family registers through the
  ``vtcompress.models`` entry point group and is then found by ``adapter_for``; a plain causal LM gets the
  text-only description (decoder-stage methods) and no family.
"""

from __future__ import annotations

import pathlib
import re
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import vtcompress
from models_util import BUILDERS
from vtcompress.models import (
    ModelDescription,
    PositionScheme,
    TokenLayout,
    adapter_for,
    description_for,
    list_families,
    register_adapter,
    supported_families,
)
from vtcompress.models import registry as reg
from vtcompress.models.description import Injection, TextModelDescription

SRC = pathlib.Path(vtcompress.__file__).parent

#: what path probing looks like: reaching into a model for its parts by attribute name
PROBES = [
    r'getattr\(\s*[\w.]*(model|base|tower|lm|layer|attn|module)\w*\s*,\s*"(model|language_model|vision_tower|'
    r'vision_model|visual|multi_modal_projector|image_newline|rotary_emb|layers|blocks|encoder|embeddings|self_attn|'
    r'norm|input_layernorm|class_embedding|cls_token)"',
    r"\bmodel\.model\b",
    r"\.(language_model|vision_tower|vision_model|multi_modal_projector|rotary_emb|self_attn|input_layernorm|"
    r"image_newline)\b(?!\s*\()",
    r"\b(model|base|tower)\.visual\b",
    r"\.encoder\.layers?\b",
    r"\b(lm|language_model|base)\.layers\b",
    r"\bsys\.modules\b",
]

#: where knowing the paths is the job: the description base and every family file
ALLOWED = {"models/description.py", *(f"models/{name}.py" for name in reg.builtin_family_modules())}
#: code that builds its own modules rather than reading a stock model's: the methods (pure tensor code with their
#: own trainable blocks) and the testbed (it constructs and trains its LlavaForConditionalGeneration)
OWN_MODULES = ("methods/", "testbed/")
#: vLLM's model classes are not the transformers classes the descriptions describe: the vLLM plugin's host adapter
#: (its model subclasses and their weight layout) is the one place that knows vLLM's module paths
OTHER_HOSTS = ("integrations/vllm/",)


def _probes(root: pathlib.Path) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in ALLOWED or rel.startswith(OWN_MODULES + OTHER_HOSTS):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in PROBES):
                hits.append(f"{rel}:{i}: {line.strip()}")
    return hits


def test_no_path_probing_outside_the_descriptions():
    hits = _probes(SRC)
    assert not hits, "module paths spelled out outside models/<family>.py and models/description.py:\n" + \
        "\n".join(hits)


def test_the_probe_grep_catches_probing(tmp_path):
    """The grep is not vacuous: each probe style in a stray engine file is reported."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "engine.py").write_text(
        'lm = getattr(model, "model", model)\n'
        "tower = model.model.vision_tower\n"
        "layers = base.language_model.layers\n"
        "blocks = model.visual.blocks\n"
        "vl = tower.encoder.layers\n"
        "fn = sys.modules[type(attn).__module__]\n"
        "ok = desc.language_model(model)\n"  # the description's answer: not a probe
    )
    hits = _probes(tmp_path)
    assert [h.split(":")[1] for h in hits] == ["1", "2", "3", "4", "5", "6"]


#: the families whose stock module paths this test spells out (a new family checks its own in its test file)
RESOLVED = ("llava", "llava_next", "onevision", "qwen2_vl", "qwen2_5_vl", "internvl")


@pytest.mark.parametrize("name", RESOLVED)
def test_descriptions_resolve_to_the_stock_modules(name):
    model, _ = BUILDERS[name]()
    desc = adapter_for(model)
    base = model.model
    assert desc.base(model) is base
    assert desc.language_model(model) is base.language_model
    assert desc.llm_layers(model) is base.language_model.layers
    assert desc.final_norm(model) is base.language_model.norm
    assert desc.rotary_emb(model) is base.language_model.rotary_emb
    layer = desc.llm_layers(model)[0]
    attn = desc.llm_attention(layer)
    assert attn is layer.self_attn and desc.llm_input_norm(layer) is layer.input_layernorm
    assert desc.rotary_fn(attn) is sys.modules[type(attn).__module__].apply_rotary_pos_emb
    if name.startswith("qwen"):
        tower, layers, vattn = base.visual, base.visual.blocks, base.visual.blocks[0].attn
        assert desc.position_scheme is PositionScheme.MROPE and desc.num_prefix_tokens(model) == 0
    else:
        tower = base.vision_tower
        layers = tower.encoder.layer if name == "internvl" else tower.encoder.layers
        vattn = layers[0].attention if name == "internvl" else layers[0].self_attn
        assert desc.position_scheme is PositionScheme.ROPE_1D
        assert desc.num_prefix_tokens(model) == (0 if name == "onevision" else 1)  # SigLIP has no [CLS]
    assert desc.vision_tower(model) is tower
    assert desc.vision_layers(model) == list(layers)
    assert desc.attention_module(layers[0]) is vattn
    newline = getattr(base, "image_newline", None)
    assert (desc.image_newline(model) is newline) if name in ("llava_next", "onevision") else \
        desc.image_newline(model) is None
    assert desc.projector_one_to_one == (name in ("llava", "llava_next", "onevision"))
    # the modalities: enums, and the config's token ids
    assert desc.injection is Injection.SCATTER and desc.extra_injections == ()
    assert isinstance(desc.image.layout, TokenLayout)
    assert desc.image_token_id(model) == model.config.image_token_id
    expect = [model.config.image_token_id]
    if getattr(model.config, "video_token_id", None) is not None:
        expect.append(model.config.video_token_id)
        assert desc.video is not None and desc.video.pixel_key == "pixel_values_videos"
    assert desc.visual_token_ids(model) == expect
    assert desc.position_scheme == desc.position_scheme.value  # a str enum: comparisons with the string hold


def test_list_families_reports_each_family_with_its_status():
    infos = {f.family: f for f in list_families()}
    assert list(infos) == supported_families()
    assert set(infos) >= {"llava", "llava_next", "onevision", "qwen2_vl", "internvl"}
    for f in infos.values():
        assert f.status in ("supported", "experimental") and f.source == "builtin" and f.model_classes
        assert "image" in f.modalities
    assert infos["qwen2_vl"].position_scheme == "mrope" and infos["llava"].position_scheme == "1d"
    assert infos["qwen2_vl"].modalities == ("image", "video") and infos["llava"].modalities == ("image",)
    assert infos["llava"].encoder_stage and not any(infos[n].encoder_stage for n in RESOLVED if n in infos and
                                                    n != "llava")


class _PluginModel(nn.Module):
    """A model class no built-in family serves."""


class _PluginDescription(ModelDescription):
    family = "plugin_vlm"
    model_classes = ("_PluginModel",)
    status = "experimental"


class _EntryPoint:
    name = "plugin_vlm"
    value = "plugin_pkg.family:_PluginDescription"

    def __init__(self, obj):
        self.obj = obj

    def load(self):
        if isinstance(self.obj, Exception):
            raise self.obj
        return self.obj


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry that loads again (built-ins, then the monkeypatched entry points); put back afterwards."""
    saved, sources = list(reg._FAMILIES), dict(reg._SOURCES)
    monkeypatch.setattr(reg, "_LOADED", False)
    reg._FAMILIES.clear()
    yield
    reg._FAMILIES[:] = saved
    reg._SOURCES.clear()
    reg._SOURCES.update(sources)


def test_third_party_family_through_the_entry_point_group(monkeypatch, fresh_registry):
    monkeypatch.setattr(reg, "_entry_points", lambda: [_EntryPoint(_PluginDescription)])
    with pytest.raises(ValueError, match="supported families"):
        adapter_for(nn.Linear(2, 2))
    desc = adapter_for(_PluginModel())
    assert isinstance(desc, _PluginDescription)
    info = {f.family: f for f in list_families()}["plugin_vlm"]
    assert info.status == "experimental" and info.source == "entry point plugin_vlm"
    assert supported_families()[:5] == ["llava", "llava_next", "onevision", "qwen2_vl", "internvl"]


def test_broken_entry_point_names_itself(monkeypatch, fresh_registry):
    monkeypatch.setattr(reg, "_entry_points", lambda: [_EntryPoint(ImportError("no module plugin_pkg"))])
    with pytest.raises(ValueError, match="entry point 'plugin_vlm'.*no module plugin_pkg"):
        supported_families()


def test_register_adapter_checks_and_replaces(fresh_registry):
    supported_families()  # load the built-ins
    with pytest.raises(ValueError, match="ModelDescription"):
        register_adapter(object())
    with pytest.raises(ValueError, match="family and model_classes"):
        register_adapter(ModelDescription())
    register_adapter(_PluginDescription)
    again = register_adapter(_PluginDescription())
    assert supported_families().count("plugin_vlm") == 1 and adapter_for(_PluginModel()) is again


def test_plain_causal_lm_gets_the_text_only_description():
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    with pytest.raises(ValueError, match="supported families"):
        adapter_for(lm)
    desc = description_for(lm, text_only=True)
    assert isinstance(desc, TextModelDescription) and desc.family not in supported_families()
    assert desc.language_model(lm) is lm.model and desc.llm_layers(lm) is lm.model.layers
    assert desc.final_norm(lm) is lm.model.norm and desc.rotary_emb(lm) is lm.model.rotary_emb
    with pytest.raises(ValueError, match="vision tower"):
        desc.vision_tower(lm)


def test_missing_path_names_the_part():
    class Broken(ModelDescription):
        family = "broken"
        model_classes = ("X",)
        language_model_path = "text_model"

    model, _ = BUILDERS["llava"]()
    with pytest.raises(ValueError, match="'text_model'"):
        Broken().language_model(model)


def test_flops_read_the_config_through_the_description():
    from vtcompress.bench.flops import VLMArch

    model, _ = BUILDERS["llava"]()
    arch = VLMArch.from_config(model.config)
    assert arch == adapter_for(model).prefill_arch(model.config)
    assert arch.vision.prefix == adapter_for(model).num_prefix_tokens(model) == 1
    assert arch.text.layers == len(adapter_for(model).llm_layers(model))
    with pytest.raises(ValueError, match="LLaVA-style"):
        VLMArch.from_config(BUILDERS["qwen2_vl"]()[0].config)


def test_runtime_state_is_put_back():
    """Qwen2-VL's ``rope_deltas`` (the description's ``runtime_state``) is restored after the last apply."""
    model, make = BUILDERS["qwen2_vl"]()
    base = adapter_for(model).runtime_holder(model)
    marker = torch.tensor([[7]])
    base.rope_deltas = marker
    with torch.no_grad(), vtcompress.apply(model, vtcompress.get("random", budget=0.5)):
        model.generate(**make(batch=1), max_new_tokens=2, do_sample=False)
    assert base.rope_deltas is marker


def test_one_file_family_for_a_subclass_runs_end_to_end(monkeypatch, fresh_registry):
    """A third-party family (one class, through the entry point group) for a subclass of a stock model is chosen
    over the stock family, and the shared machinery runs it: budget 1.0 is the stock model, a budget compresses."""
    from transformers import LlavaForConditionalGeneration

    from vtcompress.models.llava import LlavaAdapter

    class PluginLlava(LlavaForConditionalGeneration):
        pass

    class PluginLlavaDescription(LlavaAdapter):
        family = "plugin_llava"
        model_classes = ("PluginLlava",)

    monkeypatch.setattr(reg, "_entry_points", lambda: [_EntryPoint(PluginLlavaDescription)])
    stock, make = BUILDERS["llava"]()
    model = PluginLlava(stock.config).eval()
    model.load_state_dict(stock.state_dict())
    assert isinstance(adapter_for(model), PluginLlavaDescription) and adapter_for(stock).family == "llava"
    inputs = make(batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtcompress.apply(model, vtcompress.get("random", budget=1.0)):
            same = model(**inputs).logits
        with vtcompress.apply(model, vtcompress.get("fastervlm", budget=4)) as handle:
            model(**inputs)
    assert torch.equal(same, ref)
    assert handle.last.num_tokens[:, 1].tolist() == [4, 4]
