"""kvforge's compiled CPU kernels, built on first use with the machine's C++ compiler.

`qlinear()` returns the module of `qlinear.cpp` (weight-only int4/int8 matmuls with
AVX-512), compiled with -march=native into kvforge's cache directory (keyed by the
source, the torch version and the CPU), or None where it cannot run: a CPU without
AVX-512, no compiler, or KVFORGE_KERNELS=0. Callers then multiply with the
dequantized weight. `reason()` says why there are none.
"""

import hashlib
import os
import platform
import sys
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).with_name("qlinear.cpp")
_why_not: list[str] = []


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cache_dir(key: str) -> Path:
    """Built kernels are kept apart from the rest of kvforge's cache (KVFORGE_KERNEL_DIR,
    default ~/.cache/kvforge/kernels): they depend only on the source, torch and CPU."""
    root = os.environ.get("KVFORGE_KERNEL_DIR") or Path.home() / ".cache" / "kvforge" / "kernels"
    return Path(root) / key


@cache
def qlinear():
    """The compiled int4/int8 matmuls, or None (see `reason`)."""
    if os.environ.get("KVFORGE_KERNELS", "1") == "0":
        _why_not.append("turned off (KVFORGE_KERNELS=0)")
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx512f", "avx512bw"} <= (
        _cpu_flags()
    ):
        _why_not.append("this CPU has no AVX-512")
        return None
    import torch
    from torch.utils import cpp_extension

    source = SOURCE.read_bytes()
    flags = " ".join(sorted(_cpu_flags()))
    key = hashlib.sha256(source + torch.__version__.encode() + flags.encode()).hexdigest()[:16]
    build = _cache_dir(key)
    try:
        build.mkdir(parents=True, exist_ok=True)
        # compiled from a copy inside the build folder: every checkout (and installed
        # copy) of the same source then finds the same build, and nothing is rebuilt
        source_copy = build / SOURCE.name
        if not source_copy.exists():
            tmp = build / f".{SOURCE.name}.{os.getpid()}"
            tmp.write_bytes(source)
            tmp.replace(source_copy)
        if not any(build.glob("*.so")):
            print("kvforge: building the int4/int8 CPU kernels (once)", file=sys.stderr)
        return cpp_extension.load(
            name=f"kvforge_qlinear_{key}",
            sources=[str(source_copy)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler, no ninja, a failed build
        _why_not.append(f"the kernels did not build: {str(exc).strip().splitlines()[-1]}")
        return None


def reason() -> str | None:
    """Why `qlinear()` is None, or None when it is not."""
    qlinear()
    return _why_not[-1] if _why_not else None
