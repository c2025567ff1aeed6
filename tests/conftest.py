"""Slow and GPU tests run only when asked for with -m (e.g. `pytest -m slow`)."""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = config.getoption("markexpr") or ""
    for item in items:
        for marker in ("slow", "gpu"):
            if marker in item.keywords and marker not in selected:
                item.add_marker(pytest.mark.skip(reason=f"{marker} test: select with -m {marker}"))
        if "gpu" in item.keywords and "gpu" in selected:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="no CUDA device"))
