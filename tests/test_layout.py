"""The code's shape, checked: folders are roles, imports run one way (commands -> stages -> the
artifact contract), what ships in the archive is exactly serving/handler/, and only commands
speak Click.

The roles: training/ and export/ (the pipeline's stages), serving/handler/ (what the .mar ships:
the artifact contract, preprocessing, the handler), serving/server/ (one TorchServe's operation
and the packer), serving/fleet/ (replicas behind nginx), serving/clients/ (mnist-predict, gRPC),
serving/web/ (the page), deploy/ (the cluster), benchmarks/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from repo import REPO_ROOT
from serving.server.archive import ARCHIVE_SOURCES, SHIPPED_DIR

PACKAGES = ("training", "export", "serving", "deploy", "benchmarks")
SERVING_ROLES = ("handler", "server", "fleet", "clients", "web", "kserve")

# role -> the roles it must never import ("never" rules; everything else is allowed).
NEVER = {
    "serving.handler": {"training", "export", "serving.server", "serving.fleet", "serving.clients", "serving.web",
                        "serving.kserve", "deploy", "benchmarks"},
    "serving.server": {"training", "export", "serving.fleet", "serving.clients", "serving.web", "serving.kserve",
                       "deploy", "benchmarks"},
    "serving.clients": {"training", "export", "serving.fleet", "serving.web", "deploy", "benchmarks"},
    "serving.web": {"training", "export", "serving.fleet", "serving.clients", "deploy", "benchmarks"},
    "serving.fleet": {"training", "export", "serving.clients", "deploy", "benchmarks"},
    # The second engine: what ships (serving/handler) and the pid check (serving/server/pids.py), never the fleet or clients.
    "serving.kserve": {"training", "export", "serving.fleet", "serving.clients", "serving.web", "deploy", "benchmarks"},
    "training": {"export", "serving.server", "serving.fleet", "serving.clients", "serving.web", "deploy",
                 "benchmarks"},
    "export": {"serving.server", "serving.fleet", "serving.clients", "serving.web", "deploy", "benchmarks"},
}


def modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


def role_of(name: str) -> str | None:
    """The role of a dotted module name of ours (serving.fleet.topology -> serving.fleet), else None."""
    parts = name.split(".")
    if parts[0] == "serving" and len(parts) > 1 and parts[1] in SERVING_ROLES:
        return f"serving.{parts[1]}"
    return parts[0] if parts[0] in PACKAGES else None


def imported_names(path: Path, source: str | None = None) -> set[str]:
    """Every module a file imports, absolute or relative (resolved against the file's own package)."""
    names = set()
    package = module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)   # from serving import fleet
    return names


def broken_rules(path: Path, source: str | None = None) -> list[str]:
    """The 'never' rules a file breaks, as 'role imports name' lines."""
    role = role_of(module_name(path))
    forbidden = NEVER.get(role, set())
    return sorted(f"{role} imports {name}" for name in imported_names(path, source)
                  if role_of(name) in forbidden and role_of(name) != role)


ALL_MODULES = [path for package in PACKAGES for path in modules(package)]


