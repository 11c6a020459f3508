"""The module structure: every module imports, no import cycle, and no module imports one above its layer.

The imports are read from the source (every ``import`` and ``from ... import``, also those inside functions,
which are the usual way a cycle hides), so a new upward import fails here even where Python would cope.
"""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "leantrain"

# Lowest first. A module may import modules of lower layers, and of its own package (optim.*, data.*,
# checkpoint.*); nothing of a layer above its own, nor of another component of its own layer.
LAYERS = [
    {"errors", "utils", "distributed", "hooks", "files"},  # no leantrain imports
    {"precision", "families"},  # numerics: the fp32 islands and the Precision value; the HF family registry
    {"optim", "data", "model", "metrics", "state", "guard"},
    {"hf", "config"},  # config knows the optimizer's choices and the model's flavors
    {"runplan"},  # config resolved into frozen values
    {"parallel", "checkpoint"},
    {"loader"},  # what model and tokenizer a command uses
    {"step", "evaluation", "generate", "prepare", "plan"},
    {"train", "compare"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER = {component: i for i, layer in enumerate(LAYERS) for component in layer}


def modules() -> dict[str, Path]:
    """'leantrain.optim.adamw' -> its file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The leantrain modules that module ``name`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import guard` names a module; `from .config import X` does not
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def component(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_is_in_a_layer_and_imports():
    unplaced = sorted({component(m) for m in GRAPH} - set(LAYER))
    assert not unplaced, f"place these modules in tests/test_imports.py's LAYERS: {unplaced}"
    for name in GRAPH:
        if name != "leantrain.__main__":  # importing it runs the command line
            importlib.import_module(name)


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_no_upward_import():
    upward = [
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        for dep in deps
        if component(dep) != component(name) and LAYER[component(dep)] >= LAYER[component(name)]
    ]
    assert not upward, "imports at or above the importer's layer: " + "; ".join(sorted(upward))


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a function-level import of train from precision is found."""
    fake = tmp_path / "leantrain" / "precision.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from .train import train\n")
    assert imports_of("leantrain.precision", fake, {"leantrain.train", "leantrain.precision"}) == {"leantrain.train"}
