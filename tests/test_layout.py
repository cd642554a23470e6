"""The code's shape, checked: imports run one way (commands -> stages -> the artifact contract),
and only commands speak Click."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from repo import REPO_ROOT

PACKAGES = ("training", "export", "serving", "benchmarks")


def modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, absolute or relative (resolved against its package)."""
    names = set()
    package = path.relative_to(REPO_ROOT).parts[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "" if node.level == 0 else f"{package}.{node.module or ''}")
    return names


@pytest.mark.parametrize("path", modules("serving"), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_serving_never_imports_training_or_export(path):
    stages = {name.split(".")[0] for name in imported_names(path)} & {"training", "export"}
    assert not stages, f"{path.name} imports {stages}: serving/ ships alone and must not depend on them"


def is_click_command(function: ast.FunctionDef) -> bool:
    """Decorated as a Click command or group (@click.command, @main.command(...), @click.group)."""
    for decorator in function.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in ("command", "group"):
            return True
    return False


def click_errors_outside_commands(path: Path) -> list[str]:
    """Functions that raise a Click exception without being a Click command themselves."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_click_command(node):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Raise) and inner.exc is not None and "click." in ast.unparse(inner.exc):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{inner.lineno} in {node.name}()")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_only_commands_raise_click_errors(package):
    found = [hit for path in modules(package) for hit in click_errors_outside_commands(path)]
    assert not found, "library code raises Click errors (raise a domain error; map it in the command):\n" + \
        "\n".join(found)
