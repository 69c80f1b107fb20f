"""Import structure: every module imports in a fresh interpreter whatever came before it (a
cycle between top-level imports fails in one of the two orders), no module-level cycle hides
in function-level imports, and the training loop knows no model family."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from tests.train_helpers import REPO, env

PACKAGE = REPO / "amtrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.stem != "__main__")


@pytest.mark.parametrize("order", ["alphabetical", "reverse"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    modules = all_modules()
    if order == "reverse":
        modules.reverse()
    code = f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """amtrain modules `path` imports anywhere (functions included, `if TYPE_CHECKING:` not)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # drop typing-only imports
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out - {module_name(path)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as a path, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    """Function-level imports included: `loop` calling back into a module that imports `loop`
    is a cycle even though both import in any order. (A package's `__init__` importing its own
    submodules is the package, not a cycle: edges into a package's `__init__` from inside it
    are left out.)"""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.stem != "__main__"}
    known = set(files)
    graph = {m: {t for t in imported_modules(p, known) if not m.startswith(t + ".")} for m, p in files.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_training_loop_knows_no_model_family():
    """Family-specific training lives in the objectives (amtrain/train/objective.py), found
    through the registry: the trainer, its builders and the entry point name no family, no
    objective class and no modality."""
    from amtrain.registry import family, family_names, modality_of

    families = set(family_names())
    objectives = {family(f).objective.partition(":")[2] for f in families}
    modalities = {modality_of(t).name for t in ("gpt2", "ascii", "midi", "audio", "ids")}
    for name in ("loop.py", "trainer.py", "builders.py"):
        source = (PACKAGE / "train" / name).read_text()
        words = {w.lower() for w in re.findall(r"[A-Za-z0-9_]+", source)}
        named = words & {w.lower() for w in families | objectives}
        assert not named, (name, named)
        strings = {ast.literal_eval(t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
                   if t.type == tokenize.STRING and not t.string.startswith(('"""', "f", "rf", "b"))}
        assert not strings & (families | modalities), (name, strings & (families | modalities))
        assert ".arch ==" not in source and "tokenizer ==" not in source, name
