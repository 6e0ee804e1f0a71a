"""Which part may import which (../DESIGN.md, "Which part may import which"), read from the
source with ``ast``: every import statement of every module counts, at module level or inside a
function (a lazy import still runs on the device), under ``if TYPE_CHECKING:`` too, and so does
``importlib.import_module("x")`` / ``__import__("x")`` with a literal name.

tests/test_no_tensorflow.py checks the same rule the other way round: it runs the agent and
lists what it really imported. tests/test_import_cycles.py checks cycles inside the packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ("tensorflow", "keras", "tf_keras", "torch")

# package -> the top-level names it must never import. Of ours, medge (the CLI) alone may
# import every package.
CONTRACTS: dict[str, tuple[str, ...]] = {
    # the device: numpy, LiteRT, paho, cryptography, pydantic and optional extras only
    "edge_agent": ("converter", "gateway", "medge", "models", *TRAINING),
    # the fog node: speaks the devices' envelope (edge_agent), never trains or converts
    "gateway": ("converter", "medge", "models", *TRAINING),
    # the workstation writes the bundle format that edge_agent owns; it serves nothing
    "converter": ("gateway", "medge", "models"),
    # the training zoo (workstation only): TensorFlow/Keras, and the product's own definitions
    # of what it is judged by (converter's metrics, edge_agent's windows and event rules), so a
    # zoo number means what the report and the device mean; never the services or the CLI
    "models": ("gateway", "medge"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of everything a module's source imports, wherever it does;
    ``package`` is the module's package, which relative imports start from."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.lineno, str(node.module)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (
                    isinstance(node.func, ast.Attribute)
                    and node.func.attr == "import_module"
                    and not (node.keywords or len(node.args) > 1)
                )
            )
        ):
            yield node.lineno, node.args[0].value


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, name in imported_names(path.read_text(encoding="utf-8"), package):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(CONTRACTS))
def test_package_imports_only_what_the_design_allows(package: str) -> None:
    assert violations(package, CONTRACTS[package]) == []


def test_the_reader_sees_every_kind_of_import() -> None:
    """The checker itself: each form of import is found, relative ones resolved."""
    code = (
        "import numpy as np\n"
        "from . import registry\n"
        "from ..bundle import Manifest\n"
        "if TYPE_CHECKING:\n    import converter.convert\n"
        "def lazy():\n    import tensorflow as tf\n    from keras import layers\n"
        "    importlib.import_module('gateway.store')\n    __import__('models')\n"
    )
    assert [name for _, name in imported_names(code, "edge_agent.sources")] == [
        "numpy",
        "edge_agent.sources",
        "edge_agent.bundle",
        "converter.convert",
        "tensorflow",
        "keras",
        "gateway.store",
        "models",
    ]


def test_every_package_is_under_contract() -> None:
    """A new top-level package gets a line in CONTRACTS when it appears."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - set(CONTRACTS) == {"medge"}  # the CLI, which may import every part
