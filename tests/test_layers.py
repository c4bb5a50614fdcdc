"""The layers point down: a program that only calls a server imports neither torch nor the server;
every import of a project module points to its own layer or one below (API, library, engines,
server, cluster, the command); no modules import each other in a circle; no module outgrows what a
reader takes in at once; and the server installs inside the project's namespace
(`adapter_fusion.server`), never as a top-level `server`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
LIBRARY = ROOT / "adapter_fusion"
SERVER = ROOT / "server"  # installed as adapter_fusion.server
API = {"client", "names", "errors", "routing"}  # with the generated v1 package: torch-free
TOP = {"cli", "vllm_plugin"}  # entry points: the command, vLLM's plugin
LAYERS = ("api", "library", "engines", "server", "cluster", "command")
MAX_LINES = 320  # ~300: one concept a module; generated code aside


def module_name(path: Path) -> str:
    parts = ("adapter_fusion", "server", *path.relative_to(SERVER).parts) if SERVER in path.parents else path.relative_to(ROOT).parts
    parts = [*parts[:-1], path.stem]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in [*LIBRARY.rglob("*.py"), *SERVER.rglob("*.py")]}


def layer(module: str) -> str:
    parts = module.split(".")[1:] or ["__init__"]
    if parts[0] in {"v1", *API}:
        return "api"
    if parts[0] in {"engines", "server", "cluster"}:
        return parts[0]
    return "command" if parts[0] in TOP else "library"


def imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its file (lazy imports too); `from package
    import submodule` names the submodule."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs or {node.module}
    return (found & MODULES.keys()) - {module}


def test_the_client_imports_no_torch_and_no_server() -> None:
    probe = "import sys, adapter_fusion.client; print(sorted(m for m in ('torch', 'transformers', 'peft', 'adapter_fusion.server') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip() == "[]"


def test_every_import_points_down() -> None:
    upward = [
        f"{m} ({layer(m)}) imports {n} ({layer(n)})"
        for m in sorted(MODULES)
        for n in sorted(imports(m))
        if LAYERS.index(layer(n)) > LAYERS.index(layer(m))
    ]
    assert upward == []


def test_no_import_circle() -> None:
    graph = {m: imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                circles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_no_module_over_the_line_budget() -> None:
    long = {m: n for m, p in MODULES.items() if ".v1" not in m and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_server_installs_inside_the_project_namespace(tmp_path: Path) -> None:
    probe = "import importlib.util as u; print(u.find_spec('adapter_fusion.server.app') is not None, u.find_spec('server') is None)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split() == ["True", "True"]


def test_module_names_are_distinct() -> None:
    """One name, one module: no two files of the library, the server, the benchmarks, the examples
    or the tests share a name (a reader looking for `base.py` or `registry.py` finds one)."""
    where: dict[str, list[str]] = {}
    for folder in ("adapter_fusion", "server", "bench", "examples", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name not in ("__init__.py", "conftest.py"):
                where.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
