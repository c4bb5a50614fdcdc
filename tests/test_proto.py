"""The checked-in stubs under adapter_fusion/v1/ are exactly what protos/ generates."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert [str(p) for p in generated] == [
        "adapter_fusion/v1/adapter_fusion_pb2.py",
        "adapter_fusion/v1/adapter_fusion_pb2.pyi",
        "adapter_fusion/v1/adapter_fusion_pb2_grpc.py",
    ]
    for path in generated:
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: run protos/generate.sh"
