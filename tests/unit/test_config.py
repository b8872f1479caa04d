"""model.yaml parsing: every key, clear errors naming the key, version policies."""
from __future__ import annotations

import pytest

from rtserve.config import BatchingConfig, ModelConfig, ServerConfig, VersionPolicy
from rtserve.errors import ConfigError


def test_full_model_yaml_parses():
    c = ModelConfig.from_dict("m", {
        "backend": "onnx", "device": "cuda:1", "instances": 2, "max_batch_size": 16,
        "batching": {"max_queue_delay_ms": 1.5, "preferred_batch_sizes": [8, 4], "max_queue_size": 10,
                     "priority_levels": 3, "default_priority": 1, "default_timeout_ms": 250},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, -1]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [1]}],
        "labels": "labels.txt", "version_policy": {"latest": 2}, "backend_options": {"intra_op_threads": 1},
    })
    assert c.instances == 2 and c.device == "cuda:1"
    assert c.batching.preferred_batch_sizes == (4, 8) and c.batching.default_timeout_ms == 250
    assert c.inputs[0].shape == (3, -1) and c.outputs[0].datatype == "INT64"
    assert c.version_policy.select([1, 2, 3]) == [2, 3]


@pytest.mark.parametrize("data,needle", [
    ({}, "missing key 'backend'"),
    ({"backend": "onnx", "max_batch": 4}, "unknown key 'max_batch'"),
    ({"backend": "onnx", "device": "gpu"}, "device: 'gpu'"),
    ({"backend": "onnx", "instances": 0}, "instances: expected an integer >= 1"),
    ({"backend": "onnx", "max_batch_size": -1}, "max_batch_size"),
    ({"backend": "onnx", "max_batch_size": "8"}, "max_batch_size"),
    ({"backend": "onnx", "batching": {"max_queue_delay": 1}}, "batching: unknown key 'max_queue_delay'"),
    ({"backend": "onnx", "batching": {"max_queue_size": 0}}, "max_queue_size"),
    ({"backend": "onnx", "batching": {"priority_levels": 2, "default_priority": 2}}, "default_priority"),
    ({"backend": "onnx", "batching": {"preferred_batch_sizes": 4}}, "preferred_batch_sizes"),
    ({"backend": "onnx", "inputs": [{"name": "x", "datatype": "FP33", "shape": [1]}]}, "inputs[0].datatype"),
    ({"backend": "onnx", "inputs": [{"name": "x", "datatype": "FP32"}]}, "missing key 'shape'"),
    ({"backend": "onnx", "inputs": [{"name": "x", "datatype": "FP32", "shape": [0]}]}, "positive ints or -1"),
    ({"backend": "onnx", "version_policy": {"newest": 1}}, "version_policy"),
    ({"backend": "onnx", "version_policy": {"specific": []}}, "version_policy.specific"),
    ({"backend": "onnx", "name": "other"}, "differs from the folder name"),
    ("just a string", "expected a mapping"),
])
def test_bad_model_yaml_names_the_problem(data, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict("m", data)
    assert needle in e.value.message


def test_version_policies():
    assert VersionPolicy.from_value(None).select([3, 1, 2]) == [3]
    assert VersionPolicy.from_value("all").select([3, 1, 2]) == [1, 2, 3]
    assert VersionPolicy.from_value({"specific": [1, 3, 9]}).select([1, 2, 3]) == [1, 3]
    assert VersionPolicy.from_value({"latest": 5}).select([1, 2]) == [1, 2]


def test_batching_defaults_and_server_env(monkeypatch):
    b = BatchingConfig()
    assert b.max_queue_delay_ms == 0 and b.priority_levels == 1 and b.max_queue_size > 0
    monkeypatch.setenv("RTSERVE_PORT", "9123")
    monkeypatch.setenv("RTSERVE_API_KEY", "s")
    monkeypatch.setenv("RTSERVE_PROTECT_INFERENCE", "true")
    c = ServerConfig.from_env(host="0.0.0.0")
    assert c.port == 9123 and c.api_key == "s" and c.protect_inference and c.host == "0.0.0.0"
    assert ServerConfig.from_env(port=1).port == 1
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(port=70000)


def test_connection_settings_from_env_flags_and_into_uvicorn(monkeypatch):
    import argparse

    from rtserve.cli import _add_serve_parsers
    from rtserve.server.app import App
    from rtserve.server.http_protocol import HeaderTimeoutProtocol
    from rtserve.server.runner import uvicorn_config

    c = ServerConfig()
    assert (c.timeout_keep_alive, c.timeout_header, c.limit_concurrency) == (30.0, 60.0, None)
    monkeypatch.setenv("RTSERVE_TIMEOUT_KEEP_ALIVE", "2.5")
    monkeypatch.setenv("RTSERVE_LIMIT_CONCURRENCY", "10")
    c = ServerConfig.from_env()
    assert c.timeout_keep_alive == 2.5 and c.limit_concurrency == 10  # an int, not the string "10"
    parser = argparse.ArgumentParser()
    _add_serve_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--timeout-keep-alive", "4", "--timeout-header", "7", "--limit-concurrency", "3"])
    assert (args.timeout_keep_alive, args.timeout_header, args.limit_concurrency) == (4.0, 7.0, 3)
    u = uvicorn_config(App(c), c)
    assert u.timeout_keep_alive == 2.5 and u.limit_concurrency == 10
    assert u.http.func is HeaderTimeoutProtocol and u.http.keywords == {"timeout_header": 60.0}
    monkeypatch.setenv("RTSERVE_LIMIT_CONCURRENCY", "ten")
    with pytest.raises(ConfigError, match="RTSERVE_LIMIT_CONCURRENCY: 'ten' is not an integer"):
        ServerConfig.from_env()


@pytest.mark.parametrize("kw,needle", [
    ({"timeout_keep_alive": 0}, "timeout_keep_alive"), ({"timeout_header": -1}, "timeout_header"),
    ({"limit_concurrency": 1}, "limit_concurrency: must be at least 2"),
])
def test_bad_connection_settings_name_the_field(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        ServerConfig(**kw)
