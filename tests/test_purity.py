"""The pure modules stay pure: walked through their imports, transitively, none reaches an I/O
library (sqlite3, httpx, trio, libvirt, pyroute2, pynvml, socket) or does file I/O.

Static (the source's `import` statements and calls, read with `ast`), so a lazy import inside a
function counts too, and nothing has to be imported to be checked.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hostagent"

# I/O libraries (and the stdlib modules that open files or sockets) a pure module must not
# reach, by top-level name, or exact dotted name for submodules of harmless packages.
FORBIDDEN = frozenset({
    "sqlite3", "httpx", "trio", "libvirt", "pyroute2", "pynvml", "socket", "ssl", "ctypes",
    "pathlib", "io", "shutil", "tempfile", "mmap", "select", "selectors", "subprocess",
    "urllib.request", "http.client", "importlib.resources", "asyncio", "threading",
})
# Calls that do file I/O without an import of their own.
FILE_CALLS = frozenset({"open"})
OS_FILE_CALLS = frozenset({
    "open", "read", "write", "pread", "listdir", "scandir", "stat", "lstat", "fdopen", "remove",
    "unlink", "rename", "replace", "mkdir", "makedirs", "walk",
})
PATH_METHODS = frozenset({"read_text", "read_bytes", "write_text", "write_bytes", "open"})


def pure_modules() -> list[str]:
    """accounting/*, alerts/* but the rule sources (file, API store, central), the owner index
    and account parsers, and the shared value types, errors and clock."""
    mods = [f"hostagent.accounting.{p.stem}" for p in sorted((PKG / "accounting").glob("*.py"))
            if p.stem != "__init__"]
    mods += [f"hostagent.alerts.{p.stem}" for p in sorted((PKG / "alerts").glob("*.py"))
             if p.stem not in ("__init__", "rules_source", "rules_file", "rule_store",
                               "central")]
    return [*mods, "hostagent.owners.index", "hostagent.owners.accounts", "hostagent.model",
            "hostagent.source_model", "hostagent.store.merging",
            "hostagent.errors", "hostagent.clock"]


def source_of(module: str) -> Path:
    path = ROOT / (module.replace(".", "/") + ".py")
    return path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"


@cache
def direct(module: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """(modules imported, file-I/O calls made) by one module's source."""
    tree = ast.parse(source_of(module).read_text(), str(source_of(module)))
    imported: set[str] = set()
    calls: list[str] = []
    package = module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            imported.add(base)
            imported.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FILE_CALLS:
                calls.append(f"{f.id}() at line {node.lineno}")
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                if (owner == "os" and f.attr in OS_FILE_CALLS) or f.attr in PATH_METHODS:
                    calls.append(f"{owner or '…'}.{f.attr}() at line {node.lineno}")
    return frozenset(imported), tuple(calls)


def is_internal(name: str) -> bool:
    return name.startswith("hostagent.") and (source_of(name).exists())


def violations(module: str) -> list[str]:
    """Every forbidden import or file call reachable from `module`, with the import chain."""
    out: list[str] = []
    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(module, (module,))]
    while todo:
        mod, chain = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        imports, calls = direct(mod)
        out.extend(f"{' -> '.join(chain)}: {c}" for c in calls)
        for name in sorted(imports):
            top = name.split(".")[0]
            if top in FORBIDDEN or name in FORBIDDEN or any(
                    name.startswith(f + ".") for f in FORBIDDEN):
                out.append(f"{' -> '.join(chain)}: imports {name}")
            elif is_internal(name):
                todo.append((name, (*chain, name)))
    return out


@pytest.mark.parametrize("module", pure_modules())
def test_pure_module_reaches_no_io(module: str) -> None:
    assert violations(module) == []


def test_the_walk_catches_io_through_an_import_chain() -> None:
    """The check can fail: an I/O module and a module importing it are both flagged."""
    assert any("imports trio" in v for v in violations("hostagent.sources.gpu"))
    assert any("hostagent.collector -> " in v for v in violations("hostagent.collector"))
    assert any("os.open()" in v for v in violations("hostagent.sources.files"))
