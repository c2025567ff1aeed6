"""kvforge's compiled CPU kernels, built on first use with the machine's C++ compiler.

`cpu()` returns one extension module (AVX-512, declared in `ops.h`):
`qlinear.cpp`'s weight-only int4/int8 matmuls and `layer_ops.cpp`'s fused decoder-layer
operations and in-place decode attention. It is compiled with -march=native into
kvforge's cache directory (keyed by the sources, the torch version and the CPU), or
None where it cannot run: a CPU without AVX-512, no compiler, or KVFORGE_KERNELS=0.
Callers then compute the same with PyTorch operations. `reason()` says why there are
none.
"""

import hashlib
import os
import platform
import sys
from functools import cache
from pathlib import Path

import torch

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("ops.h", "qlinear.cpp", "layer_ops.cpp", "bindings.cpp")
]
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
def cpu():
    """The compiled kernels, or None (see `reason`)."""
    if os.environ.get("KVFORGE_KERNELS", "1") == "0":
        _why_not.append("turned off (KVFORGE_KERNELS=0)")
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx512f", "avx512bw"} <= (
        _cpu_flags()
    ):
        _why_not.append("this CPU has no AVX-512")
        return None
    from torch.utils import cpp_extension

    texts = {path.name: path.read_bytes() for path in SOURCES}
    flags = " ".join(sorted(_cpu_flags()))
    # the torch install too: its include paths are in the build command, so two
    # environments sharing one build folder would rebuild it in turn, each under the
    # other's lock
    digest = hashlib.sha256(torch.__version__.encode() + flags.encode() + torch.__file__.encode())
    for name, text in texts.items():
        digest.update(name.encode() + b"\0" + text)
    key = digest.hexdigest()[:16]
    build = _cache_dir(key)
    try:
        build.mkdir(parents=True, exist_ok=True)
        # compiled from copies inside the build folder: every checkout (and installed
        # copy) of the same sources then finds the same build, and nothing is rebuilt
        for name, text in texts.items():
            if not (build / name).exists():
                tmp = build / f".{name}.{os.getpid()}"
                tmp.write_bytes(text)
                tmp.replace(build / name)
        if not any(build.glob("*.so")):
            print("kvforge: building the CPU kernels (once)", file=sys.stderr)
        return cpp_extension.load(
            name=f"kvforge_cpu_{key}",
            sources=[str(build / name) for name in texts if name.endswith(".cpp")],
            # -ffp-contract=off: a * b - c * d rounds as PyTorch's separate operations do
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler, no ninja, a failed build
        _why_not.append(f"the kernels did not build: {str(exc).strip().splitlines()[-1]}")
        return None


def for_tensor(x: torch.Tensor):
    """The kernels when `x` is what they take (a float32 CPU tensor), else None."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return cpu()
    return None


def reason() -> str | None:
    """Why `cpu()` is None, or None when it is not."""
    cpu()
    return _why_not[-1] if _why_not else None
