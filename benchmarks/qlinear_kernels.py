"""kvforge's int4/int8 matmul kernels against fp32 (oneDNN, packed weight) on SmolLM2's
matrix shapes, one activation row (a batch-1 decode step), 16 and 64, in microseconds a call,
and the sum over one decode step's matmuls (30 layers + the LM head).

    python benchmarks/qlinear_kernels.py

Small matrices stay in the CPU's caches between calls, so their GB/s are above what a
whole model streamed from memory gets; the LM head (30 MB in int8) is the honest one.
"""

import time

import torch

from kvforge import kernels
from kvforge.models.linear import linear
from kvforge.models.quantized import QuantizedWeight

# (out, in, how many a decode step multiplies): fused q/k/v, o, fused gate/up, down, head
SHAPES = [(960, 576, 30), (576, 576, 30), (3072, 576, 30), (576, 1536, 30), (49152, 576, 1)]


def timed(f, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        f()
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(2)
    print(f"kernels: {'built' if kernels.cpu() else kernels.reason()}")
    for rows in (1, 16, 64):
        step = {"fp32": 0.0, "int4": 0.0, "int8": 0.0}
        print(f"\n{rows} row(s): out x in | fp32 us | int4 us | int8 us")
        for out_features, in_features, count in SHAPES:
            w = torch.randn(out_features, in_features)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
            q4, q8 = QuantizedWeight.quantize(w, "int4"), QuantizedWeight.quantize(w, "int8")
            x = torch.randn(rows, in_features)
            calls = 30 if out_features > 10_000 else 300
            us = {
                "fp32": timed(lambda: linear(x, packed), calls),  # noqa: B023
                "int4": timed(lambda: q4.matmul(x), calls),  # noqa: B023
                "int8": timed(lambda: q8.matmul(x), calls),  # noqa: B023
            }
            print(
                f"{out_features} x {in_features} | " + " | ".join(f"{v:.0f}" for v in us.values())
            )
            for name, value in us.items():
                # the model's LM head is int8 under int4 weights
                step[name] += (us["int8"] if name == "int4" and count == 1 else value) * count
        print(
            "a decode step's matmuls, ms: "
            + ", ".join(f"{k} {v / 1e3:.1f}" for k, v in step.items())
        )

    # where the direct kernel stops paying (quantized.DIRECT_ROWS): int4, in registers
    # against a dequantized copy and oneDNN's GEMM
    ops = kernels.cpu()
    if ops is not None:
        print("\nint4 rows: out x in | direct us | dequantize + GEMM us")
        for out_features, in_features, _ in SHAPES[:4]:
            q4 = QuantizedWeight.quantize(torch.randn(out_features, in_features), "int4")
            for rows in (4, 16, 32, 64):
                x = torch.randn(rows, in_features)
                direct = timed(lambda: ops.q4_linear(x, q4.qs, q4.d, q4.m), 50)  # noqa: B023
                dense = timed(lambda: linear(x, ops.q4_dequantize(q4.qs, q4.d, q4.m)), 50)  # noqa: B023
                print(f"{rows}: {out_features} x {in_features} | {direct:.0f} | {dense:.0f}")


if __name__ == "__main__":
    main()
