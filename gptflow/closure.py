"""The code a stage is made of: a module and every project module it imports, directly or not, read from the
source with `ast` (lazy imports inside functions included), each keyed by the sha256 of its file. No list is kept
by hand, so none can drift from the code."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Sequence

# The project's top-level packages (pyproject's packages.find): only their modules key a stage.
PROJECT_PACKAGES = frozenset({"gptflow", "data", "model", "eval", "tasks", "flows", "edge", "cli"})


@functools.lru_cache(maxsize=None)
def module_digest(name: str) -> str:
    """sha256 of a module's source file."""
    return hashlib.sha256(_source_path(name).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def _source_path(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"no source for module {name!r}")
    return Path(spec.origin)


def _is_project_module(name: str) -> bool:
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package: `from model.gpt import GPTModel`
        return False


@functools.lru_cache(maxsize=None)
def _direct_imports(name: str) -> frozenset[str]:
    """The project modules `name` imports anywhere in its source (lazy imports inside functions included), with
    the packages above each (their `__init__` runs first)."""
    path = _source_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from model import gpt`
    with_parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}
    return frozenset(m for m in with_parents if _is_project_module(m))


def import_closure(names: str | Sequence[str]) -> list[str]:
    """`names` and every project module they import, directly or not, sorted."""
    todo = [names] if isinstance(names, str) else list(names)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name == "__main__":  # a stage module run with `python -m`
            name = importlib.import_module("__main__").__spec__.name
        if name not in seen:
            seen.add(name)
            todo.extend(_direct_imports(name) - seen)
    return sorted(seen)
