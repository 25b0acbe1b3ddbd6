"""Hosts outside plain transformers: an lmms-eval model (``lmms_eval``) and a vLLM plugin (``vllm``).

Each submodule imports its host lazily, so ``import vtcompress`` never needs lmms-eval or vLLM installed.
"""