@pytest.mark.parametrize("path", ALL_MODULES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_run_one_way(path):
    broken = broken_rules(path)
    assert not broken, f"{path.relative_to(REPO_ROOT)} breaks the layout's rules: {broken}"


@pytest.mark.parametrize("path, line, rule", [
    ("serving/handler/preprocess.py", "from serving.server.properties import read_properties", "serving.server"),
    ("serving/handler/handler.py", "import training.model", "training"),
    ("serving/server/server.py", "from serving.fleet import topology", "serving.fleet"),
    ("serving/kserve/engine.py", "from serving.clients.grpc_client import KeySource", "serving.clients"),
    ("serving/server/keys.py", "from ..clients.grpc_client import KeySource", "serving.clients"),
    ("serving/clients/predict.py", "from serving.fleet.topology import Fleet", "serving.fleet"),
    ("training/train.py", "from export.run import run_export", "export"),
    ("training/data.py", "from serving.fleet.frontdoor import render", "serving.fleet"),
    ("export/run.py", "from serving.server import server", "serving.server"),
])
def test_each_rule_catches_a_deliberate_violation(path, line, rule):
    """The checker itself: a file of that role given the forbidden import is flagged."""
    source = (REPO_ROOT / path).read_text() + "\n" + line + "\n"
    assert any(hit.endswith(f" imports {rule}") or f" imports {rule}." in hit
               for hit in broken_rules(REPO_ROOT / path, source)), line


# --- size: no module a reader cannot hold, no folder that hides the others --------------------------
MAX_MODULE_LINES = 350
MAX_FOLDER_SHARE = 1 / 3


def line_counts(paths: list[Path]) -> dict[Path, int]:
    return {path: len(path.read_text().splitlines()) for path in paths}


def oversized(counts: dict[Path, int]) -> list[str]:
    """Modules over MAX_MODULE_LINES, and folders (their own .py files, not their subfolders') over
    MAX_FOLDER_SHARE of all product lines."""
    found = [f"{path.relative_to(REPO_ROOT)}: {lines} lines" for path, lines in counts.items()
             if lines > MAX_MODULE_LINES]
    folders: dict[Path, int] = {}
    for path, lines in counts.items():
        folders[path.parent] = folders.get(path.parent, 0) + lines
    total = sum(counts.values())
    found += [f"{folder.relative_to(REPO_ROOT)}/: {lines} of {total} lines" for folder, lines in folders.items()
              if lines > total * MAX_FOLDER_SHARE]
    return found


def test_no_module_over_350_lines_and_no_folder_over_a_third():
    counts = line_counts(ALL_MODULES)
    assert oversized(counts) == [], oversized(counts)


def test_the_size_rule_catches_a_long_module_and_a_heavy_folder():
    counts = line_counts(ALL_MODULES)
    longest = max(counts, key=counts.get)
    assert oversized({**counts, longest: MAX_MODULE_LINES + 1}) == [
        f"{longest.relative_to(REPO_ROOT)}: {MAX_MODULE_LINES + 1} lines"]
    # Forty more files in export/, each under the module limit: the folder outweighs the rest.
    more = {REPO_ROOT / "export" / f"part{index}.py": MAX_MODULE_LINES for index in range(40)}
    assert any(hit.startswith("export/: ") for hit in oversized({**counts, **more}))


def test_the_shipped_folder_is_exactly_what_the_archive_ships():
    """serving/handler/ holds the archive's sources and nothing else (the archive adds the model and
    its manifest); test_lifecycle compares a real .mar's names with the folder too."""
    in_folder = {path.name for path in SHIPPED_DIR.iterdir() if path.name != "__pycache__"}
    assert in_folder == set(ARCHIVE_SOURCES), (in_folder ^ set(ARCHIVE_SOURCES))


def test_what_ships_imports_only_its_own_folder():
    """Inside the archive the shipped modules sit side by side, without the serving package: each
    imports the standard library, third-party packages and its siblings, nothing else of ours."""
    siblings = {name[:-3] for name in ARCHIVE_SOURCES if name.endswith(".py")}
    for name in sorted(siblings):
        path = SHIPPED_DIR / f"{name}.py"
        ours = {imported for imported in imported_names(path) if role_of(imported) is not None}
        outside = {imported for imported in ours if role_of(imported) != "serving.handler"}
        assert not outside, f"{name}.py imports {outside}, which the archive does not ship"
        absolute = [node.module for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("serving")]
        assert not absolute, f"{name}.py imports {absolute}: the serving package does not exist inside the archive"


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


def test_the_testing_doc_lists_every_test_file():
    table = (REPO_ROOT / "docs" / "testing.md").read_text()
    unlisted = [path.name for path in sorted((REPO_ROOT / "tests").glob("test_*.py")) if f"`{path.name}`" not in table]
    assert not unlisted, f"docs/testing.md's table misses {unlisted}"
