"""``vtcompress bench --video`` on the clip testbed: rows, kept counts, the FLOP / KV ratios in closed form, budget
1.0 equal to the full model, and the files it writes."""

import json

import pytest
import torch

import vtcompress
from vtcompress.bench.cli import bench_main
from vtcompress.bench.flops import sequence_prefill_flops
from vtcompress.bench.video import clip_methods, evaluate_with_counts, run_video_sweep
from vtcompress.methods.temporal import EVS
from vtcompress.models.llava import llava_style_arch
from vtcompress.testbed.clip_model import (
    TOKENS_PER_FRAME,
    encode_clips,
    evaluate_clips,
    load_clip_testbed,
    video_token_count,
)
from vtcompress.testbed.clips import clip_samples

torch.set_num_threads(1)
T = 4


@pytest.fixture(scope="module")
def testbed():
    return load_clip_testbed()


def test_clip_methods_read_features_or_frame_signals():
    names = clip_methods()
    assert {"evs", "dycoke", "fastvid", "prunevid", "holitom", "random", "divprune", "tome", "fastervlm",
            "visionzip", "prumerge"} <= set(names)
    assert not {"fastv", "qformer", "sparsevlm"} & set(names)  # decoder stage, trained, reads the prompt


def test_one_pass_scoring_is_the_testbeds_under_apply(testbed):
    """The sweep's one pass per batch (compress_inputs, then the model on the shortened inputs) scores as
    ``evaluate_clips`` does, stock and under ``vtcompress.apply``, clip for clip."""
    model, tok = testbed
    samples = clip_samples("val", 12, frames=T)
    got = evaluate_with_counts(model, tok, None, samples, batch_size=5)
    assert got["accuracy"] == evaluate_clips(model, tok, samples, batch_size=5)["accuracy"]
    assert got["video"] == [video_token_count(T)] * 12
    method = vtcompress.get("holitom", budget=0.25)
    got = evaluate_with_counts(model, tok, method, samples, batch_size=5)
    with torch.no_grad(), vtcompress.apply(model, method):
        want = evaluate_clips(model, tok, samples, batch_size=5)
    assert got["accuracy"] == want["accuracy"] and got["per_skill"] == want["per_skill"]
    assert all(v < video_token_count(T) for v in got["video"])


def test_rows_counts_and_ratios(testbed):
    model, tok = testbed
    rows = run_video_sweep(model, tok, ["evs", "random"], [0.5, 1.0], frames=[T], samples=6, latency=False,
                           progress=False, batch_size=4)
    assert [(r["method"], r["budget"]) for r in rows] == [("full", None), ("evs", 0.5), ("evs", 1.0),
                                                          ("random", 0.5), ("random", 1.0)]
    full, evs, evs1, rnd, rnd1 = rows
    assert full["video_tokens"] == video_token_count(T) == T * TOKENS_PER_FRAME + 1
    kept = EVS(budget=0.5).retained(T, TOKENS_PER_FRAME) + 1  # the video's newline always stays
    assert evs["video_tokens"] == kept and rnd["video_tokens"] == T * round(0.5 * TOKENS_PER_FRAME) + 1
    assert evs["retained"] == pytest.approx(kept / full["video_tokens"])
    # closed forms of the ratios: the same text for every variant, the tower on every frame
    samples = clip_samples("test", 6, frames=T)
    arch = llava_style_arch(model.config)
    n_full = video_token_count(T)
    text = [int(m) - n_full for m in encode_clips(tok, samples, model.config)["attention_mask"].sum(1)]

    def flops(v):
        return sum(sequence_prefill_flops(arch, x, [v] * arch.text.layers, images=T).total for x in text)

    assert evs["flops_ratio"] == pytest.approx(flops(kept) / flops(n_full))
    assert evs["kv_ratio"] == pytest.approx(sum(x + kept for x in text) / sum(x + n_full for x in text))
    for r in (evs1, rnd1):  # budget 1.0 is the stock model
        assert r["accuracy"] == full["accuracy"] and r["flops_ratio"] == 1.0 and r["retained"] == 1.0
        assert all(r[k] == full[k] for k in full if k.startswith("acc_"))


def test_cli_writes_the_table_the_json_and_the_plot(tmp_path, capsys):
    code = bench_main(["--video", "--frames", str(T), "--methods", "evs,dycoke", "--budgets", "0.25", "--samples", "4",
                       "--no-latency", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| 4 | evs | 0.25 |" in out and "| 4 | dycoke | 0.25 |" in out
    data = json.loads((tmp_path / "bench_video.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["full", "evs", "dycoke"] and data["meta"]["frames"] == [T]
    assert (tmp_path / "bench_video.png").stat().st_size > 0
    assert bench_main(["--video", "--images", str(tmp_path)]) == 2
    assert "--video runs on the clip testbed" in capsys.readouterr().err
