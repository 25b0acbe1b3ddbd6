"""Measuring compression: analytic FLOPs, prefill latency, testbed accuracy, and the ``vtcompress bench`` report.

- :mod:`.flops`: :func:`prefill_flops` of a LLaVA-style config under a compression schedule;
- :mod:`.latency`: :func:`time_prefill` (fixed threads, median of repeats);
- :mod:`.quality`: :class:`TokenProbe` (tokens each part of the model really processed) and
  :func:`evaluate_method` (testbed accuracy with a method applied);
- :mod:`.report`: :func:`run_sweep`, :func:`write_outputs`, :func:`format_table`, :func:`format_summary`,
  :func:`plot`, :func:`bench_main`.
"""

from .flops import Flops, TextArch, VisionArch, VLMArch, decoder_layer_flops, prefill_flops, vision_layer_flops
from .latency import time_prefill
from .quality import TokenProbe, evaluate_method
from .report import bench_main, format_summary, format_table, plot, run_sweep, sort_rows, write_gallery, write_outputs

__all__ = [
    "Flops",
    "TextArch",
    "VisionArch",
    "VLMArch",
    "TokenProbe",
    "bench_main",
    "decoder_layer_flops",
    "evaluate_method",
    "format_summary",
    "format_table",
    "plot",
    "prefill_flops",
    "run_sweep",
    "sort_rows",
    "time_prefill",
    "vision_layer_flops",
    "write_gallery",
    "write_outputs",
]
