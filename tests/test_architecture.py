"""The house as its imports draw it: the core's modules stand on floors, each importing only from its own
floor or below; no job imports another job, the loop imports no job, the core imports no plugin, there is
no cycle, the longest chain of imports is at most nine modules and no core module is over 450 lines.
Read with ``ast``, function-level imports included (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CORE = ROOT / "stvq"

#: Bottom to top. A module not named here fails the test: a new module says where it stands.
FLOORS = {
    "errors": 1,
    "interfaces": 2,
    "hookspecs": 2,
    "registry": 3,
    "plugins": 3,
    "config": 3,
    "checkpoint": 4,
    "images": 4,
    "streams": 4,
    "distributed": 4,
    "features": 4,
    "field_metrics": 4,
    "flops": 4,
    "codebook_stats": 4,
    "describe": 4,
    "data": 5,
    "run": 5,
    "metrics": 5,
    "losses": 5,
    "optim": 5,
    "pretrained": 5,
    "plots": 5,
    "trackers": 5,
    "testing": 5,
    "loop": 6,
    "train": 7,
    "quantize": 7,
    "evaluate": 7,
    "compose": 7,
    "prior": 7,
    "cli": 8,
    "": 8,  # the command line; the package's own facade (stvq/__init__.py)
}
JOBS = {name for name, floor in FLOORS.items() if floor == 7}
PLUGINS = ("stvq_reference",)
MAX_CHAIN, MAX_LINES = 9, 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def core_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(core module -> the core modules it imports, core module -> the plugin modules it imports)."""
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    graph, plugins = {}, {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path, name):
            while imported and imported not in modules:  # "stvq.config.TrainConfig" -> "stvq.config"
                imported = imported.rpartition(".")[0]
            if imported and imported not in (name, "stvq"):
                targets.add(imported)
        graph[name] = targets
        plugins[name] = {i for i in imports_of(path, name) if i.split(".")[0] in PLUGINS}
    return graph, plugins


def floor_of(module: str) -> tuple[str, int]:
    """(its floor's key, the floor): ``stvq.cli.train`` stands where ``cli`` does."""
    key = module.removeprefix("stvq").removeprefix(".").split(".")[0]
    if key not in FLOORS:
        pytest.fail(f"{module} stands on no floor: add it to FLOORS in {Path(__file__).name}")
    return key, FLOORS[key]


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def chain(module: str) -> list[str]:
        if module not in memo:
            memo[module] = [module]  # a cycle (its own test fails) ends the chain here
            memo[module] = [module, *max((chain(n) for n in graph[module]), key=len, default=[])]
        return memo[module]

    return max((chain(m) for m in graph), key=len)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the path that closes it (a depth-first search)."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for n in sorted(graph[module]):
            if state.get(n) == "open":
                found.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, [*path, n])
        state[module] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_core_has_no_import_cycle():
    assert cycles(core_graph()[0]) == []


def test_the_core_imports_no_plugin():
    _, plugins = core_graph()
    assert {m: p for m, p in plugins.items() if p} == {}


def test_every_module_imports_only_from_its_floor_or_below_and_no_job_imports_a_job():
    graph, _ = core_graph()
    upward, jobs = [], []
    for module, targets in graph.items():
        key, floor = floor_of(module)
        for target in targets:
            other, other_floor = floor_of(target)
            if other_floor > floor:
                upward.append(f"{module} (floor {floor}) -> {target} (floor {other_floor})")
            if key in JOBS and other in JOBS and key != other:
                jobs.append(f"{module} -> {target}")
    assert upward == [] and jobs == []


def test_the_longest_import_chain_is_at_most_nine_modules():
    chain = longest_chain(core_graph()[0])
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def test_no_core_module_is_over_450_lines():
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in CORE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_the_checks_themselves_see_a_cycle_an_upward_import_and_a_long_chain():
    """A wrong graph fails each check: the tests above cannot pass on an empty reading."""
    graph = {"stvq.loop": {"stvq.train"}, "stvq.train": {"stvq.loop"}, "stvq.errors": set()}
    assert cycles(graph) == [["stvq.loop", "stvq.train", "stvq.loop"]]
    assert floor_of("stvq.loop")[1] < floor_of("stvq.train")[1]  # loop -> train goes upward
    ten = {f"m{i}": {f"m{i + 1}"} for i in range(9)} | {"m9": set()}
    assert len(longest_chain(ten)) == 10
    real, _ = core_graph()
    assert "stvq.loop" in real["stvq.train"] and len(real) > 30  # the reading sees the real imports
