"""Probes and Prometheus metrics, computed from the job records at scrape time."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.api.app import create_app
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from tests.api.live import LiveServer, merge_body, wait_for


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_report_jobs_durations_bytes_and_queues(
    alice: httpx.Client, root: httpx.Client, llama_triple: TinyTriple
) -> None:
    job = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=1.5)).json()
    wait_for(alice, job["id"])
    response = root.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("realign_jobs", (("status", "succeeded"),))] >= 1
    assert ("realign_jobs", (("status", "queued"),)) in samples
    count = samples[("realign_job_duration_seconds_count", ())]
    assert count >= 1
    assert samples[("realign_job_duration_seconds_bucket", (("le", "+Inf"),))] == count
    assert samples[("realign_job_duration_seconds_sum", ())] > 0
    assert samples[("realign_merged_bytes_total", ())] > 0
    assert ("realign_queue_depth", (("queue", "embedded"),)) in samples
    assert samples[("realign_workers_alive", ())] == 1  # the embedded worker


def test_readyz_stays_ready_without_a_worker(tmp_path: Path) -> None:
    """Workers restarting must not drop the API from its Service: readiness names the
    missing worker, and the metric counts live ones."""
    settings = Settings(models_cache_dir=tmp_path / "store", allowed_roots=[tmp_path])
    app = create_app(settings)
    with LiveServer(app) as server, server.client() as client:
        assert client.get("/readyz").json()["detail"] == "ready"
        app.state.service.stop()  # the embedded worker leaves: jobs would queue
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert "no worker is alive" in ready.json()["detail"]
        assert client.get("/healthz").status_code == 200
        app.state.service.start()
