"""What every scenario gets: size, device, output folder, model, progress bars, a clock."""

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvforge.bench.workloads import SMALL_LLAMA, TINY_LLAMA, random_checkpoint


def model_label(path: Path) -> str:
    """How a report names its model: the file or folder name (where it lies is the
    machine's business, not the result's)."""
    return Path(path).name


def now(device: str) -> float:
    """perf_counter once the device has finished its queued work.

    CUDA kernels run asynchronously: without the synchronize, a clock read after
    a launch would time the launch and not the work. On the CPU it is a plain read.
    """
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass(frozen=True)
class BenchContext:
    quick: bool
    model_path: Path | None = None
    device: str = "cpu"
    weights_dtype: str = "auto"  # kvforge's --weights-dtype
    # no --model given: scenarios that compare with llama.cpp run the default model
    default_model: bool = False
    # kvforge's ranks (--tensor-parallel-size), in the scenarios that time generation
    tensor_parallel_size: int = 1

    def real_model(self, notes: list[str], config: dict | None = None) -> Path:
        """--model if given; else the default model (SmolLM2) when no --model was named
        and it is installed, so that llama.cpp runs the same GGUF file; else the random
        benchmark model, with a note saying why."""
        if self.model_path is not None or not self.default_model:
            return self.checkpoint(config)
        from kvforge.errors import KVForgeError
        from kvforge.models.catalog import find_model

        try:
            return find_model(None).path
        except KVForgeError as exc:
            notes.append(f"the random-init model ran: {exc}")
            return self.checkpoint(config)

    def checkpoint(self, config: dict | None = None) -> Path:
        """--model if given, else the random-init benchmark model (written once, then reused)."""
        if self.model_path is not None:
            return self.model_path
        config = config or (TINY_LLAMA if self.quick else SMALL_LLAMA)
        key = "-".join(f"{v}" for v in config.values())
        return random_checkpoint(config, Path(tempfile.gettempdir()) / "kvforge-bench" / key)

    def now(self) -> float:
        """The clock every timed region reads: see `now`."""
        return now(self.device)

    def progress(self, items, desc: str):
        return tqdm(items, desc=desc, disable=None, leave=False)
