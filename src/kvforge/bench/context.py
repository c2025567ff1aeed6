"""What every scenario gets: size, device, output folder, model, progress bars, a clock."""

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvforge.bench.workloads import SMALL_LLAMA, TINY_LLAMA, random_checkpoint


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
