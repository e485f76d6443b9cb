"""The demo's client side of the service: a `realign serve` process, a merge job
followed to the end, and chat through the OpenAI SDK."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from rich.console import Console

from app.core import lifeline
from app.core.errors import RealignError

TERMINAL = {"succeeded", "failed", "cancelled"}


class DemoError(RealignError, RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else a free one."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DemoError("no free port on 127.0.0.1")


class ServeProcess:
    """`realign serve` in a child process, with the environment's (default) settings.

    Args:
        port: where it listens (on 127.0.0.1).
        log: receives the server's output.
        env: extra environment variables.
    """

    def __init__(self, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as sink:
            # Tied to the demo: a demo killed outright leaves no server (or engine) behind.
            self.proc = lifeline.spawn(
                self.command, stdout=sink, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"realign serve exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise DemoError(f"realign serve did not answer within 120 s; see {self.log}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            lifeline.stop(self.proc, grace=30)

    def tail(self, lines: int = 8) -> str:
        """The last lines of the server's log, on one line."""
        text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(text) or f"no output (log: {self.log})"


def _line(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    pct = f" {progress.get('percent', 0):5.1f}%" if job["status"] == "running" else ""
    return f"  job {job['id']}: {job['status']:<10} stage={job.get('stage') or '-'}{pct}"


def follow(
    client: httpx.Client, job_id: str, console: Console, timeout: float = 600
) -> dict[str, Any]:
    """Poll ``GET /v1/merges/{id}``, printing each change of status, stage or progress,
    until the job ends; returns its last body."""
    last = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/merges/{job_id}").raise_for_status().json()
        line = _line(job)
        if line != last:
            console.print(line, highlight=False)
            last = line
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise DemoError(f"job {job_id} did not end within {timeout:.0f} s")


def chat(base_url: str, model: str, question: str, max_tokens: int = 32) -> str:
    """One greedy chat turn through the OpenAI SDK."""
    from openai import OpenAI

    # No key is configured: the server binds to loopback only and needs none.
    client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
    )
    return reply.choices[0].message.content or ""
