"""What a batch-1 decode step on SmolLM2 costs beyond its weight reads: the step against
the same matmuls run back to back, for each weights format.

A step is timed as the engine runs it (64 steps from a one-token prompt, median). Its
matmuls are timed alone: every matrix the step multiplies by, in the model's order, on
one activation row, with nothing in between. The difference is the rest of the step:
norms, RoPE and the K/V write, attention, sampling, scheduling and the Python around
them.

    python benchmarks/decode_overhead.py [--weights auto,fp32]
"""

import argparse
import statistics
import time

import torch

from kvforge import LLM, SamplingParams
from kvforge.models.linear import Linear
from kvforge.models.quantized import QuantizedLinear


def step_ms(llm, steps: int = 64) -> float:
    engine = llm.engine
    engine.add_request([1], SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    engine.step()
    times = []
    while engine.has_unfinished:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def matmuls_ms(model, repeats: int = 20) -> float:
    """The step's matmuls alone: every Linear in the model's order, then the LM head."""
    layers = [m for m in model.model.layers.modules() if isinstance(m, (Linear, QuantizedLinear))]
    inputs = [torch.randn(1, m.in_features) for m in layers]

    def run():
        with torch.inference_mode():
            for m, x in zip(layers, inputs, strict=True):
                m(x)
            model.compute_logits(torch.randn(1, model.config.spec.hidden_size))

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="auto,fp32")
    args = parser.parse_args()
    print("| weights | decode step ms | its matmuls alone ms | the rest ms |")
    print("|---|---:|---:|---:|")
    for weights in args.weights.split(","):
        llm = LLM(device="cpu", weights_dtype=weights, kv_memory="256MiB")
        step_ms(llm, 8)  # warm-up
        step = statistics.median(step_ms(llm) for _ in range(3))
        mm = matmuls_ms(llm.engine.runner.model)
        print(f"| {weights} | {step:.1f} | {mm:.1f} | {step - mm:.1f} |")
        del llm


if __name__ == "__main__":
    main()
