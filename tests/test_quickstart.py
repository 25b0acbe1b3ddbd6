"""The first hour: ``handle.summary()`` (what the last call saved), ``CompressedInputs`` nesting, and the README's
quick start run as written (offline: the embedded testbed saved as a Hugging Face model directory)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import vtcompress
from models_util import tiny_llava, tiny_qwen2_vl
from vtcompress import get
from vtcompress.bench.flops import VLMArch, layer_lengths, prefill_flops, sequence_prefill_flops
from vtcompress.bench.quality import TokenProbe, flops_of_record

# ------------------------------------------------------------------------------------------ closed forms
# tiny_llava: CLIP 16 px / 4 px patches (16 patches + [CLS]), hidden 32, MLP 64, 3 layers; projector 32 -> 32 -> 32;
# Llama hidden 32, MLP 64 (gated), 2 layers, 4 heads of 8, 2 KV heads; vocabulary 128. Images: 16 tokens each.
D, HEADS, KV, HD, INTER, VOCAB, LAYERS = 32, 4, 2, 8, 64, 128, 2
V_D, V_INTER, V_LAYERS, PATCHES, PATCH = 32, 64, 3, 16, 4


def _vision_per_image(tokens_per_layer=(PATCHES,) * V_LAYERS) -> int:
    conv = 2 * PATCHES * V_D * 3 * PATCH**2
    layers = sum(4 * 2 * (n + 1) * V_D * V_D + 4 * (n + 1) ** 2 * V_D + 2 * 2 * (n + 1) * V_D * V_INTER
                 for n in tokens_per_layer)
    return conv + layers


def _projector_per_image(tokens: int = PATCHES) -> int:
    return 2 * tokens * V_D * D + 2 * tokens * D * D


def _decoder_layer(n: int) -> int:
    return 2 * 2 * n * D * HEADS * HD + 2 * 2 * n * D * KV * HD + 4 * HEADS * n * n * HD + 3 * 2 * n * D * INTER


def _selection(n: int) -> int:  # one query row (the last token) over the n tokens entering layer K - 1
    return 2 * D * HEADS * HD + 2 * n * D * KV * HD + 2 * HEADS * n * HD


def _sample_flops(text: int, images: int, visual_per_layer, stages=(), vision_layers=None) -> int:
    lengths = [text + v for v in visual_per_layer]
    vision = _vision_per_image(vision_layers) if vision_layers else _vision_per_image()
    # the projector reads hidden_states[-2], the input of vision layer 2 ([CLS] dropped)
    projector = _projector_per_image(vision_layers[2] if vision_layers else PATCHES)
    return (images * (vision + projector) + sum(_decoder_layer(n) for n in lengths)
            + sum(_selection(lengths[k - 1]) for k in stages) + 2 * D * VOCAB)


def _setup():
    model, make = tiny_llava()
    inputs = make(batch=2, images=[1, 2])
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    text = (mask.sum(1) - ((ids == 120) & mask.bool()).sum(1)).tolist()
    return model, inputs, text


def test_summary_projector_method_closed_form():
    model, inputs, text = _setup()
    with torch.no_grad(), vtcompress.apply(model, get("random", budget=4)) as handle:
        model(**inputs)
        inside = handle.summary()
    s = handle.summary()  # also after the block
    assert s == inside
    assert s.samples == 2 and s.image_sample == (0, 1, 1) and s.text_tokens == tuple(text)
    (st,) = s.stages
    assert (st.stage, st.per, st.methods, st.layer) == ("projector", "image", ("random",), None)
    assert st.tokens_in == (16, 16, 16) and st.tokens_out == (4, 4, 4)
    assert s.visual_full == (16, 32) and s.visual_kept == (4, 8)
    full = _sample_flops(text[0], 1, [16, 16]) + _sample_flops(text[1], 2, [32, 32])
    comp = _sample_flops(text[0], 1, [4, 4]) + _sample_flops(text[1], 2, [8, 8])
    assert (s.flops, s.flops_full) == (comp, full)
    assert s.flops_ratio == comp / full
    text_out = str(s)
    assert "16 -> 4" in text_out and "total 48 -> 12" in text_out and f"ratio {comp / full:.3f}" in text_out


def test_summary_decoder_method_closed_form():
    """A decoder-stage method: handle.last has no projector record, the summary still counts per stage."""
    model, inputs, text = _setup()
    with torch.no_grad(), vtcompress.apply(model, get("fastv", budget=0.5, layer=1)) as handle:
        model(**inputs)
        inside = handle.summary()
    s = handle.summary()  # after the block: from the counts the handle kept when it was removed
    assert s == inside
    (st,) = s.stages
    assert (st.stage, st.per, st.layer) == ("decoder", "sample", 1)
    assert st.tokens_in == (16, 32) and st.tokens_out == (8, 16)
    assert s.visual_full == (16, 32) and s.visual_kept == (8, 16)
    full = _sample_flops(text[0], 1, [16, 16]) + _sample_flops(text[1], 2, [32, 32])
    comp = _sample_flops(text[0], 1, [16, 8], stages=(1,)) + _sample_flops(text[1], 2, [32, 16], stages=(1,))
    assert (s.flops, s.flops_full) == (comp, full)
    assert "layer 1" in str(s) and "16 -> 8" in str(s)


def test_summary_composed_list_closed_form_and_bench_agree():
    """Projector (8 per image) then decoder (half from layer 1): both stages, FLOPs by hand, and the same total as
    the bench's measured path (TokenProbe + flops_of_record) on the same call."""
    model, inputs, text = _setup()
    methods = [get("random", budget=8), get("fastv", budget=0.5, layer=1)]
    with torch.no_grad(), vtcompress.apply(model, methods) as handle:
        model(**inputs)
    s = handle.summary()
    pro, dec = s.stages
    assert pro.tokens_in == (16, 16, 16) and pro.tokens_out == (8, 8, 8)
    assert dec.tokens_in == (8, 16) and dec.tokens_out == (4, 8) and dec.layer == 1
    comp = _sample_flops(text[0], 1, [8, 4], stages=(1,)) + _sample_flops(text[1], 2, [16, 8], stages=(1,))
    assert s.flops == comp
    assert s.methods == ("random(budget=8)", "fastv(budget=0.5)")
    # the bench reads padded layer lengths, so compare on one sample
    one = {k: v[1:] if k != "pixel_values" else v[1:] for k, v in inputs.items()}
    with torch.no_grad(), vtcompress.apply(model, methods) as handle, TokenProbe(model) as probe:
        model(**one)
    arch = VLMArch.from_config(model.config)
    assert handle.summary().flops == sum(flops_of_record(arch, probe.records[-1], logits="last", selection_rows=1))


