"""The packages' layer order (ARCHITECTURE.md), enforced over the source's imports.

A module may import its own package and packages of lower layers, never a layer
above it, and never a package of its own layer: so the kvcache never reads the
planner or the models, and the block bookkeeping stays free of torch. Every import
counts, function-level ones included.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvforge"
# lowest first; the package root (`from kvforge import LLM`) is the user API, llm's layer
LAYERS = [
    ["errors"],
    ["units", "dtypes", "kernels", "events"],
    ["config"],
    ["presets"],
    ["kvcache"],
    ["attention", "planner"],
    ["models"],
    ["engine"],
    ["chat_template", "training", "report", "roofline"],
    ["llm", "__init__"],
    ["eval", "server", "chat_session"],
    ["bench"],
    ["cli"],
    ["__main__"],
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
TORCH_FREE = (
    "kvcache/block_pool.py",
    "kvcache/block_table.py",
    "kvcache/prefix_cache.py",
    "kvcache/block_ops.py",
    "kvcache/manager.py",
)


def unit_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def imported_units(tree: ast.AST) -> set[str]:
    """The kvforge units a module imports: `from kvforge import cli` is `cli`, `from
    kvforge import LLM` the root API (`__init__`); a relative import is "relative",
    which no layer allows (the rule reads absolute names only)."""
    units = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            units.add("relative")
        elif isinstance(node, ast.ImportFrom) and node.module == "kvforge":
            units |= {a.name if a.name in LAYER_OF else "__init__" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kvforge":
                units.add(parts[1] if len(parts) > 1 else "__init__")
    return units


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_package_has_a_layer():
    assert {unit_of(path) for path in modules()} == set(LAYER_OF)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_its_own_layer_or_above(path):
    unit = unit_of(path)
    tree = ast.parse(path.read_text())
    wrong = sorted(
        other
        for other in imported_units(tree) - {unit}
        if other not in LAYER_OF or LAYER_OF[other] >= LAYER_OF[unit]
    )
    assert not wrong, f"{path.relative_to(SRC)} ({unit}) imports {wrong} from its layer or above"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_block_bookkeeping_imports_no_torch(name):
    """Neither directly nor through another kvforge module: only each other and errors."""
    tree = ast.parse((SRC / name).read_text())
    imported = {alias.name for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}  # fmt: skip
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}  # fmt: skip
    allowed = {"kvforge.errors"} | {f"kvforge.{n.removesuffix('.py').replace('/', '.')}"
                                    for n in TORCH_FREE}  # fmt: skip
    tops = {m.split(".")[0] for m in imported}
    assert "torch" not in tops and "numpy" not in tops
    assert {m for m in imported if m.startswith("kvforge")} <= allowed


def test_the_check_sees_a_violation(tmp_path):
    """The rule is not vacuous: a kvcache module importing the planner is caught, and so
    are `from kvforge import cli` and relative imports."""
    tree = ast.parse("def f():\n    from kvforge.planner import pool_size\n")
    units = imported_units(tree)
    assert units == {"planner"} and LAYER_OF["planner"] > LAYER_OF["kvcache"]
    assert imported_units(ast.parse("from kvforge import cli, LLM")) == {"cli", "__init__"}
    assert imported_units(ast.parse("from ..engine import x")) == {"relative"}
