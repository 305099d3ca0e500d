"""The modules' import graph: no cycles at module level, and the registry stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
PACKAGES = ("autotune", "backends")


def module_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports at module level (not inside functions, not
    under TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    names = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
    }
    for name in names:
        path = REPO / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in names and t != name}
        graph[name] = found
    return graph


def test_no_module_imports_itself_back():
    graph = module_imports()
    cycles = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif len(path) < 12:
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, f"import cycles: {sorted({' -> '.join(c) for c in cycles})[:5]}"


def test_config_knows_no_backend_and_no_script():
    graph = module_imports()
    assert not {m for m in graph["autotune.config"] if m.startswith("backends")}
    assert not any(m.startswith("experiments") for deps in graph.values() for m in deps)


def test_the_registry_and_plan_import_no_torch_or_llama_cpp():
    code = (
        "import sys; import backends, autotune.space, autotune.cli\n"
        "from backends import backend_class\n"
        "[backend_class(n) for n in backends.BACKENDS]\n"
        "print(sorted(m for m in ('torch', 'llama_cpp', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
