"""When a serve job ends, decided from the replicas' reports alone (pure), and the roles'
contract: the split planes need Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app.api.app import create_app
from app.core.errors import InvalidSettingsError, ModelNotFoundError, ReplicaRequestError
from app.core.settings import Settings
from app.handoff.board import LoadNotice, LoadReport
from app.handoff.bus import LocalBus
from app.handoff.entry import ModelEntry
from app.handoff.requests import ReplicaRequests
from app.handoff.verdict import judge
from app.jobs.finals import FinalWriter
from app.jobs.loads import LoadWatcher
from app.jobs.records import JobRecords
from app.jobs.sqlite_kv import SqliteKV

NOTICE = LoadNotice(job_id="mrg_1", model_id="m", announced_at=1000.0)


def reports(**states: str) -> dict[str, LoadReport]:
    return {
        r: LoadReport(replica=r, state=s, reason=f"{r} broke", at=1000.0 + i)  # type: ignore[arg-type]
        for i, (r, s) in enumerate(states.items())
    }


def test_one_ready_replica_is_enough_by_default() -> None:
    got = judge(NOTICE, reports(a="ready", b="loading"), {"a", "b"}, 1, 60, 1001)
    assert got is not None and got.status == "succeeded" and "ready on a" in got.message


def test_all_waits_for_every_live_replica() -> None:
    live = {"a", "b"}
    assert judge(NOTICE, reports(a="ready", b="loading"), live, None, 60, 1001) is None
    assert judge(NOTICE, reports(a="ready"), live, None, 60, 1001) is None  # b has not begun
    done = judge(NOTICE, reports(a="ready", b="ready"), live, None, 60, 1001)
    assert done is not None and done.status == "succeeded"
    # a replica that died before loading is no longer waited for
    gone = judge(NOTICE, reports(a="ready", b="loading"), {"a"}, None, 60, 1001)
    assert gone is not None and gone.status == "succeeded"
    # nobody is running: wait (one may start), not success
    assert judge(NOTICE, {}, set(), None, 60, 1001) is None


def test_a_failure_fails_the_job_only_when_no_replica_left_can_load() -> None:
    assert judge(NOTICE, reports(a="failed", b="loading"), {"a", "b"}, 1, 60, 1001) is None
    got = judge(NOTICE, reports(a="failed"), {"a"}, 1, 60, 1001)
    assert got is not None and (got.status, got.code, got.message) == (
        "failed",
        "load_failed",
        "a broke",
    )
    need_two = judge(NOTICE, reports(a="ready", b="failed"), {"a", "b"}, 2, 60, 1001)
    assert need_two is not None and need_two.code == "load_failed"
    every = judge(NOTICE, reports(a="ready", b="failed"), {"a", "b"}, None, 60, 1001)
    assert every is not None and every.code == "load_failed" and "b broke" in every.message


def test_the_wait_ends_with_load_timeout_naming_why() -> None:
    nobody = judge(NOTICE, {}, set(), 1, 60, 1060)
    assert nobody is not None and nobody.code == "load_timeout"
    assert "no serving replica is running" in nobody.message
    assert "REALIGN_SERVE_LOAD_TIMEOUT_S" in nobody.message
    lost = judge(NOTICE, reports(x="loading"), set(), 1, 60, 1060)
    assert lost is not None and "x stopped while loading" in lost.message
    slow = judge(NOTICE, reports(x="loading"), {"x"}, 1, 60, 1060)
    assert slow is not None and "still loading on x" in slow.message


@pytest.mark.parametrize("role", ["api", "serving"])
def test_split_roles_need_redis(role: str) -> None:
    with pytest.raises(InvalidSettingsError, match="REALIGN_REDIS_URL"):
        create_app(Settings(serve_role=role))  # type: ignore[arg-type]


def test_replicas_setting() -> None:
    assert Settings().replicas_needed() == 1
    assert Settings(serve_replicas="ALL").replicas_needed() is None
    assert Settings(serve_replicas="3").replicas_needed() == 3
    with pytest.raises(ValueError, match="number of replicas"):
        Settings(serve_replicas="0")


def test_the_job_plane_answers_the_admin_engine_routes() -> None:
    """A gateway sends `/admin/*` to the API: its engine routes are there (relayed to the
    serving replicas), and no inference route is."""
    settings = Settings(serve_role="api", redis_url="redis://127.0.0.1:1/0")
    paths = set(create_app(settings).openapi()["paths"])
    admin = {"/admin/engines", "/admin/models/{model_id}/load", "/admin/models/{model_id}/unload"}
    assert admin <= paths and "/v1/chat/completions" not in paths


def test_an_admin_request_is_left_to_its_caller_and_expires(tmp_path: Path) -> None:
    """The workers' load watcher ends jobs only: it neither ends nor withdraws an admin's
    notice, which expires on its own if the API process that waits for it goes away."""
    records = JobRecords(SqliteKV(tmp_path / "jobs.sqlite"))
    board = records.board
    board.post(LoadNotice(job_id="adm_1", model_id="m", action="unload", by="admin"), 3.0)
    watcher = LoadWatcher(records, Settings(), "w1", FinalWriter(records), LocalBus())
    assert watcher.settle("adm_1") is None
    watcher.sweep()
    assert [(n.job_id, n.action) for n in board.pending()] == [("adm_1", "unload")]
    assert board.report("adm_1", "r1", "ready", how="unloaded")
    assert board.reports("adm_1")["r1"].how == "unloaded"
    time.sleep(3.1)
    assert board.pending() == [] and board.notice("adm_1") is None
    assert not board.report("adm_1", "r2", "ready")  # expired: a late report is dropped


def test_an_admin_request_needs_the_model_and_a_live_replica(tmp_path: Path) -> None:
    board = JobRecords(SqliteKV(tmp_path / "jobs.sqlite")).board
    requests = ReplicaRequests(board, LocalBus(), timeout_s=5)
    with pytest.raises(ModelNotFoundError, match="'m' does not exist"):
        asyncio.run(requests.load("m"))
    board.register_model(
        ModelEntry(id="m", merged_key="k", residual_key="r", alpha=1.0, base="b",
                   instruct="i", target="t", owner="o", job_id="j")
    )  # fmt: skip
    with pytest.raises(ReplicaRequestError, match="no serving replica is running") as exc:
        asyncio.run(requests.unload("m"))
    assert exc.value.code == "no_serving_replica" and board.pending() == []
    assert requests.engines() == []
