"""The import graph of the project's own modules, read from their source (ast): no cycles, and no
module imports an entry point (docs/architecture.md)."""

import ast

import pytest

from conftest import ROOT

# Programs: run, never imported by project code. inference.py is only its CLI (sampling.py is the library).
ENTRY_POINTS = {"train", "train_grpo", "inference", "eval_imagenet"}


def project_modules() -> dict[str, ast.Module]:
    """Module name -> parsed source, for every .py file outside tests/ and the virtualenv."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in ("tests", ".venv") or any(p.startswith(".") for p in parts):
            continue
        name = ".".join(parts)[: -len(".py")].removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def is_entry_point(name: str) -> bool:
    return name in ENTRY_POINTS or name.startswith("scripts.") or name.startswith("experiments.")


def imports_of(tree: ast.Module, modules: set[str]) -> set[str]:
    """Project modules a file imports anywhere (top level or inside functions: a lazy import is still an
    edge). A script run as `python scripts/x.py` has scripts/ on sys.path, so `import x` may name scripts/x.py."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            for candidate in (name, f"scripts.{name}"):
                if candidate in modules:
                    out.add(candidate)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(tree, set(modules)) - {name} for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"train", "runtime", "build", "sampling", "rl.reward", "scripts.benchmark_train"} <= set(graph)
    assert "runtime" in graph["train"] and "sampling" in graph["rl.sde_sampler"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_an_entry_point():
    offenders = {
        (name, target) for name, targets in import_graph().items() for target in targets if is_entry_point(target)
    }
    assert offenders == set()


@pytest.mark.parametrize("library", ["sampling"])
def test_the_sampler_imports_only_flow_and_solvers(library):
    assert import_graph()[library] == {"flow", "ode_solvers"}


def test_every_top_level_module_ships_in_the_wheel():
    """pyproject.toml lists the wheel's contents explicitly (the project is flat modules)."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
            "only-include"
        ]
    )
    modules = {path.name for path in ROOT.glob("*.py")}
    assert modules <= listed, sorted(modules - listed)


def test_the_import_table_in_docs_architecture_matches_the_source():
    """Each row `| layer | `a`, `b` | x, y |` of docs/architecture.md's import graph lists exactly the
    project modules those modules import."""
    import re

    graph = import_graph()
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Import graph") : text.index("## Where to add")]
    checked = 0
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`") or "*" in cells[1]:
            continue
        names = re.findall(r"`([\w.]+)`", cells[1])
        imports = re.sub(r"\(.*?\)", "", cells[2]).replace(";", ",")  # drop the remarks in parentheses
        documented = [{m.strip() for m in part.split(",")} - {"", "—"} for part in imports.split("/")]
        documented = documented * len(names) if len(documented) == 1 else documented
        for name, listed in zip(names, documented):
            actual = {m for m in graph[name] if not m.startswith(("scripts.", "experiments."))}
            assert actual == listed, (name, sorted(actual), sorted(listed))
            checked += 1
    assert checked >= 30, checked
