"""The deployment files, checked statically (Docker cannot run here): hadolint on the Dockerfiles,
Kubernetes schema validation on the manifests, and every container's arguments parsed by rtserve's
own CLI, so a renamed flag breaks this test rather than a deployment."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint_and_run_the_readme_command(dockerfile):
    r = subprocess.run([_tool("hadolint"), "--failure-threshold", "warning", str(DEPLOY / dockerfile)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (DEPLOY / dockerfile).read_text()
    assert 'ENTRYPOINT ["rtserve", "serve"]' in text  # what `make serve` runs
    assert "USER 10001" in text and "/v2/health/ready" in text


def test_kubernetes_manifests_match_the_api_schemas():
    files = sorted((DEPLOY / "k8s").glob("*.yaml"))
    r = subprocess.run([_tool("kubernetes-validate"), "-k", "1.32.0", "--strict", *map(str, files)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deployment/rtserve" in r.stdout + r.stderr and "horizontalpodautoscaler/rtserve" in r.stdout + r.stderr


def _containers():
    for f in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            spec = (doc or {}).get("spec", {})
            pod = spec.get("template", {}).get("spec", spec)
            for c in pod.get("containers", []) or []:
                yield f, doc, c


def test_every_container_runs_arguments_the_cli_accepts(monkeypatch):
    from rtserve import cli

    seen = []
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.append(args) or 0)
    found = list(_containers())
    assert {d["kind"] for _, d, _ in found} >= {"Deployment", "ServingRuntime"}
    for f, doc, c in found:
        assert cli.main(["serve", *c.get("args", [])]) == 0, (f, c.get("args"))
        args = seen[-1]
        port = next(p["containerPort"] for p in c["ports"])
        assert (args.port or 8000) == port, (f, "the server must listen where the probes look")
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"].startswith("/v2/health/"), (f, probe)


def test_kserve_runtime_speaks_v2_and_scrapes_metrics():
    docs = list(yaml.safe_load_all((DEPLOY / "kserve" / "servingruntime.yaml").read_text()))
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["spec"]["protocolVersions"] == ["v2"]
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]


def test_ray_cluster_config_starts_rtserve_on_the_cluster(monkeypatch):
    import shlex

    from rtserve import cli

    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    assert {"cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"} <= set(cfg)
    serve = [c for c in cfg["head_start_ray_commands"] if "rtserve serve" in c]
    assert len(serve) == 1
    argv = shlex.split(serve[0].split(">")[0])
    argv = argv[argv.index("rtserve") + 1:]
    seen = []
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.append(args) or 0)
    assert cli.main(argv) == 0 and seen[0].ray == "auto" and seen[0].repo == "/models"
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
