"""What every scenario gets: size, output folder, model, progress bars."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kvforge.bench.workloads import SMALL_LLAMA, TINY_LLAMA, random_checkpoint


@dataclass(frozen=True)
class BenchContext:
    quick: bool
    model_dir: Path | None = None

    def checkpoint(self, config: dict | None = None) -> Path:
        """--model if given, else the random-init benchmark model (written once, then reused)."""
        if self.model_dir is not None:
            return self.model_dir
        config = config or (TINY_LLAMA if self.quick else SMALL_LLAMA)
        key = "-".join(f"{v}" for v in config.values())
        return random_checkpoint(config, Path(tempfile.gettempdir()) / "kvforge-bench" / key)

    def progress(self, items, desc: str):
        return tqdm(items, desc=desc, disable=None, leave=False)
