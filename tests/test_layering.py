"""Imports flow one way: cli -> registry_server/catalog -> registry_client -> blobstore."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_packages(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_blobstore_imports_neither_httpx_nor_click_nor_upper_layers() -> None:
    assert not _imported_packages("blobstore") & {"httpx", "click", "registry_client",
                                                   "registry_server", "catalog", "cli"}


def test_registry_client_does_not_import_cli_or_catalog() -> None:
    assert not _imported_packages("registry_client") & {"click", "cli", "catalog",
                                                        "registry_server"}


def test_registry_server_does_not_import_cli_or_catalog() -> None:
    assert not _imported_packages("registry_server") & {"click", "cli", "catalog"}


def test_catalog_does_not_import_cli_or_llama_at_module_level() -> None:
    assert not _imported_packages("catalog") & {"click", "cli"}
    code = ("import sys, catalog, catalog.catalog, catalog.recommend, catalog.hf, "
            "catalog.fetch, catalog.bench;"
            "sys.exit(1 if {'llama_cpp', 'cli'} & set(sys.modules) else 0)")  # httpx loads click
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_blobstore_runtime_import_pulls_in_no_http_or_cli() -> None:
    code = ("import sys, blobstore, blobstore.store, blobstore.importer, blobstore.gguf;"
            "bad = {'httpx', 'click', 'registry_client', 'catalog', 'cli'} & set(sys.modules);"
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
