"""Measuring compression: fidelity and accuracy sweeps, analytic FLOPs, prefill latency, and ``vtcompress bench``.

- :func:`run` (:mod:`.fidelity`): on any supported model, every method x budget vs the uncompressed model on
  (image, prompt) samples, no labels: greedy-answer agreement, first-token top-1 agreement and KL, image tokens,
  FLOPs, KV cache, latency; returns a :class:`BenchTable`;
- :func:`run_sweep` (:mod:`.sweep`): the same sweep on the embedded testbed's labelled questions (accuracy per
  skill, retained, agreement); rows as dicts;
- :mod:`.table`: :class:`BenchTable` (``.to_markdown()``, ``.to_csv()``, ``.to_json()``, ``.plot()``,
  ``.write()``), :func:`format_table`, :func:`format_summary`, :func:`format_fidelity_table`,
  :func:`write_outputs`; :mod:`.plot`: the plots and the testbed gallery; :mod:`.cli`: :func:`bench_main`;
- :mod:`.flops`: :func:`prefill_flops` of a LLaVA-style config under a compression schedule;
- :mod:`.latency`: :func:`time_prefill` (fixed threads, median of repeats), :func:`time_interleaved`;
- :mod:`.quality`: :class:`TokenProbe` (tokens each part of the model really processed) and
  :func:`evaluate_method` (testbed accuracy with a method applied).

Example::

    from vtcompress.bench import ImagePrompt, run
    table = run(model, processor, ["visionzip", "fastv"], [0.25, 0.11], [ImagePrompt(image, "What is shown?")])
    print(table.to_markdown())
    table.write("results/")
"""

from .cli import bench_main
from .fidelity import ImagePrompt, load_samples, run
from .flops import Flops, TextArch, VisionArch, VLMArch, decoder_layer_flops, prefill_flops, vision_layer_flops
from .latency import time_interleaved, time_prefill
from .plot import plot, plot_fidelity, write_gallery
from .quality import TokenProbe, evaluate_method
from .sweep import build_method, run_sweep
from .table import BenchTable, format_fidelity_table, format_summary, format_table, sort_rows, write_outputs

__all__ = [
    "BenchTable",
    "Flops",
    "ImagePrompt",
    "TextArch",
    "VisionArch",
    "VLMArch",
    "TokenProbe",
    "bench_main",
    "build_method",
    "decoder_layer_flops",
    "evaluate_method",
    "format_fidelity_table",
    "format_summary",
    "format_table",
    "load_samples",
    "plot",
    "plot_fidelity",
    "prefill_flops",
    "run",
    "run_sweep",
    "sort_rows",
    "time_interleaved",
    "time_prefill",
    "vision_layer_flops",
    "write_gallery",
    "write_outputs",
]
