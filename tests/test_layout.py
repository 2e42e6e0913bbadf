"""The package's layout by process (docs/architecture.md): imports run one way, from the CLI down to
the in-stub pipeline, and no module imports itself back through others.

Read from the source with `ast` (nothing is imported), so an import hidden inside a function counts
as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reward_server"
# Lower numbers are lower layers: a module may import its own layer and the ones below it.
LAYERS = {"pipeline": 0, "supervisor": 1, "builder": 2, "gateway": 2, "cli": 3, "probe": 3}
# Same-layer packages that must not know each other.
APART = {("builder", "gateway"), ("gateway", "builder")}
# The gateway talks to servers through the client SDK only, and so does the probe: neither imports
# the rest of the package (the CLI starts the gateway).
SELF_CONTAINED = ("gateway", "probe")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it (`from pkg import module` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import module` imports that module; `from module import symbol`, the module
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `a.b.symbol` -> `a.b`
                name = name.rpartition(".")[0]
            if name.startswith("reward_server."):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported(path, set(files)) - {name} for name, path in files.items()}


def area(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in graph() if m != "reward_server" and area(m) not in LAYERS)
    assert not unplaced, f"modules outside the layout of docs/architecture.md: {unplaced}"


def test_imports_run_one_way():
    wrong = []
    for module, targets in graph().items():
        if module == "reward_server":
            continue
        for target in targets:
            here, there = area(module), area(target)
            if here == there or target == "reward_server":
                continue
            if LAYERS[there] > LAYERS[here] or (here, there) in APART or here in SELF_CONTAINED:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [node, target]))
            elif target not in state:
                visit(target, stack + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("model_py", sorted(ROOT.glob("model_repository/*/1/model.py")), ids=lambda p: p.parts[-3])
def test_model_files_import_the_pipeline_only(model_py):
    """Triton's stubs load only the in-stub pipeline (its dependencies are what a stub may import)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    outside = sorted(m for m in imported(model_py, modules) if area(m) != "pipeline")
    assert not outside, f"{model_py.relative_to(ROOT)} imports {outside}"


def test_checker_sees_a_violation(tmp_path):
    """The graph reader catches both import forms, inside functions too (so the tests above can fail)."""
    source = tmp_path / "probe_module.py"
    source.write_text("def f():\n    from reward_server.supervisor import server\n"
                      "    import reward_server.builder.build as b\n"
                      "from reward_server.pipeline.chat import ChatEncoder\n")
    modules = {"reward_server.supervisor.server", "reward_server.builder.build", "reward_server.pipeline.chat",
               "reward_server.supervisor", "reward_server.pipeline", "reward_server.builder"}
    assert imported(source, modules) == {"reward_server.supervisor.server", "reward_server.builder.build",
                                         "reward_server.pipeline.chat"}
