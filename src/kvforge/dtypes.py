"""Element types: the one table of their names, sizes and torch equivalents.

Every dtype a user can write (`--dtype`, `--kv-dtype`, a config's `torch_dtype`, a
checkpoint's tensors) is normalised here to a short canonical name; what it costs
in bits and which torch dtype computes in it come from the same row.
"""

from dataclasses import dataclass

from kvforge.errors import ConfigError


@dataclass(frozen=True)
class DType:
    name: str  # canonical: fp32, fp16, bf16, fp8, int8, int4, int2
    bits: int
    torch_name: str | None  # torch's attribute name (None: no torch element type)
    aliases: tuple[str, ...] = ()
    computes: bool = False  # a model can run in it (weights, activations, plain KV)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("fp32", 32, "float32", ("float32", "float", "f32"), computes=True),
        DType("fp16", 16, "float16", ("float16", "half", "f16"), computes=True),
        DType("bf16", 16, "bfloat16", ("bfloat16",), computes=True),
        DType("fp8", 8, "float8_e4m3fn", ("float8_e4m3fn", "f8_e4m3")),
        DType("int8", 8, "int8", ("i8",)),
        DType("int4", 4, None),
        DType("int2", 2, None),
    )
}
DTYPE_BITS = {name: d.bits for name, d in DTYPES.items()}
FLOAT_DTYPES = tuple(name for name, d in DTYPES.items() if d.computes)  # fp32, fp16, bf16
_BY_ALIAS = {alias: d.name for d in DTYPES.values() for alias in (d.name, *d.aliases)}


def normalize_dtype(name: str) -> str:
    """'bfloat16' -> 'bf16', 'torch.float16' -> 'fp16'; ConfigError for anything else."""
    key = str(name).lower().removeprefix("torch.")
    if key not in _BY_ALIAS:
        raise ConfigError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return _BY_ALIAS[key]


def torch_dtype(name: str):
    """The torch dtype a model computes in for `name` (fp32, fp16, bf16)."""
    import torch

    if name not in FLOAT_DTYPES:
        raise ConfigError(f"dtype {name!r} cannot compute; use one of {', '.join(FLOAT_DTYPES)}")
    return getattr(torch, DTYPES[name].torch_name)


def dtype_name(dtype) -> str:
    """The canonical name of a torch dtype a model computes in (torch.bfloat16 -> 'bf16')."""
    return normalize_dtype(str(dtype))
