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


@pytest.fixture(scope="session", autouse=True)
def kv_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Converted tokenizers and other cached files go to a directory of the test session
    (and of the processes it starts), not the user's ~/.cache/kvforge."""
    import os

    previous = os.environ.get("KVFORGE_CACHE_DIR")
    os.environ["KVFORGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvforge-cache"))
    yield
    if previous is None:
        os.environ.pop("KVFORGE_CACHE_DIR", None)
    else:
        os.environ["KVFORGE_CACHE_DIR"] = previous
