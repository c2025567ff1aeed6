"""`kvforge bench`: scenarios that run kvforge and its peers side by side."""

import importlib

SCENARIOS = ("cache", "throughput", "latency", "memory", "roofline", "prefix", "kvquant")


def run_scenario(name: str, ctx):
    """Import the scenario's module only when it runs (peers are heavy imports)."""
    if name not in SCENARIOS:
        from kvforge.errors import KVForgeError

        raise KVForgeError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")
    return importlib.import_module(f"kvforge.bench.scenarios.{name}").run(ctx)
