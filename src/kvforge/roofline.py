"""A decode step's floor: what the memory system allows, measured on this machine.

A batch-1 decode step reads every weight and every cached K/V byte once, so it takes at
least (weight bytes + KV bytes) / memory bandwidth. `bench roofline` and the KV cache
inspector (`server.inspect`) both compare live steps with that floor.
"""

import time
from collections.abc import Callable

import torch

from kvforge.models.quantized import QuantizedLinear


def best_time(fn, now: Callable[[], float] = time.perf_counter, repeats: int = 5) -> float:
    """The fastest of `repeats` runs of `fn` (after one to warm up), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return min(times)


def memory_bandwidth(num_bytes: int, device: str,
                     now: Callable[[], float] = time.perf_counter) -> float:  # fmt: skip
    """Bytes per second of a large copy on `device` (each byte read once and written once)."""
    src = torch.ones(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / best_time(lambda: dst.copy_(src), now)


def weights_read(net: torch.nn.Module) -> tuple[int, int]:
    """(matmul parameters, bytes of weights a batch-1 decode step reads): every matrix it
    multiplies by — the layers' and the LM head, as stored (dense, transposed or packed
    outside the parameters, or quantized with scales) — and the vectors (norms, biases).
    The embedding table is only indexed, unless it is also the (tied) LM head."""
    itemsize = net.model.norm.weight.element_size()
    params = total = 0
    for module in net.modules():
        if isinstance(module, QuantizedLinear):
            params += module.out_features * module.in_features
            total += module.qweight.nbytes
        elif isinstance(module, torch.nn.Linear):
            params += module.out_features * module.in_features
            total += module.out_features * module.in_features * itemsize
    head_t = getattr(net, "lm_head_t", None)
    if head_t is not None:
        params += head_t.numel()
        total += head_t.numel() * head_t.element_size()
    vectors = [p for p in net.parameters() if p.dim() == 1]
    return params, total + sum(v.numel() * v.element_size() for v in vectors)
