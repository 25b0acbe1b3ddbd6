import torch

# Small torch ops are far slower with 2 threads than with 1 on this CPU class; keep tests single-threaded.
torch.set_num_threads(1)
