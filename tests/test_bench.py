"""The benchmark runner: a reduced sweep on the testbed architecture writes every output with consistent rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vtcompress
from vtcompress.bench import (
    TokenProbe,
    bench_main,
    format_summary,
    format_table,
    run_sweep,
    sort_rows,
    time_prefill,
    write_outputs,
)
from vtcompress.bench.flops import VLMArch, kv_cache_bytes, prefill_flops
from vtcompress.testbed import encode, evaluate, samples
from vtcompress.testbed.model import build_model, build_tokenizer

N = 16
BUDGETS = [0.5, 0.1]  # no trainable checkpoint ships at these budgets


@pytest.fixture(scope="module")
def testbed():
    """The testbed architecture (144 image tokens, 4+4 layers) with random weights; the test set's first N."""
    tok = build_tokenizer()
    model = build_model(tok).eval()
    return model, tok, samples("test", N, seed=0)


@pytest.fixture(scope="module")
def sweep(testbed):
    model, tok, test = testbed
    return run_sweep(model, tok, ["random", "fastv", "qformer"], BUDGETS, test, batch_size=8, latency_batch=2,
                     repeats=1, progress=False)


def by(rows, method, budget):
    (row,) = [r for r in rows if r["method"] == method and r["budget"] == budget]
    return row


def text_lengths(tok, model, test) -> list[int]:
    """Non-image tokens of each sample's own (unpadded) prompt."""
    out = []
    for s in test:
        enc = encode(tok, [s], model.config)
        out.append(int(enc["attention_mask"].sum()) - 144)
    return out


def test_full_row_is_the_reference(testbed, sweep):
    model, tok, test = testbed
    full = sweep[0]
    assert full["method"] == "full" and full["status"] == "ok"
    assert full["retained"] == 100.0 or (full["accuracy"] == 0 and np.isnan(full["retained"]))
    assert full["agreement"] == 100.0 and full["flops_ratio"] == 1.0 and full["latency_ratio"] == 1.0
    assert full["tokens_in"] == full["tokens_after"] == 144 and full["prune_layers"] == ""
    assert full["accuracy"] == evaluate(model, tok, test, batch_size=8)["accuracy"]  # the testbed's own number


def test_rows_are_consistent(testbed, sweep):
    model, tok, test = testbed
    ok = [r for r in sweep if r["status"] == "ok"]
    assert len(ok) == 1 + 2 * len(BUDGETS)
    for r in ok:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 100.0
        assert {k for k in r if k.startswith("acc_")} == {f"acc_{s}" for s in {x.skill for x in test}}
        assert r["tokens_after"] <= r["budget_tokens"] + 1e-9 or r["method"] == "full"
        assert r["gflops"] > 0 and r["latency_ms"] > 0
    for b in BUDGETS:
        k = round(b * 144)
        rnd, fv = by(sweep, "random", b), by(sweep, "fastv", b)
        assert rnd["budget_tokens"] == fv["budget_tokens"] == k
        # projector stage: fewer tokens enter the LLM; decoder stage: all enter, k remain from layer 2 on
        assert rnd["tokens_in"] == rnd["tokens_after"] == k and rnd["prune_layers"] == ""
        assert fv["tokens_in"] == 144 and fv["tokens_after"] == k and fv["prune_layers"] == "2"
        assert 0 < rnd["flops_ratio"] < fv["flops_ratio"] < 1
    assert by(sweep, "random", 0.1)["flops_ratio"] < by(sweep, "random", 0.5)["flops_ratio"]


def test_flops_column_is_the_analytic_count(testbed, sweep):
    """Mean of prefill_flops over the samples' own text lengths, with the measured schedule."""
    model, tok, test = testbed
    arch = VLMArch.from_config(model.config)
    t = text_lengths(tok, model, test)
    full = np.mean([prefill_flops(arch, text_tokens=n).total for n in t]) / 1e9
    rnd = np.mean([prefill_flops(arch, text_tokens=n, image_tokens=14).total for n in t]) / 1e9
    fv = np.mean([prefill_flops(arch, text_tokens=n, schedule=[(2, 72)], selection_rows=1).total for n in t]) / 1e9
    assert sweep[0]["gflops"] == pytest.approx(full, rel=1e-12)
    assert by(sweep, "random", 0.1)["gflops"] == pytest.approx(rnd, rel=1e-12)
    assert by(sweep, "fastv", 0.5)["gflops"] == pytest.approx(fv, rel=1e-12)
    # KV cache (2 bytes per value): FastV at layer 2 of 4 keeps the full cache in layers 0-1
    kv_full = np.mean([kv_cache_bytes(arch, n) for n in t])
    kv_fv = np.mean([kv_cache_bytes(arch, n, schedule=[(2, 72)]) for n in t])
    assert sweep[0]["kv_kib"] * 1024 == pytest.approx(kv_full, rel=1e-12) and sweep[0]["kv_ratio"] == 1.0
    assert by(sweep, "fastv", 0.5)["kv_ratio"] == pytest.approx(kv_fv / kv_full, rel=1e-12)


