"""The admin page in headless Chromium: it polls /admin/jobs and shows progress bars."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from app.demo.tiny import TinyTriple
from tests.api.conftest import KEYS
from tests.api.live import LiveServer, merge_body, wait_for

pytestmark = pytest.mark.slow


class JobRows(HTMLParser):
    """Collects ``<tr data-job-id>`` rows and whether each holds a ``<progress>`` bar."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str | None]] = {}
        self._current: str | None = None
        self.status = ""
        self._in_status = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-job-id"):
            self._current = a["data-job-id"]
            self.rows[self._current or ""] = {"status": a.get("data-status"), "progress": None}
        elif tag == "progress" and self._current:
            self.rows[self._current]["progress"] = a.get("value")
        self._in_status = tag == "p" and a.get("id") == "status"

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._current = None
        self._in_status = False

    def handle_data(self, data: str) -> None:
        if self._in_status:
            self.status += data


def dump_dom(url: str, profile: Path) -> JobRows:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/ensure-chromium")
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)
    parser = JobRows()
    parser.feed(done.stdout)
    return parser


def test_admin_page_shows_jobs_with_progress_bars(
    live: LiveServer, alice: httpx.Client, llama_triple: TinyTriple, tmp_path: Path
) -> None:
    job = alice.post("/v1/merges", json=merge_body(llama_triple, alpha=1.25)).json()
    wait_for(alice, job["id"])
    # The key travels in the fragment, which the browser never sends to the server.
    page = dump_dom(f"{live.url}/admin#key={KEYS['root'][1]}", tmp_path / "profile")
    assert job["id"] in page.rows, page.status
    assert page.rows[job["id"]] == {"status": "succeeded", "progress": "100"}
    assert "jobs" in page.status


def test_admin_page_without_a_key_asks_for_one(live: LiveServer, tmp_path: Path) -> None:
    page = dump_dom(f"{live.url}/admin", tmp_path / "profile")
    assert page.rows == {}
    assert "401" in page.status and "admin API key" in page.status


def test_admin_page_is_static_and_locked_down(anon: httpx.Client) -> None:
    page = anon.get("/admin")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = anon.get("/admin/assets/admin.js")
    assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
    assert anon.get("/admin/assets/..%2Fapp.py").status_code == 404
    assert anon.get("/admin/assets/secrets.txt").status_code == 404
