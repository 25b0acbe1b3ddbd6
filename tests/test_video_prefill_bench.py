"""``benchmarks/video_prefill.py`` on its tiny config: one row per (T, budget), kept counts by the budget rule, FLOP
ratios in (0, 1), and the script's FLOP count equal to torch's FlopCounterMode on the model itself."""

import importlib.util
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import vtcompress

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "video_prefill.py"

torch.set_num_threads(1)


def _bench():
    spec = importlib.util.spec_from_file_location("video_prefill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["video_prefill"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_tiny_table_rows_kept_counts_and_flop_ratios(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "table.md"
    rows = bench.main(["--tiny", "--method", "random", "--frames", "2,3", "--budgets", "0.5,0.25,3",
                       "--out", str(out)])
    # the tiny frames: 56 px / 14 px patches = 4 x 4, pooled 2 x 2 by the model -> 4 tokens per frame
    assert [(r.frames, r.budget) for r in rows] == [(t, b) for t in (2, 3) for b in (0.5, 0.25, 3)]
    for r in rows:
        per_frame = 4
        assert r.tokens_in == r.frames * per_frame + 1
        # a spatial method: round(fraction * 4) of every frame, or an int budget per clip; plus the newline
        kept = r.frames * max(1, round(r.budget * per_frame)) if isinstance(r.budget, float) else r.budget
        assert r.kept == kept + 1, r
        assert 0 < r.flop_ratio < 1, r
        # the causal count takes less attention off the shorter sequence than the full-matrix count does
        assert r.flop_ratio_full < r.flop_ratio, r
        assert r.flops_stock < r.flops_stock_full and r.flops_comp < r.flops_comp_full
        assert r.stock[1] > 0 and r.comp[1] > 0
        assert r.efficiency == r.flop_ratio / r.latency_ratio
        assert r.efficiency_full == r.flop_ratio_full / r.latency_ratio
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(rows)
    assert out.read_text().count("\n| ") == len(rows) + 1  # header and rows (the separator starts with "|-")


def test_evs_kept_counts_follow_its_clip_rule():
    bench = _bench()
    rows = bench.main(["--tiny", "--method", "evs", "--frames", "3", "--budgets", "0.5,0.1,6"])
    # EVS counts per clip: max(one frame, int(T * 4 * fraction)) or max(4, min(budget, T * 4)); plus the newline
    assert [r.kept for r in rows] == [6 + 1, 4 + 1, 6 + 1]
    assert all(0 < r.flop_ratio < 1 for r in rows)


def test_flop_count_matches_flop_counter_mode():
    """The script's count (the library's sequence_prefill_flops) on the tiny model equals what torch counts on
    the stock and the compressed forward (eager attention: FlopCounterMode has no formula for the CPU SDPA)."""
    bench = _bench()
    args = bench.parse_args(["--tiny"])
    model = bench.build_model(args)
    model.set_attn_implementation("eager")
    arch = bench.onevision_arch(model)
    inputs = bench.video_prompt(model, 3, args.text)
    method = vtcompress.get("random", budget=0.5)
    with torch.no_grad():
        with FlopCounterMode(display=False) as stock:
            model(**inputs)
        with FlopCounterMode(display=False) as comp, vtcompress.apply(model, method):
            model(**inputs)
    assert stock.get_total_flops() == bench.clip_flops(arch, args.text, 3, 3 * 4 + 1).total
    assert comp.get_total_flops() == bench.clip_flops(arch, args.text, 3, bench.kept_rule(method, 3, 4) + 1).total
