"""The dependency rules of DESIGN.md, checked by scanning imports.

gateway/ never imports middleware/ or providers/; middleware/* imports only gateway/ (and no
other layer); providers/* imports only gateway/ and itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("gateway"), ids=lambda p: str(p.relative_to(REPO)))
def test_gateway_imports_neither_layers_nor_providers(path: Path) -> None:
    bad = {m for m in imported_top_modules(path) if m.split(".")[0] in ("middleware", "providers")}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", files("middleware"), ids=lambda p: str(p.relative_to(REPO)))
def test_layers_import_only_the_gateway(path: Path) -> None:
    own = path.relative_to(REPO / "middleware").parts[0]
    for module in imported_top_modules(path):
        parts = module.split(".")
        assert parts[0] != "providers", f"{path} imports {module}"
        if parts[0] == "middleware" and len(parts) > 1:
            assert parts[1] == own, f"{path} imports another layer: {module}"


@pytest.mark.parametrize("path", files("providers"), ids=lambda p: str(p.relative_to(REPO)))
def test_providers_import_only_the_gateway(path: Path) -> None:
    bad = {m for m in imported_top_modules(path) if m.split(".")[0] == "middleware"}
    assert not bad, f"{path} imports {bad}"


def test_the_scan_sees_imports() -> None:
    # Guards the guard: the scanner must find this file's own imports.
    assert {"ast", "pathlib", "pytest"} <= imported_top_modules(Path(__file__))
