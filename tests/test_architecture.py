"""The house rules of the source tree, read from the code itself.

- `runtime/` never imports `bot/` (the runtime knows no chat platform).
- No import cycle exists between modules, of any length.

Imports are read with `ast`, everywhere in a file: at the top, inside
functions (a lazy import is still an arrow) and under TYPE_CHECKING (a type
that needs the other side is still a dependency on it).
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "bot", "tests", "bench")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            modules[module_name(path, root)] = path
    return modules


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The first-party module `name` refers to: itself, or the nearest package
    above it (`bot.policy.Actor` -> `bot.policy`); None for third-party names."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every first-party module `module` imports, wherever in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, known)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            for alias in node.names:
                # `from bot.slack import blocks` names a module; `from bot.policy
                # import Actor` names something in one.
                target = _resolve(f"{stem}.{alias.name}", known) or _resolve(stem, known)
                if target is not None:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    known = find_modules(root, packages)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == "runtime"
        for target in targets
        if target.split(".")[0] == "bot"
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a closed path), or None when there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


# -- the tree as it is ---------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_whole_tree_is_read(graph: dict[str, set[str]]) -> None:
    # Guards the checks below against passing on an empty or misread tree.
    assert len(graph) > 60
    assert "bot.admin" in graph["bot.service"]
    assert "runtime.store" in graph["runtime.factory"]
    assert "bot.matrix.platform" in graph["bot.server"]  # a lazy import, inside a function
    assert "bot.cron" in graph["bot.admin"]  # likewise


def test_runtime_never_imports_bot(graph: dict[str, set[str]]) -> None:
    assert layer_violations(graph) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_platforms_are_imported_only_by_the_server_and_the_cli(
    graph: dict[str, set[str]],
) -> None:
    # The platform-neutral core knows no platform; adding one is one folder
    # plus a line in bot/server.py.
    platform_packages = ("bot.slack", "bot.matrix", "bot.console")
    for module, targets in graph.items():
        if not module.startswith("bot.") or module.startswith(platform_packages):
            continue
        for target in targets:
            if target.startswith(platform_packages):
                assert module in ("bot.server", "bot.cli"), f"{module} imports {target}"


# -- the checks themselves, on small trees with known faults ---------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_cycle_of_three_through_a_lazy_import_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "bot/__init__.py": "",
            "bot/a.py": "from bot import b\n",
            "bot/b.py": "from bot.c import thing\n",
            "bot/c.py": "def thing():\n    from bot.a import x\n    return x\n",
            "bot/d.py": "import bot.a\n",
        },
    )
    cycle = find_cycle(import_graph(root, ["bot"]))
    assert cycle is not None
    assert set(cycle) == {"bot.a", "bot.b", "bot.c"}


def test_relative_and_type_checking_imports_count(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "bot/__init__.py": "",
            "bot/pkg/__init__.py": "from . import one\n",
            "bot/pkg/one.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from ..pkg import two\n",
            "bot/pkg/two.py": "from .one import something\n",
        },
    )
    graph = import_graph(root, ["bot"])
    assert graph["bot.pkg"] == {"bot.pkg.one"}
    assert graph["bot.pkg.one"] == {"bot.pkg.two"}
    assert set(find_cycle(graph) or []) == {"bot.pkg.one", "bot.pkg.two"}


def test_runtime_importing_bot_is_found_even_inside_a_function(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "runtime/__init__.py": "",
            "runtime/loop.py": "import json\n\ndef f():\n    import bot.service\n",
            "bot/__init__.py": "",
            "bot/service.py": "from runtime.loop import f\n",
        },
    )
    graph = import_graph(root, ["runtime", "bot"])
    assert layer_violations(graph) == ["runtime.loop imports bot.service"]
    assert "json" not in graph["runtime.loop"]  # third-party and stdlib names are no arrows
