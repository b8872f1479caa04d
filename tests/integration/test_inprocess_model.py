"""rtserve.Model: a repository model used without the server."""
from __future__ import annotations

import numpy as np
import pytest

import rtserve
from models import expected
from rtserve.errors import ConfigError, InvalidInput


def test_model_in_process_matches_and_validates(affine_repo):
    m = rtserve.Model(affine_repo / "affine")
    assert m.version == 2 and m.metadata["inputs"][0]["shape"] == [-1, 4]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(m.infer({"x": x})["y"], expected(x))
    with pytest.raises(InvalidInput, match="unknown input 'z'"):
        m.infer({"z": x})
    assert rtserve.Model(affine_repo / "affine", version=1).version == 1
    with pytest.raises(ConfigError):
        rtserve.Model(affine_repo / "affine", version=7)
    labelled = rtserve.Model(affine_repo / "affine_labels")
    assert labelled.infer({"x": np.array([[0, 5, 0, 0]], np.float32)})["label"].tolist() == [b"dog"]
    m.close()
