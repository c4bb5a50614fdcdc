"""The layers point down: a program that only calls a server imports neither torch nor the server,
no library module imports the gRPC server or the cluster above it, and the server installs inside
the project's namespace (`adapter_fusion.server`), never as a top-level `server`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
LIBRARY = ROOT / "adapter_fusion"
ABOVE_THE_LIBRARY = {LIBRARY / "cli", LIBRARY / "cluster"}  # the command and the cluster sit on top of the server


def test_the_client_imports_no_torch_and_no_server() -> None:
    probe = "import sys, adapter_fusion.client; print(sorted(m for m in ('torch', 'transformers', 'peft', 'adapter_fusion.server') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip() == "[]"


def test_no_library_module_imports_the_server() -> None:
    upward = []
    for path in LIBRARY.rglob("*.py"):
        if any(path == top or top in path.parents for top in ABOVE_THE_LIBRARY):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            upward += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[:2] == ["adapter_fusion", "server"]]
    assert upward == []


def test_the_server_installs_inside_the_project_namespace(tmp_path: Path) -> None:
    probe = "import importlib.util as u; print(u.find_spec('adapter_fusion.server.app') is not None, u.find_spec('server') is None)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split() == ["True", "True"]
