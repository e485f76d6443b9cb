"""Real `realign` processes for the serving-plane tests: started with one environment
(plus per-process overrides, e.g. a node cache each), their logs kept; and what the
tests ask them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.demo.tiny import TinyTriple
from tests.api.live import merge_body
from tests.jobs.conftest import ROOT, free_port

QUESTION = [{"role": "user", "content": "What is the capital of the country?"}]


@dataclass
class Planes:
    """`realign` processes started with one environment, their logs kept."""

    env: dict[str, str]
    logdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, name: str, *args: str, prelude: str = "", **env: str
    ) -> subprocess.Popen[bytes]:
        """``realign <args>`` with this environment, ``env`` added (``prelude``: Python
        run in the process first, e.g. to hold a step at a chosen point)."""
        log = (self.logdir / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "app.cli", *args]
        if prelude:
            cli = f"import sys\nsys.argv = {['realign', *args]!r}\nfrom app.cli import main\nmain()"
            cmd = [sys.executable, "-c", f"{prelude}\n{cli}"]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def serve(
        self, name: str, role: str, prelude: str = "", **env: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        """``realign serve --role <role>`` on a free port, once its /healthz answers.

        The API is started again on a new port if another process took that one before
        the server bound it. A serving replica is not: uvicorn binds after the app's
        startup, so a replica that loses its port may already have reported "loading"
        on a notice, and a second one would muddle what the test checks."""
        for _ in range(3 if role == "api" else 1):
            port = free_port()
            args = ("serve", "--role", role, "--port", str(port))
            log = self.logdir / f"{name}.log"
            offset = log.stat().st_size if log.exists() else 0
            proc = self.start(name, *args, prelude=prelude, **env)
            url = f"http://127.0.0.1:{port}"
            if self._answers(name, proc, url, log, offset):
                return proc, url
        raise AssertionError(f"{name}: its port was taken each time\n{self.logs()}")

    def _answers(
        self, name: str, proc: subprocess.Popen[bytes], url: str, log: Path, offset: int
    ) -> bool:
        """True once ``url``/healthz answers; False if the port was taken meanwhile (the
        log past ``offset``, what this process wrote, says so)."""
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                with log.open("rb") as f:
                    f.seek(offset)
                    said = f.read().decode(errors="replace").lower()
                assert "address already in use" in said, self.logs()
                return False
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{name} did not start\n{self.logs()}"
            time.sleep(0.2)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a paused one must be able to exit
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in self.logdir.glob("*.log"))


def submit(api: str, triple: TinyTriple, name: str, alpha: float) -> str:
    body = merge_body(triple, serve=True, name=name, alpha=alpha)
    response = httpx.post(f"{api}/v1/merges", json=body, timeout=30)
    assert response.status_code in (200, 201, 202), response.text
    return str(response.json()["id"])


def job_when(api: str, job_id: str, done: Any, planes: Planes, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{api}/v1/merges/{job_id}", timeout=10).json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id}: {job}\n{planes.logs()}"
        time.sleep(0.2)


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def greedy(url: str, model: str) -> str:
    body = {"model": model, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])
