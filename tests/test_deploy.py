"""Deployment files parse and carry settings the service accepts at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.core.settings import Settings
from app.jobs.broker import check_timeouts

ROOT = Path(__file__).resolve().parents[1]


def test_manifests_parse_and_kustomization_lists_them() -> None:
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (ROOT / "k8s").glob("*.yaml")}
    resources = docs["kustomization.yaml"][0]["resources"]
    assert set(resources) == set(docs) - {"kustomization.yaml"}
    kinds = {d["kind"] for name, ds in docs.items() for d in ds if name != "kustomization.yaml"}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Secret",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    } <= kinds
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"redis", "api", "worker"}


def test_configmap_settings_pass_start_up_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "config.yaml").read_text()))
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    for key, value in data.items():  # the way the pods get them: environment variables
        monkeypatch.setenv(key, value)
    settings = Settings()
    check_timeouts(settings)
    assert settings.redis_url and settings.allowed_roots