def test_summary_encoder_stage_counts_the_merged_tower():
    model, inputs, text = _setup()
    with torch.no_grad(), vtcompress.apply(model, get("tome_encoder", budget=8)) as handle, \
            TokenProbe(model) as probe:
        model(**inputs)
    s = handle.summary()
    (st,) = s.stages
    assert st.stage == "encoder" and st.tokens_out == (8, 8, 8)
    rec = probe.records[-1]
    assert s.flops == sum(flops_of_record(VLMArch.from_config(model.config), rec, logits="last"))
    comp = sum(_sample_flops(t, i, [8 * i] * 2, vision_layers=rec.vision_lengths)
               for t, i in zip(text, (1, 2), strict=True))
    assert s.flops == comp and rec.vision_lengths[0] == 16 and rec.vision_lengths[-1] < 16


def test_summary_with_beams_counts_samples_not_copies():
    model, inputs, _ = _setup()
    with torch.no_grad(), vtcompress.apply(model, get("random", budget=4)) as handle:
        model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2)
    s = handle.summary()
    assert s.samples == 2 and s.stages[0].tokens_out == (4, 4, 4)


def test_summary_other_family_has_tokens_but_no_flops():
    model, make = tiny_qwen2_vl()
    inputs = make(batch=2, images=[1, 1])
    with torch.no_grad(), vtcompress.apply(model, get("random", budget=0.5)) as handle:
        model(**inputs)
    s = handle.summary()
    assert s.stages[0].tokens_in == (6, 6) and s.stages[0].tokens_out == (3, 3)
    assert s.flops is None and s.flops_ratio is None and "llava" in s.note
    assert "not computed" in str(s)


def test_summary_before_any_call():
    model, _, _ = _setup()
    with vtcompress.apply(model, get("random", budget=4)) as handle:
        s = handle.summary()
    assert s.samples == 0 and s.stages == () and s.flops is None and "no call" in str(s)


def test_sequence_prefill_flops_equals_prefill_flops_for_equal_images():
    model, _, _ = _setup()
    arch = VLMArch.from_config(model.config)
    for image_tokens, schedule in ((16, ()), (9, ((1, 4),)), (16, ((1, 16),))):
        visual = [n - 5 for n in layer_lengths(arch, 5, image_tokens, 2, schedule)]
        a = prefill_flops(arch, 5, image_tokens, images=2, schedule=schedule, selection_rows=1)
        b = sequence_prefill_flops(arch, 5, visual, images=2, stages=[k for k, _ in schedule], selection_rows=1)
        assert a == b
    with pytest.raises(ValueError, match="one each"):
        sequence_prefill_flops(arch, 5, [16], images=1)
    with pytest.raises(ValueError, match=r"visual_tokens\[1\]"):
        sequence_prefill_flops(arch, 5, [8, 9], images=1)
    with pytest.raises(ValueError, match="stage layer K"):
        sequence_prefill_flops(arch, 5, [8, 8], images=1, stages=[0])