def test_accuracy_is_evaluate_under_apply(testbed, sweep):
    model, tok, test = testbed
    with vtcompress.apply(model, vtcompress.get("random", budget=0.5)):
        acc = evaluate(model, tok, test, batch_size=8)["accuracy"]
    assert by(sweep, "random", 0.5)["accuracy"] == acc


def test_untrainable_rows_are_reported_not_dropped(sweep):
    for b in BUDGETS:
        r = by(sweep, "qformer", b)
        assert r["status"].startswith("skipped: trainable, no checkpoint") and "accuracy" not in r
    table = format_table(sweep)
    assert "Skipped (2):" in table and table.count("- qformer @") == 2


def test_sorted_full_then_budget_then_accuracy(sweep):
    rows = sort_rows(sweep)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok[0]["method"] == "full"
    keys = [(-r["budget_tokens"], -r["accuracy"]) for r in ok[1:]]
    assert keys == sorted(keys)
    assert all(r["status"] != "ok" for r in rows[len(ok):])  # skipped rows last


def test_write_outputs(tmp_path, sweep):
    paths = write_outputs(sweep, tmp_path, meta={"samples": N})
    assert {p.name for p in tmp_path.iterdir()} == {"bench.md", "summary.md", "bench.csv", "bench.json", "bench.png"}
    assert paths["summary"].read_text() == format_summary(sort_rows(sweep), samples=N) + "\n"
    with paths["csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(sweep) and csv_rows[0]["method"] == "full"
    assert float(csv_rows[0]["retained"]) == pytest.approx(100.0) or sweep[0]["accuracy"] == 0
    doc = json.loads(paths["json"].read_text())
    assert doc["meta"] == {"samples": N} and len(doc["rows"]) == len(sweep)
    assert [r["method"] for r in doc["rows"]] == [r["method"] for r in sort_rows(sweep)]
    md = paths["md"].read_text()
    assert md.startswith("| method |") and md.count("\n| random |") == 2 and md.count("\n| fastv |") == 2
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


def test_summary_is_retained_per_budget(sweep):
    text = format_summary(sweep, at=0.1, samples=N)
    full = sweep[0]
    assert text.startswith(f"Full model (144 image tokens): **{100 * full['accuracy']:.1f} %** on {N} test questions")
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| method | family | stage | 50% | 10% | FLOPs x @ 10% | latency x @ 10% |"
    cells = {ln.split(" | ")[0][2:]: ln[2:-2].split(" | ") for ln in lines[1:]}
    assert set(cells) == {"random", "fastv"}  # qformer has no checkpoint at these budgets: no row
    for m in ("random", "fastv"):
        r50, r10 = by(sweep, m, 0.5), by(sweep, m, 0.1)
        assert cells[m][1:] == [r10["family"], r10["stage"], f"{r50['retained']:.0f}", f"{r10['retained']:.0f}",
                                f"{r10['flops_ratio']:.2f}", f"{r10['latency_ratio']:.2f}"]
    # best retained at the chosen budget first
    order = [ln.split(" | ")[0][2:] for ln in lines[1:]]
    assert order == sorted(order, key=lambda m: -by(sweep, m, 0.1)["retained"])


def test_parallel_workers_match_sequential(testbed, sweep):
    model, tok, test = testbed
    par = run_sweep(model, tok, ["random", "fastv", "qformer"], BUDGETS, test, batch_size=8, progress=False,
                    time_latency=False, workers=2)
    keys = ("method", "budget", "status", "accuracy", "tokens_in", "tokens_after", "gflops", "agreement")
    assert [[r.get(k) for k in keys] for r in par] == [[r.get(k) for k in keys] for r in sweep]
    assert all(r.get("latency_ratio") is None for r in par)


def test_probe_counts_and_leaves_no_hooks(testbed):
    model, tok, test = testbed
    enc = encode(tok, test[:3], model.config)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def n_hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = n_hooks()
    with vtcompress.apply(model, vtcompress.get("fastv", budget=36)), TokenProbe(model) as probe, torch.no_grad():
        model(**inputs)
    assert n_hooks() == before
    (rec,) = probe.records
    assert rec.image == [144] * 3 and rec.images == [1] * 3
    assert rec.text == (enc["attention_mask"].sum(1) - 144).tolist()
    length = enc["input_ids"].shape[1]
    assert rec.llm_lengths == [length, length, length - 108, length - 108]  # FastV at layer 2 keeps 36 of 144
    assert rec.vision_lengths == [144] * 4


def test_time_prefill_restores_threads(testbed):
    model, tok, test = testbed
    enc = encode(tok, test[:1], model.config)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    before = torch.get_num_threads()
    out = time_prefill(model, inputs, repeats=2, warmup=0, num_threads=1)
    assert torch.get_num_threads() == before and len(out["times_s"]) == 2 and out["median_s"] > 0
    with pytest.raises(ValueError, match="repeats=0"):
        time_prefill(model, inputs, repeats=0)


def test_cli_writes_everything(tmp_path, capsys):
    out = tmp_path / "res"
    code = bench_main(["--methods", "uniform", "--budgets", "0.22", "--samples", "8", "--out", str(out),
                       "--batch-size", "8", "--latency-batch", "2", "--repeats", "1", "--workers", "1"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"bench.md", "bench.csv", "bench.json", "bench.png", "gallery.png"}
    printed = capsys.readouterr().out
    assert "| full |" in printed and "| uniform |" in printed
    import transformers

    import vtcompress

    meta = json.loads((out / "bench.json").read_text())["meta"]
    assert (meta["torch"], meta["transformers"], meta["vtcompress"]) == (
        torch.__version__, transformers.__version__, vtcompress.__version__)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--budgets", "1.5"], "budget=1.5"),
        (["--methods", "nope"], "unknown nope"),
        (["--budgets", "x"], "'x'"),
        (["--methods", "fastv", "--param", "fastv.lay=1"], "no parameter(s) lay"),
        (["--methods", "fastv", "--param", "layer=1"], "METHOD.KEY=VALUE"),
    ],
)
def test_cli_bad_input(argv, match, capsys, tmp_path):
    assert bench_main([*argv, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_average_tokens_over_layers(sweep):
    """Projector stage: the same in every layer; FastV at layer 2 of 4: (144 + 144 + k + k) / 4."""
    for b in BUDGETS:
        k = round(b * 144)
        assert by(sweep, "random", b)["tokens_avg"] == k
        assert by(sweep, "fastv", b)["tokens_avg"] == (2 * 144 + 2 * k) / 4


def test_method_params_reach_the_method(testbed):
    model, tok, test = testbed
    rows = run_sweep(model, tok, ["fastv"], [0.25], test[:4], batch_size=4, progress=False, time_latency=False,
                     params={"fastv": {"layer": 1}})
    assert rows[1]["prune_layers"] == "1" and rows[1]["tokens_after"] == 36
    with pytest.raises(ValueError, match="no parameter"):
        run_sweep(model, tok, ["fastv"], [0.25], test[:4], progress=False, params={"fastv": {"layr": 1}})
    with pytest.raises(ValueError, match="not among the methods"):
        run_sweep(model, tok, ["fastv"], [0.25], test[:4], progress=False, params={"random": {"seed": 1}})


def test_gallery_seam(testbed, sweep, tmp_path, monkeypatch):
    """gallery.png holds every method that ran at the budget; without viz.gallery the bench says so."""
    import vtcompress.viz as viz
    from vtcompress.bench import write_gallery

    model, tok, test = testbed
    path = write_gallery(model, tok, test[0], sweep, 0.5, tmp_path / "gallery.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    assert write_gallery(model, tok, test[0], sweep, 0.3, tmp_path / "g2.png") == "no method ran at budget 0.3"
    monkeypatch.delattr(viz, "gallery")
    assert write_gallery(model, tok, test[0], sweep, 0.5, tmp_path / "g3.png") == \
        "vtcompress.viz.gallery is not available"
    assert not (tmp_path / "g3.png").exists()


def test_cli_model_that_is_not_testbed_style_is_refused(capsys, tmp_path):
    """Without --images, a real LLaVA directory (other image geometry) gets one clear message pointing at --images,
    not a traceback from the vision tower (with --images it is measured: tests/test_bench_models.py)."""
    from models_util import BUILDERS

    model, _ = BUILDERS["llava"]()
    model.save_pretrained(tmp_path / "llava")
    assert bench_main(["--model", str(tmp_path / "llava"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a testbed-style model" in err and "('llava', 96, 8)" in err and "Traceback" not in err
    assert "pass --images DIR" in err
