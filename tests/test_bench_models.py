"""`vtcompress bench --model DIR --images DIR` and `vtcompress.bench.run` on tiny stock LLaVA and Qwen2-VL models
saved with real processors (tokenizers built offline, no download): rows per method x budget, fidelity 1 / KL 0
at budget 1.0, image tokens as the budget asks, KV bytes equal to the measured cache, files and plot written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vtcompress
from models_util import IMAGE, VOCAB, tiny_llava, tiny_qwen2_vl
from vtcompress.bench import BenchTable, ImagePrompt, bench_main, load_samples, run
from vtcompress.bench.fidelity import encode
from vtcompress.bench.latency import time_interleaved

BUDGETS = [1.0, 0.5, 4]
METHODS = ["random", "fastv", "visionzip"]
PARAMS = {"fastv": {"layer": 1}}  # the tiny LLMs have 2 layers
SIZES = [(20, 30), (16, 16), (40, 24), (24, 16)]  # (H, W) of the test images

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ' : ' }}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "{{ IMG }}{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant :' }}{% endif %}")


def tiny_tokenizer(specials: dict[str, int]):
    """A word-level fast tokenizer over the tiny models' 128 ids: ids 0-3 pad / bos / eos / unk, ``specials`` at
    their ids (the models' placeholder ids), ``w<i>`` words elsewhere (what generated ids decode to)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    base = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    taken = set(base.values()) | set(specials.values())
    vocab = {**base, **specials, **{f"w{i}": i for i in range(VOCAB) if i not in taken}}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([*base, *specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left")


def llava_with_processor():
    """tiny_llava (16 px CLIP, 16 image tokens) and a real ``LlavaProcessor`` with a chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    model, _ = tiny_llava()
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tiny_tokenizer({"<image>": IMAGE}), patch_size=4,
                               image_token="<image>", vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=TEMPLATE.replace("IMG", "'<image> '"))
    return model, processor


def qwen2_vl_with_processor():
    """tiny_qwen2_vl and the stock ``Qwen2VLProcessor`` (its own placeholder expansion, M-RoPE token types) with
    images only: its video processor needs torchvision, which the CPU test environment does not have, so a
    subclass leaves that one argument out (nothing else changes)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    model, _ = tiny_qwen2_vl()
    tok = tiny_tokenizer({"<|image_pad|>": IMAGE, "<|video_pad|>": 121, "<|vision_start|>": 122,
                          "<|vision_end|>": 123})
    images = Qwen2VLImageProcessor(patch_size=2, temporal_patch_size=2, merge_size=2,
                                   size={"shortest_edge": 64, "longest_edge": 1024})
    template = TEMPLATE.replace("IMG", "'<|vision_start|><|image_pad|><|vision_end|> '")
    return model, ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=template)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    (d / "notes.txt").write_text("not an image")  # ignored
    return d


@pytest.fixture(scope="module")
def llava_cli(tmp_path_factory, image_dir):
    """`vtcompress bench --model DIR --images DIR` on a saved tiny LLaVA: (exit code, stdout, out dir, model dir)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("llava")
    model, processor = llava_with_processor()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    out = root / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = bench_main(["--model", str(root / "model"), "--images", str(image_dir), "--methods", ",".join(METHODS),
                           "--budgets", ",".join(map(str, BUDGETS)), "--param", "fastv.layer=1", "--batch-size", "3",
                           "--max-new-tokens", "4", "--latency-batch", "2", "--repeats", "1", "--out", str(out)])
    return code, buf.getvalue(), out, root / "model"


def rows_of(out) -> list[dict]:
    return json.loads((out / "bench.json").read_text())["rows"]


def by(rows, method, budget=None) -> dict:
    (row,) = [r for r in rows if r["method"] == method and (method == "full" or r["budget"] == budget)]
    return row


def test_llava_cli_writes_a_row_per_method_and_budget(llava_cli):
    code, printed, out, _ = llava_cli
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"bench.md", "bench.csv", "bench.json", "bench.png"}
    rows = rows_of(out)
    assert len(rows) == 1 + len(METHODS) * len(BUDGETS) and rows[0]["method"] == "full"
    assert {(r["method"], r["budget"]) for r in rows[1:]} == {(m, b) for m in METHODS for b in BUDGETS}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert "| full |" in printed and printed.count("| visionzip |") == len(BUDGETS)
    assert (out / "bench.md").read_text() in printed
    meta = json.loads((out / "bench.json").read_text())["meta"]
    import transformers

    assert (meta["vtcompress"], meta["transformers"], meta["torch"]) == (
        vtcompress.__version__, transformers.__version__, torch.__version__)
    assert meta["samples"] == len(SIZES) and meta["model_class"] == "LlavaForConditionalGeneration"
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 300


def test_llava_budget_one_is_the_stock_model(llava_cli):
    rows = rows_of(llava_cli[2])
    for m in METHODS:
        r = by(rows, m, 1.0)
        assert (r["answer_match"], r["top1_match"], r["kl"]) == (1.0, 1.0, 0.0)
        assert r["tokens_in"] == r["tokens_after"] == 16 and r["kv_ratio"] == 1.0
        if m == "fastv":  # it still scores the tokens at layer 1: one query row of attention, counted
            assert 1.0 < r["flops_ratio"] < 1.05
        else:
            assert r["flops_ratio"] == 1.0


def test_llava_image_tokens_follow_the_budget(llava_cli):
    rows = rows_of(llava_cli[2])
    for b, k in ((0.5, 8), (4, 4)):
        for m in ("random", "visionzip"):  # projector stage: k tokens enter the LLM
            r = by(rows, m, b)
            assert r["tokens_in"] == r["tokens_after"] == r["budget_tokens"] == k and r["prune_layers"] == ""
            assert 0 < r["flops_ratio"] < 1 and 0 < r["kv_ratio"] < 1
            assert 0.0 <= r["answer_match"] <= 1.0 and r["kl"] >= 0.0
        fv = by(rows, "fastv", b)  # decoder stage: all 16 enter, k remain from layer 1 on
        assert (fv["tokens_in"], fv["tokens_after"], fv["tokens_avg"], fv["prune_layers"]) == (16, k, (16 + k) / 2,
                                                                                                "1")
    assert by(rows, "random", 4)["flops_ratio"] < by(rows, "random", 0.5)["flops_ratio"]
    assert by(rows, "full")["latency_ratio"] == 1.0 and all(r["latency_ratio"] > 0 for r in rows)


def test_kv_bytes_and_first_token_kl_match_the_model(llava_cli, image_dir):
    """One sample: the KV column equals the bytes of the cache a prefill really leaves (at 2 bytes per value), and
    the KL column the KL of the two models' last-position logits computed here (a sharpened LM head, so that the
    first-token distributions are far from uniform and KL(full || method) differs from KL(method || full))."""
    model, processor = llava_with_processor()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    sample = load_samples(image_dir, prompt="what is it ?", limit=1)
    table = run(model, processor, ["fastv", "random"], [0.5], sample, params=PARAMS, max_new_tokens=2,
                time_latency=False, progress=False)
    inputs = encode(model, processor, sample)

    def measured(method):
        with torch.no_grad(), vtcompress.apply(model, method) if method else torch.no_grad():
            out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        nbytes = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 2
        return nbytes, torch.log_softmax(out.logits[0, -1].float(), -1)

    full_bytes, p = measured(None)
    assert table.row("full")["kv_kib"] * 1024 == full_bytes
    for name in ("fastv", "random"):
        nbytes, q = measured(vtcompress.get(name, budget=0.5, **PARAMS.get(name, {})))
        r = table.row(name, 0.5)
        assert r["kv_kib"] * 1024 == nbytes < full_bytes
        kl = float((p.exp() * (p - q)).sum())
        assert r["kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-2
        assert r["top1_match"] == float(p.argmax() == q.argmax())


@pytest.fixture(scope="module")
def qwen_table(image_dir):
    model, processor = qwen2_vl_with_processor()
    samples = load_samples(image_dir, prompt="what is it ?")
    table = run(model, processor, METHODS, BUDGETS, samples, params=PARAMS, batch_size=4, max_new_tokens=4,
                latency_batch=2, repeats=1, progress=False)
    return model, processor, samples, table


def _image_tokens(processor, samples) -> list[int]:
    grids = processor.image_processor([s.image for s in samples], return_tensors="pt")["image_grid_thw"]
    return (grids.prod(-1) // 4).tolist()


def test_qwen2_vl_api_rows_budget_one_and_token_counts(qwen_table):
    """Images of four sizes in one batch (40, 16, 60 and 24 tokens): the counts per image follow the budget."""
    _, processor, samples, table = qwen_table
    assert isinstance(table, BenchTable) and table.kind == "fidelity" and len(table) == 1 + 9
    n = _image_tokens(processor, samples)
    assert len(set(n)) == len(n)  # really ragged
    full = table.row("full")
    assert full["tokens_in"] == np.mean(n) and full["gflops"] is None and "qwen2_vl" in table.meta["flops"]
    for m in METHODS:
        r = table.row(m, 1.0)
        assert r["status"] == "ok" and (r["answer_match"], r["top1_match"], r["kl"]) == (1.0, 1.0, 0.0)
        assert r["tokens_after"] == np.mean(n) and r["kv_ratio"] == 1.0 and r["flops_ratio"] is None
    for b in (0.5, 4):
        want = [min(max(1, round(b * k)), k) if isinstance(b, float) else min(b, k) for k in n]
        for m in ("random", "visionzip"):
            r = table.row(m, b)
            assert r["status"] == "ok" and r["tokens_in"] == r["tokens_after"] == np.mean(want) == r["budget_tokens"]
        fv = table.row("fastv", b)
        assert fv["tokens_in"] == np.mean(n) and fv["tokens_after"] == np.mean(want) and fv["prune_layers"] == "1"


def test_qwen2_vl_table_formats(qwen_table, tmp_path):
    _, _, _, table = qwen_table
    md = table.to_markdown()
    assert md.startswith("| method | family | stage | budget |") and "| n/a | n/a |" in md
    assert "FLOPs n/a: prefill FLOPs are modelled for LLaVA-style configs" in md
    csv_text = table.to_csv(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_bytes().decode() == csv_text
    assert len(csv_text.strip().splitlines()) == 1 + len(table)
    doc = json.loads(table.to_json())
    assert [r["method"] for r in doc["rows"]][0] == "full" and doc["meta"]["samples"] == len(SIZES)
    paths = table.write(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"bench.md", "bench.csv", "bench.json", "bench.png"}
    assert paths["md"].read_text() == md + "\n"
    with pytest.raises(KeyError, match="no row for method='tome'"):
        table.row("tome", 0.5)


def test_qwen2_vl_cli(tmp_path, image_dir, monkeypatch):
    """The CLI on a saved Qwen2-VL directory; its processor comes from the same constructor as above (the stock
    AutoProcessor cannot load a Qwen2-VL processor without torchvision)."""
    import vtcompress.loading as loading  # the one loader of the command lines

    model, processor = qwen2_vl_with_processor()
    model.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(loading, "load_processor", lambda spec: processor)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"what is in picture {i} ?" for i in range(len(SIZES))) + "\n\n")
    code = bench_main(["--model", str(tmp_path / "model"), "--images", str(image_dir), "--prompts", str(prompts),
                       "--methods", "random,fastv", "--budgets", "0.5", "--param", "fastv.layer=1",
                       "--max-new-tokens", "3", "--no-latency", "--out", str(tmp_path / "out")])
    assert code == 0
    rows = rows_of(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"] * 3 and rows[0]["latency_ms"] is None
    assert (tmp_path / "out" / "bench.png").is_file()


def test_load_samples_prompts(image_dir, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("describe it\n")
    assert [s.prompt for s in load_samples(image_dir, one)] == ["describe it"] * len(SIZES)
    got = load_samples(image_dir, limit=2)
    assert [s.name for s in got] == ["img0.png", "img1.png"] and got[0].image.size == (30, 20)
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match="2 prompts for 4 images"):
        load_samples(image_dir, bad)
    with pytest.raises(ValueError, match="holds no image file"):
        load_samples(tmp_path)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--images", "/nonexistent/dir"], "is not a directory"),
        (["--prompts", "p.txt"], "--prompts needs --images DIR"),
        (["--images", "IMAGES", "--methods", "random", "--model", "/nonexistent/model"],
         "is not a local directory and could not be loaded as a Hub id"),
    ],
)
def test_cli_bad_input(argv, match, capsys, tmp_path, image_dir):
    argv = [str(image_dir) if a == "IMAGES" else a for a in argv]
    assert bench_main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_cli_model_without_image_processor_is_refused(llava_cli, tmp_path, image_dir, capsys):
    """A non-testbed directory holding only a tokenizer: one message saying what to save."""
    model, processor = llava_with_processor()
    model.save_pretrained(tmp_path / "m")
    processor.tokenizer.save_pretrained(tmp_path / "m")
    assert bench_main(["--model", str(tmp_path / "m"), "--images", str(image_dir), "--out", str(tmp_path / "o")]) == 2
    assert "no image processor; save the model's processor next to it" in capsys.readouterr().err


def test_python_api_accepts_pairs_and_refuses_bad_input():
    model, processor = llava_with_processor()
    img = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    table = run(model, processor, ["uniform"], [0.25], [(img, "what is it ?"), img], max_new_tokens=2,
                time_latency=False, progress=False)
    assert table.meta["samples"] == 2 and table.row("uniform", 0.25)["tokens_in"] == 4
    assert isinstance(table.rows[1], dict) and ImagePrompt(img).prompt.startswith("Describe")
    with pytest.raises(ValueError, match="samples is empty"):
        run(model, processor, ["uniform"], [0.25], [], progress=False)
    with pytest.raises(ValueError, match="budget=1.5"):
        run(model, processor, ["uniform"], [1.5], [img], progress=False)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run(model, processor, ["nope"], [0.5], [img], progress=False)
    with pytest.raises(ValueError, match="unsupported model"):
        run(torch.nn.Linear(2, 2), processor, ["uniform"], [0.5], [img], progress=False)


def test_time_interleaved_alternates():
    model, make_inputs = tiny_llava()
    inputs = make_inputs(batch=1)
    t = time_interleaved(model, inputs, vtcompress.get("random", budget=0.5), repeats=3, warmup=0)
    assert len(t["full_times_s"]) == len(t["method_times_s"]) == 3
    assert t["ratio"] == t["method_s"] / t["full_s"] > 0
    with pytest.raises(ValueError, match="repeats=0"):
        time_interleaved(model, inputs, None, repeats=0)


def test_packaged_testbed_with_images(tmp_path, image_dir, capsys):
    """No --model: the packaged testbed, encoded from its tokenizer as the testbed does (no processor saved)."""
    from vtcompress.testbed import WEIGHTS_DIR

    assert (WEIGHTS_DIR / "config.json").is_file()  # the weights ship with the package
    code = bench_main(["--images", str(image_dir), "--samples", "2", "--methods", "uniform", "--budgets", "1.0,0.25",
                       "--prompt", "what colour is the circle ?", "--max-new-tokens", "1", "--no-latency",
                       "--no-plot", "--out", str(tmp_path)])
    assert code == 0 and "packaged testbed, 2 images" in capsys.readouterr().out
    rows = rows_of(tmp_path)
    assert [r["status"] for r in rows] == ["ok"] * 3 and rows[0]["tokens_in"] == 144
    one, quarter = by(rows, "uniform", 1.0), by(rows, "uniform", 0.25)
    assert (one["answer_match"], one["kl"], one["tokens_in"]) == (1.0, 0.0, 144)
    assert quarter["tokens_in"] == 36 and quarter["flops_ratio"] < 1


def test_llava_next_api(image_dir):
    """An anyres family (base crop + high-resolution grid with newline tokens) through its stock LlavaNextProcessor."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from models_util import tiny_llava_next

    model, _ = tiny_llava_next()
    images = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                     image_grid_pinpoints=model.config.image_grid_pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tiny_tokenizer({"<image>": IMAGE}), patch_size=4,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   image_token="<image>", chat_template=TEMPLATE.replace("IMG", "'<image> '"))
    samples = load_samples(image_dir, prompt="what is it ?")
    table = run(model, processor, ["random", "fastv"], [1.0, 0.5], samples, params=PARAMS, max_new_tokens=3,
                time_latency=False, progress=False)
    full = table.row("full")
    assert [r["status"] for r in table] == ["ok"] * 5 and full["tokens_in"] > 16 and full["gflops"] is None
    for m in ("random", "fastv"):
        r = table.row(m, 1.0)
        assert (r["answer_match"], r["top1_match"], r["kl"], r["tokens_after"]) == (1.0, 1.0, 0.0, full["tokens_in"])
    assert table.row("random", 0.5)["tokens_in"] < full["tokens_in"]
    fv = table.row("fastv", 0.5)
    assert fv["tokens_in"] == full["tokens_in"] > fv["tokens_after"] and fv["kv_ratio"] < 1
