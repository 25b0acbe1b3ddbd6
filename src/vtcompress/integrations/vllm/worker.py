"""``CPUWorker``: vLLM's CPU worker with the runner's hook for pruned multimodal inputs switched on.

vLLM recomputes the M-RoPE positions of a request whose media embeddings were pruned by calling the model's
``recompute_mrope_positions`` (the hook Efficient Video Sampling uses) when its runner's
``is_multimodal_pruning_enabled`` is set. The GPU runner sets it after loading the model; vLLM 0.32's
``CPUModelRunner.load_model`` does not, so on the CPU build the hook is never called. The plugin's Qwen2-VL classes
need it (their kept tokens keep their grid positions), so on CPU they are served with this worker, vLLM's own
extension point for workers: ``LLM(..., worker_cls="vtcompress.integrations.vllm.worker.CPUWorker")`` /
``vllm serve ... --worker-cls vtcompress.integrations.vllm.worker.CPUWorker``.
"""

from __future__ import annotations

from vllm.model_executor.models.interfaces import supports_multimodal_pruning
from vllm.v1.worker.cpu_worker import CPUWorker as _StockCPUWorker

__all__ = ["CPUWorker", "WORKER_CLS"]

WORKER_CLS = f"{__name__}.CPUWorker"


class CPUWorker(_StockCPUWorker):
    """vLLM's ``CPUWorker``; after loading, the runner calls ``recompute_mrope_positions`` of a pruning model."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        if supports_multimodal_pruning(runner.get_model()) and getattr(runner, "uses_mrope", False):
            runner.is_multimodal_pruning_enabled = True
