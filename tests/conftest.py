from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import AFFINE_YAML, SLOW_YAML, write_model, write_slow_onnx  # noqa: E402


@pytest.fixture(scope="session")
def affine_repo(tmp_path_factory) -> Path:
    """A repository with the affine model as ONNX (2 versions) and as .pt2, a slow model, labels."""
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "affine", "onnx", AFFINE_YAML.format(backend="onnx"), versions=(1, 2))
    write_model(repo, "affine_pt2", "torch", AFFINE_YAML.format(backend="torch"))
    cls = write_model(repo, "affine_labels", "onnx",
                      AFFINE_YAML.format(backend="onnx") + "labels: labels.txt\n")
    (cls / "labels.txt").write_text("cat\ndog\nbird\n")
    write_slow_onnx(repo / "slow" / "1" / "model.onnx")
    (repo / "slow" / "model.yaml").write_text(SLOW_YAML.format(queue=2))
    return repo


@pytest.fixture(autouse=True)
def _kv_blocks_balance(monkeypatch):
    """After every test, every KV-cache block manager the test made (in this process) still holds
    free + used == total blocks, with consistent reference counts: nothing leaked, nothing freed twice."""
    try:
        from rtserve.llm.block_manager import BlockManager
    except ImportError:  # pragma: no cover
        yield
        return
    made = []
    init = BlockManager.__init__

    def tracking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(BlockManager, "__init__", tracking_init)
    yield
    for bm in made:
        bm.check_integrity()
