"""kvforge: an LLM inference engine built around its KV cache.

`LLM`, `SamplingParams` and `RequestOutput` load on first use, so commands
that need no torch (`kvforge plan`) start fast.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams"]

_LAZY = {
    "LLM": "kvforge.llm",
    "SamplingParams": "kvforge.engine.sampling",
    "RequestOutput": "kvforge.engine.request",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvforge' has no attribute {name!r}")
