"""The layout rules of docs/architecture.md, read from the source by scripts/check_layout.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts" / "check_layout.py")
check_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layout)


def test_the_source_keeps_the_layout_rules():
    assert check_layout.violations(ROOT / "src" / "rtserve") == []


def test_the_checker_finds_a_cycle_a_layer_breach_and_oversized_code(tmp_path):
    pkg = tmp_path / "rtserve"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "backends" / "base.py").write_text("from ..models import base\n")
    (pkg / "models" / "base.py").write_text("from ..backends.base import x\n")
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    (pkg / "big.py").write_text("def long():\n" + body + "\n" + "\n" * 400)
    found = "\n".join(check_layout.violations(pkg))
    assert "import cycle between backends, models" in found
    assert "lower layer 'backends' imports 'models'" in found
    assert "big.py: " in found and "function long has 91 lines" in found
