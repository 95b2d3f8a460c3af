"""The import rules of the layers (docs: design.md, "Architecture"), checked on the source of every package.

Every import statement counts, at module level or inside a function. A relative import stays in its package.
"""

from __future__ import annotations

import ast
import sys

import pytest
from conftest import REPO_ROOT

# The layers each layer may import (besides itself): `cli -> flows -> tasks -> (model, eval, data) -> gptflow`,
# and `edge` is a leaf that anyone may import.
MAY_IMPORT = {
    "cli": {"flows", "tasks", "model", "eval", "data", "gptflow", "edge"},
    "flows": {"tasks", "model", "eval", "data", "gptflow", "edge"},
    "tasks": {"model", "eval", "data", "gptflow", "edge"},
    "model": {"gptflow", "edge"},
    "eval": {"gptflow", "edge"},
    "data": {"gptflow", "edge"},
    "gptflow": {"edge"},
    "edge": set(),
}
PREFECT_LAYERS = {"cli", "flows", "tasks"}
# Copied alone onto a device, edge has the standard library and these.
EDGE_THIRD_PARTY = {"numpy", "onnxruntime", "tiktoken", "tokenizers"}  # design.md: the bundle's tokenizer package


def imported_modules(path):
    """(line, top-level module, statement) per import in a file; a relative import names no other package."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        for name in names:
            yield node.lineno, name.partition(".")[0], ast.unparse(node)


def broken_rule(layer: str, module: str) -> str | None:
    if module in MAY_IMPORT and module != layer and module not in MAY_IMPORT[layer]:
        allowed = ", ".join(sorted(MAY_IMPORT[layer]))
        return f"{layer}/ may import only {allowed}" if allowed else f"{layer}/ imports nothing of ours"
    if module == "prefect" and layer not in PREFECT_LAYERS:
        return f"only {', '.join(sorted(PREFECT_LAYERS))} import Prefect"
    if layer == "edge" and module not in MAY_IMPORT and module not in sys.stdlib_module_names | EDGE_THIRD_PARTY:
        return f"edge/ imports only the standard library and {', '.join(sorted(EDGE_THIRD_PARTY))}"
    return None


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_layer_imports_follow_the_rules(layer):
    files = sorted((REPO_ROOT / layer).rglob("*.py"))
    assert files, f"no Python files under {layer}/"
    violations = [
        f"{path.relative_to(REPO_ROOT)}:{line}: `{statement}`: {rule}"
        for path in files
        for line, module, statement in imported_modules(path)
        if (rule := broken_rule(layer, module))
    ]
    assert not violations, f"{len(violations)} import(s) break the layer rules:\n" + "\n".join(violations)


def test_the_checker_catches_what_it_should():
    assert broken_rule("model", "eval") == "model/ may import only edge, gptflow"
    assert broken_rule("edge", "gptflow") == "edge/ imports nothing of ours"
    assert broken_rule("eval", "prefect") and broken_rule("edge", "torch") and broken_rule("edge", "filelock")
    assert not any(
        broken_rule(*pair)
        for pair in [
            ("tasks", "prefect"),
            ("cli", "model"),
            ("edge", "numpy"),
            ("model", "torch"),
            ("gptflow", "edge"),
            ("edge", "json"),
        ]
    )


def test_no_flow_module_shadows_a_package():
    """Prefect loads a deployment's entrypoint (`flows/pipeline.py:pipeline`) as a script, with `flows/` first on
    sys.path: a `flows/data.py` there would be imported as the `data` package."""
    shadowing = sorted(p.name for p in (REPO_ROOT / "flows").glob("*.py") if p.stem in MAY_IMPORT)
    assert not shadowing, f"flows/{shadowing[0]} shadows the package {shadowing[0][:-3]}/ when Prefect loads a flow"
