"""A worker SIGKILLed mid-evaluation leaves nothing running: its engine child, the vLLM
engine core that child started (which outlives a killed parent on its own), the
lifelines' watchers — not one process descended from the worker outlives it, nor is
anything left in the engine child's process group. No score of the killed run is
cached, and the redelivered job evaluates afresh on another worker and succeeds. Real
Redis, real ``celery worker`` processes, the real vLLM CPU engine and lm-eval; the fault
is a real SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.evals.models import EvalJob, EvalRequest, SuiteName
from app.evals.stored import read_score
from app.jobs.models import Caller, JobStage, JobStatus
from app.jobs.service import JobService
from tests.core.test_lifeline import describe, gone, wait_gone
from tests.jobs.conftest import RedisServer, Workers, service_env

pytestmark = pytest.mark.slow
ALICE = Caller(name="alice")
LIMIT = 4
REQUEST = EvalRequest(suites=(SuiteName.chat_format,), limit=LIMIT, max_tokens=8, concurrency=4)


def _until(what: str, check: Callable[[], bool], logs: Callable[[], str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}\n{logs()[-6000:]}"
        time.sleep(0.1)


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if not gone(p)]


def _is(p: psutil.Process, module: str) -> bool:
    try:
        return p.cmdline()[1:3] == ["-m", module]
    except psutil.Error:
        return False


def _engine_core(worker: psutil.Process) -> bool:
    """Whether the engine child below ``worker`` has started vLLM's engine core."""
    for child in _running(worker.children(recursive=True)):
        if _is(child, "app.evals.endpoint"):
            with contextlib.suppress(psutil.Error):
                below = _running(child.children(recursive=True))
                return any(p.name() == "VLLM::EngineCore" for p in below)
    return False


def _in_group(pgid: int) -> list[psutil.Process]:
    """The running processes of process group ``pgid``, wherever they are."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and not gone(p):
                out.append(p)
    return out


@pytest.fixture
def cluster(
    redis_server: RedisServer, llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> Iterator[tuple[JobService, Callable[[str], Workers]]]:
    """The job service and workers by engine (vllm, torch)."""
    roots = [llama_triple.base.parent]
    env = service_env(
        redis_server.url,
        store_dir,
        roots,
        REALIGN_JOB_LEASE_S="3",  # a dead worker's lease expires soon
        # an evaluation starts vLLM (~20 s here): above the suite's short limit, and the
        # redelivery waits for the visibility timeout, which must exceed it
        REALIGN_JOB_TIME_LIMIT_S="90",
        REALIGN_VISIBILITY_TIMEOUT_S="100",
        REALIGN_VLLM_ARGS=json.dumps({"enforce_eager": True}),  # no graph compilation
    )
    made: dict[str, Workers] = {}

    def workers(engine: str) -> Workers:
        made.setdefault(engine, Workers({**env, "REALIGN_ENGINE": engine}, tmp_path))
        return made[engine]

    settings = Settings(redis_url=redis_server.url, models_cache_dir=store_dir, allowed_roots=roots)
    try:
        yield JobService.from_settings(settings), workers
    finally:
        for w in made.values():
            w.stop_all()


def test_a_worker_killed_mid_evaluation_leaves_no_process_and_no_score(
    cluster: tuple[JobService, Callable[[str], Workers]], llama_triple: TinyTriple
) -> None:
    svc, workers = cluster
    vllm = workers("vllm")
    proc = vllm.start("doomed")
    doomed = psutil.Process(proc.pid)
    rec, _ = svc.submit_eval(EvalJob(model=str(llama_triple.instruct), request=REQUEST), ALICE)

    # Killed once the engine child has started vLLM's engine core (the worker's grandchild).
    _until("vLLM's engine core", lambda: _engine_core(doomed), vllm.logs, 300)
    job = svc.get(rec.id, ALICE)
    assert (job.status, job.stage, job.deliveries) == (JobStatus.running, JobStage.evaluate, 1)
    descendants = _running(doomed.children(recursive=True))
    (endpoint,) = (p for p in descendants if _is(p, "app.evals.endpoint"))
    seen = describe(descendants)  # the endpoint's lifeline watcher and its engine core too
    assert any(_is(p, "app.core.lifeline") for p in descendants), seen
    assert any("VLLM::EngineCore" in d for d in seen), seen
    vllm.kill(proc)

    wait_gone(descendants, timeout=15)
    # Nor any the engine started after the snapshot (its group is swept, not its tree).
    wait_gone(_in_group(endpoint.pid), timeout=15)
    assert svc.store.keys("evals") == []  # no partial score stored
    job = svc.get(rec.id, ALICE)
    assert job.status == JobStatus.running and job.result is None

    # The redelivery, on a worker whose engine is transformers (it starts in seconds):
    # the evaluation runs again from the start and its scores are cached.
    light = workers("torch")
    survivor = psutil.Process(light.start("survivor").pid)
    _until("the job's end", lambda: svc.get(rec.id, ALICE).status.terminal, light.logs, 600)
    job = svc.get(rec.id, ALICE)
    assert job.status == JobStatus.succeeded and job.deliveries == 2, (job.error, light.logs())
    assert job.result is not None and job.result.evaluation is not None
    (model,) = job.result.evaluation.models
    score = model.suites["format"]
    assert score.n == LIMIT
    log = [e.message for e in svc.events(rec.id, ALICE)]
    assert sum("starting an engine" in m for m in log) == 2, log  # one per delivery
    (key,) = svc.store.keys("evals")
    stored = read_score(svc.store, key)
    assert stored is not None and stored.score == score

    # A finished evaluation leaves nothing running either.
    def settled() -> bool:
        return not _running(survivor.children(recursive=True))

    _until("the survivor's children to end", settled, light.logs, 30)