# ------------------------------------------------------------------------------------------ CompressedInputs
def test_compress_inputs_tokens_nest_per_image_then_per_view():
    from models_util import tiny_internvl, tiny_llava_next

    model, make = tiny_llava_next()
    inputs = make(batch=2, images=[1, 2])
    res = vtcompress.compress_inputs(model, get("random", budget=0.5), **inputs)
    assert len(res.tokens) == 3 == res.num_tokens.shape[0]  # one entry per image
    for views in res.tokens:
        assert all(isinstance(t, vtcompress.VisualTokens) and t.batch_size == 1 for t in views)
        assert views[0].grid == (4, 4)  # the base crop first
    assert res.tokens_of(1, 0) is res.tokens[1][0] and res.tokens_of(-1, -1) is res.tokens[-1][-1]
    with pytest.raises(ValueError, match="3 image"):
        res.tokens_of(3)
    with pytest.raises(ValueError, match="view"):
        res.tokens_of(0, len(res.tokens[0]))
    model, make = tiny_internvl()
    inputs = make(batch=1, images=[2])  # image k has 1 + k % 3 tiles
    res = vtcompress.compress_inputs(model, get("random", budget=0.5), **inputs)
    assert [len(v) for v in res.tokens] == [1, 2]
    model, make = tiny_llava()
    res = vtcompress.compress_inputs(model, get("random", budget=4), **make(batch=1))
    assert res.tokens_of().num_tokens == 4 and res.tokens[0][0] is res.tokens_of(0, 0)
    with pytest.raises(ValueError, match="no image"):
        vtcompress.compress_inputs(model, get("random", budget=4), **make(batch=1, images=[0])).tokens_of()


# ------------------------------------------------------------------------------------------ README quick start
ROOT = Path(__file__).resolve().parents[1]


def readme_quickstart() -> str:
    """The one ``python`` code block of the README's "Quick start" section."""
    section = (ROOT / "README.md").read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quick start section must hold exactly one python block"
    return blocks[0]


def save_testbed_as_hf_model(path: Path) -> None:
    """The embedded testbed as a Hugging Face model directory: weights, tokenizer, and a ``LlavaProcessor`` (CLIP
    image processor at 96 px with the testbed's normalisation, and a chat template rendering the testbed's prompt
    layout), so ``AutoProcessor`` / ``LlavaForConditionalGeneration.from_pretrained(path)`` load it."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vtcompress.testbed import IMAGE_SIZE, PATCH, PREAMBLE, load_testbed
    from vtcompress.testbed.model import PIXEL_MEAN, PIXEL_STD

    model, tok = load_testbed()
    template = (
        "{{ '<s> " + PREAMBLE + " ' }}{% for message in messages %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<image> ' }}{% endif %}{% endfor %}{% for c in message['content'] %}"
        "{% if c['type'] == 'text' %}{{ 'question : ' + c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'answer :' }}{% endif %}")
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                image_mean=PIXEL_MEAN.tolist(), image_std=PIXEL_STD.tolist())
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def test_testbed_processor_reproduces_the_testbed_encoding(tmp_path):
    """The processor of the offline twin builds exactly the testbed's own ids and pixels."""
    from PIL import Image
    from transformers import AutoProcessor

    from vtcompress.testbed import encode, load_testbed, samples

    save_testbed_as_hf_model(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    _, tok = load_testbed()
    for s in samples("test", 3):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        got = processor(images=Image.fromarray(s.image), text=processor.apply_chat_template(
            conv, add_generation_prompt=True), return_tensors="pt")
        ref = encode(tok, [s])
        assert torch.equal(got["input_ids"], ref["input_ids"])
        torch.testing.assert_close(got["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)


def test_readme_quickstart_runs_offline(tmp_path, monkeypatch):
    """The README's quick start, as written, with model_id pointing at the testbed, a testbed scene as photo.jpg
    and its question: it prints the right answer and the summary of what visionzip kept (144 -> 64)."""
    from PIL import Image

    from vtcompress.testbed import samples

    code = readme_quickstart()
    model_dir = tmp_path / "testbed-hf"
    save_testbed_as_hf_model(model_dir)
    sample = samples("test", 1)[0]
    Image.fromarray(sample.image).save(tmp_path / "photo.jpg", quality=95)
    for old, new in {'model_id = "llava-hf/llava-1.5-7b-hf"': f"model_id = {str(model_dir)!r}",
                     'question = "What is in this image?"': f"question = {sample.question!r}"}.items():
        assert code.count(old) == 1, f"the README quick start no longer has {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (quick start)", "exec"), {"__name__": "__quickstart__"})
    lines = out.getvalue().splitlines()
    assert lines[0].split()[0] == sample.answer
    assert lines[1] == "vtcompress savings of the last call: 1 sample, 1 image; visionzip(budget=64)"
    assert "visionzip (per image) 144 -> 64 image tokens" in lines[2]
    assert re.fullmatch(r"  prefill FLOPs \(analytic\) .* uncompressed: ratio 0\.\d+", lines[3])
    # the README shows this very output
    section = (ROOT / "README.md").read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"```text\n(.*?)```", section, re.S)
    assert shown and shown[0].splitlines() == lines[1:4]
