"""Lets Kyutai's ``python -m moshi.server`` run on a CPU-only torch, for the worker benchmark.

moshi.server's warm-up ends with ``torch.cuda.synchronize()``, which raises on a torch
built without CUDA. With this directory first on PYTHONPATH, that call becomes a no-op when
no GPU is present; nothing else changes. (ops/bench/worker.py puts it there.)
"""

import torch

if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda *args, **kwargs: None
